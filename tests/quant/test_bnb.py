"""bitsandbytes against `sim`: the same math, checked on a layer and on a tiny model (CPU kernels)."""

import copy

import pytest
import torch

from qharness.quant.apply import quantize_
from qharness.quant.schemes import get_scheme
from qharness.quant.sim import SimQuantLinear

pytestmark = pytest.mark.needs("bitsandbytes")


def test_nf4_weights_equal_sim_exactly():
    from bitsandbytes.functional import dequantize_4bit

    from qharness.quant.bnb import _nf4_linear
    from qharness.quant.sim import fake_quantize

    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 64)
    module = _nf4_linear(linear, 64)
    weights = dequantize_4bit(module.weight.data, module.weight.quant_state)
    assert torch.equal(weights, fake_quantize(linear.weight.data, get_scheme("nf4").weights))


def test_llm_int8_layer_matches_sim_within_fp16_rounding():
    from qharness.quant.bnb import _int8_linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 64)
    x = torch.randn(2, 5, 128)
    x[0, 0, 3] = 50.0  # an outlier column: kept in 16-bit by both
    reference = linear(x)
    bnb_out = _int8_linear(linear, 6.0).eval()(x)
    sim_out = SimQuantLinear(linear, get_scheme("llm-int8"))(x)
    # bitsandbytes casts activations to fp16 before quantizing: that, not the method, is the difference
    assert (bnb_out - sim_out).abs().max() / reference.abs().max() < 5e-3
    assert not torch.allclose(bnb_out, reference, atol=1e-5)  # it did quantize


# the weights are equal (above); bitsandbytes' CPU matmuls are not fp32 GEMMs (fp16 activations for int8, and a
# 4-bit kernel about 0.3% of the output's range away from F.linear on the same dequantized weights)
@pytest.mark.parametrize(("scheme", "tolerance"), [("llm-int8", 0.02), ("nf4", 0.01)])
def test_tiny_model_logits_agree_with_sim(tiny_model, scheme, tolerance):
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 16))
    sim_model = copy.deepcopy(tiny_model)
    assert quantize_(tiny_model, get_scheme(scheme), backend="bnb") == "bnb"
    quantize_(sim_model, get_scheme(scheme), backend="sim")
    with torch.inference_mode():
        bnb_logits, sim_logits = tiny_model(ids).logits, sim_model(ids).logits
    assert (bnb_logits - sim_logits).abs().max() / sim_logits.abs().max() < tolerance
