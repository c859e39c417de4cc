"""optimum-quanto against `sim` where they implement the same math."""

import copy

import pytest
import torch

from qharness.quant.apply import quantize_
from qharness.quant.backend import QuantContext
from qharness.quant.calibrate import calibration_batches
from qharness.quant.schemes import get_scheme

pytestmark = pytest.mark.needs("optimum.quanto")


# weight-only: identical arithmetic. Static W8A8: one layer agrees exactly (below); through a whole model the two
# calibration passes see slightly different inputs in later layers, about 1% of the logits' range
@pytest.mark.parametrize(("scheme", "tolerance"), [("int8-weight-channel", 1e-4), ("fp8-e4m3-weight", 1e-4),
                                                   ("int8-w8a8-tensor-static", 0.02)])
def test_logits_agree_with_sim(tiny_model, tiny_tokenizer, heldout_text, scheme, tolerance):
    batches = calibration_batches(tiny_tokenizer, heldout_text, n=3, length=32)
    context = QuantContext(torch.device("cpu"), calibration=lambda: batches)
    sim_model = copy.deepcopy(tiny_model)
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 16))
    with torch.inference_mode():
        reference = tiny_model(ids).logits
        assert quantize_(tiny_model, get_scheme(scheme), backend="quanto", context=context) == "quanto"
        quantize_(sim_model, get_scheme(scheme), backend="sim", context=context)
        quanto_logits, sim_logits = tiny_model(ids).logits, sim_model(ids).logits
    assert (quanto_logits - sim_logits).abs().max() / sim_logits.abs().max() < tolerance
    assert not torch.allclose(quanto_logits, reference, atol=1e-6)  # it did quantize
    assert type(tiny_model.model.layers[0].mlp.down_proj).__name__ == "QLinear"
    assert type(tiny_model.lm_head) is torch.nn.Linear  # only the targets


def test_static_w8a8_layer_is_exactly_sim():
    from optimum.quanto import Calibration, freeze, qint8, quantize

    from qharness.quant.sim import SimQuantLinear

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 64))
    x = torch.randn(3, 5, 256)
    sim = SimQuantLinear(model[0], get_scheme("int8-w8a8-tensor-static"))
    sim.observing = True
    sim(x)
    sim.finish_observing()
    quantize(model, weights=qint8, activations=qint8)
    with torch.inference_mode(), Calibration(momentum=0.0):
        model(x)
    freeze(model)
    with torch.inference_mode():
        assert torch.allclose(model(x), sim(x), atol=1e-5)


# On CUDA: tests/quant/test_cuda_agreement.py (every quanto kernel declared there, from the capability table)
