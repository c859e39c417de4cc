import copy

import pytest
import torch

from qharness.activations.layer_error import layer_errors
from qharness.quant.apply import quantize_
from qharness.quant.schemes import get_scheme


def test_identical_models_have_zero_error_and_quantized_ones_do_not(tiny_model):
    batches = [torch.randint(0, tiny_model.config.vocab_size, (1, 12)) for _ in range(2)]
    same = layer_errors(tiny_model, copy.deepcopy(tiny_model), batches)
    assert [e["rel_error"] for e in same] == [0.0, 0.0]
    quantized = copy.deepcopy(tiny_model)
    quantize_(quantized, get_scheme("int8-w8a8-tensor"))
    errors = layer_errors(tiny_model, quantized, batches)
    assert all(0 < e["rel_error"] < 1 for e in errors)
    assert all(e["fp_max"] > e["fp_median"] > 0 for e in errors)


def test_layer_zero_error_is_the_direct_relative_error(tiny_model):
    ids = torch.randint(0, tiny_model.config.vocab_size, (1, 10))
    quantized = copy.deepcopy(tiny_model)
    quantize_(quantized, get_scheme("int8"))
    seen = {}
    for name, model in (("fp", tiny_model), ("q", quantized)):
        handle = model.model.layers[0].register_forward_hook(
            lambda m, a, out, name=name: seen.__setitem__(name, (out[0] if isinstance(out, tuple) else out)))
        with torch.inference_mode():
            model(ids)
        handle.remove()
    (first, _) = layer_errors(tiny_model, quantized, [ids])
    direct = float((seen["q"] - seen["fp"]).norm() / seen["fp"].norm())
    assert first["rel_error"] == pytest.approx(direct, rel=1e-5)
