"""Static calibration, kept token positions, LLM.int8() outlier columns, NF4 and unscaled FP8 in `sim`."""

import pytest
import torch

from qharness.core.errors import QHarnessError
from qharness.quant.schemes import Keep, PerGroup, TensorQuant, get_scheme
from qharness.quant.sim import NF4_CODE, SimQuantLinear, calibrate_, fake_quantize


def linear(in_features: int = 32, out_features: int = 8) -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(in_features, out_features).double()


def test_kept_bos_position_is_exact_and_no_longer_stretches_the_scale():
    lin = linear()
    x = torch.randn(1, 6, 32, dtype=torch.float64)
    x[0, 0, 3] = 500.0  # a massive activation on BOS
    scheme = get_scheme("int8-w8a8-tensor")
    plain = SimQuantLinear(lin, scheme)
    kept = SimQuantLinear(lin, scheme, Keep(positions=(0,)))
    exact_input = torch.nn.functional.linear(x, plain.weight, plain.bias)  # same quantized weights, fp input
    assert torch.allclose(kept(x)[0, 0], exact_input[0, 0])  # BOS row untouched
    err_plain = (plain(x)[0, 1:] - exact_input[0, 1:]).abs().max()
    err_kept = (kept(x)[0, 1:] - exact_input[0, 1:]).abs().max()
    assert err_kept < err_plain / 20  # the other tokens get their own, much finer scale
    rest = x.clone()
    rest[0, 0] = 0
    expected_rest = torch.nn.functional.linear(fake_quantize(rest, scheme.activations), plain.weight, plain.bias)
    assert torch.allclose(kept(x)[0, 1:], expected_rest[0, 1:])


def test_llm_int8_keeps_outlier_columns_and_quantizes_the_rest_per_token():
    lin = linear()
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    x[1, 3, 7] = 40.0  # column 7 exceeds the threshold 6.0 somewhere
    x[0, 2, 20] = -40.0  # and column 20, by magnitude
    layer = SimQuantLinear(lin, get_scheme("llm-int8"))
    inner = x.clone()
    inner[..., [7, 20]] = 0
    expected_input = fake_quantize(inner, get_scheme("int8").activations)
    expected_input[..., [7, 20]] = x[..., [7, 20]]
    expected = torch.nn.functional.linear(expected_input, layer.weight, layer.bias)
    assert torch.allclose(layer(x), expected)


def test_static_scale_is_the_calibrated_max_and_clamps_beyond_it():
    lin = linear()
    model = torch.nn.Sequential(SimQuantLinear(lin, get_scheme("int8-w8a8-tensor-static")))
    layer = model[0]
    with pytest.raises(QHarnessError, match="has static activation scales: calibrate it first"):
        layer(torch.ones(1, 32, dtype=torch.float64))

    class Wrapper(torch.nn.Module):  # calibrate_ calls model(input_ids=...)
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input_ids):
            return self.inner(input_ids)

    batches = [torch.full((1, 32), 2.0, dtype=torch.float64), torch.full((1, 32), -3.0, dtype=torch.float64)]
    assert calibrate_(Wrapper(), batches) == 1
    assert layer.act_amax.item() == 3.0 and not layer.observing
    big = torch.full((1, 32), 10.0, dtype=torch.float64)
    clamped = torch.nn.functional.linear(torch.full((1, 32), 3.0, dtype=torch.float64), layer.weight, layer.bias)
    assert torch.allclose(layer(big), clamped)  # 10 clamps to the edge of a grid that ends at 3


def test_percentile_observer_ignores_rare_outliers():
    lin = linear(in_features=1000)
    layer = SimQuantLinear(lin, get_scheme("int8-w8a8-tensor-static-p9999"))
    layer.observing = True
    x = torch.linspace(-1, 1, 100_000, dtype=torch.float64).reshape(100, 1000)
    x[0, 0] = 1000.0
    layer(x)
    layer.finish_observing()
    assert layer.act_amax.item() == pytest.approx(1.0, abs=0.01)  # the 99.99th percentile of 1e5 values skips it


def test_nf4_picks_the_nearest_code_times_the_block_absmax():
    w = torch.tensor([[0.5, -1.0, 0.1, 0.0]] * 2, dtype=torch.float64)
    out = fake_quantize(w, TensorQuant("nf4", PerGroup(4)))
    codes = torch.tensor(NF4_CODE, dtype=torch.float64)
    expected = [codes[(codes - v).abs().argmin()].item() for v in (0.5, -1.0, 0.1, 0.0)]
    assert out[0].tolist() == pytest.approx(expected)


def test_unscaled_fp8_saturates_e4m3_and_overflows_e5m2():
    x = torch.tensor([[1.0, 500.0, 70000.0]])
    e4m3 = fake_quantize(x, get_scheme("fp8-e4m3-unscaled").activations)
    assert e4m3.tolist() == [[1.0, 448.0, 448.0]]
    e5m2 = fake_quantize(x, get_scheme("fp8-e5m2-unscaled").activations)
    assert e5m2[0, 1] == 512.0 and torch.isinf(e5m2[0, 2])


def test_keep_rejects_negative_values_and_labels_what_it_keeps():
    from qharness.core.errors import ConfigError

    with pytest.raises(ConfigError, match="kept positions must be >= 0"):
        Keep(positions=(-1,))
    with pytest.raises(ConfigError, match="kept channels must be >= 0"):
        Keep(channels=(-2,))
    assert Keep(positions=(0,)).label == "pos:0" and Keep().label == "" and not Keep()
    assert Keep((0,), (507, 3)).label == "pos:0;ch:507,3"


def test_kept_channel_is_exact_and_left_out_of_the_scale():
    lin = linear()
    x = torch.randn(1, 6, 32, dtype=torch.float64)
    x[:, :, 9] = 300.0  # a massive channel on every token
    scheme = get_scheme("int8-w8a8-tensor")
    kept = SimQuantLinear(lin, scheme, Keep(channels=(9,)))
    rest = x.clone()
    rest[..., 9] = 0
    expected_input = fake_quantize(rest, scheme.activations)
    expected_input[..., 9] = x[..., 9]
    assert torch.allclose(kept(x), torch.nn.functional.linear(expected_input, kept.weight, kept.bias))


def test_channels_are_kept_only_where_the_input_is_the_hidden_state(tiny_model):
    from qharness.quant.apply import quantize_

    quantize_(tiny_model, get_scheme("int8-w8a8-tensor"), keep=Keep(positions=(0,), channels=(5,)))
    layer = tiny_model.model.layers[0]
    assert layer.self_attn.q_proj.keep_channels == (5,) and layer.mlp.up_proj.keep_channels == (5,)
    assert layer.mlp.down_proj.keep_channels == ()  # its input is the MLP's inner dimension
    assert layer.mlp.down_proj.keep_positions == (0,)
