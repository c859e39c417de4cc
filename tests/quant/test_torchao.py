"""torchao against `sim` where they implement the same math (CPU kernels)."""

import copy

import pytest
import torch

from qharness.quant.apply import quantize_
from qharness.quant.schemes import get_scheme

pytestmark = pytest.mark.needs("torchao")


def make_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # widths divisible by 128 so int4 g128 has no ragged group
    config = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize(
    ("scheme", "tolerance"),
    [
        ("fp8-e4m3-weight", 1e-5),  # identical arithmetic
        ("int4-weight-g128", 1e-5),  # identical arithmetic (asymmetric, zero point in the integer domain)
        ("int8-weight-channel", 0.02),  # torchao scales by amax/127.5, sim by amax/127
        ("int8-w8a8-token", 0.03),
    ],
)
def test_logits_agree_with_sim(scheme, tolerance):
    model = make_model()
    sim_model = copy.deepcopy(model)
    ids = torch.randint(0, 300, (2, 16))
    with torch.inference_mode():
        reference = model(ids).logits
        assert quantize_(model, get_scheme(scheme), backend="torchao") == "torchao"
        quantize_(sim_model, get_scheme(scheme), backend="sim")
        ao, sim = model(ids).logits, sim_model(ids).logits
    assert (ao - sim).abs().max() / sim.abs().max() < tolerance
    assert not torch.allclose(ao, reference, atol=1e-6)  # it did quantize


def test_ragged_int4_groups_point_to_sim(tiny_model):
    from qharness.errors import BackendUnavailable

    with pytest.raises(BackendUnavailable, match="torchao int4 needs input widths divisible by 128; .* has 64; "
                                                 "use --backend sim"):
        quantize_(tiny_model, get_scheme("int4"), backend="torchao")
