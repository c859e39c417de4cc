"""The reference arithmetic against hand-written element-by-element definitions."""

import math

import pytest
import torch

from qharness.core.errors import ConfigError
from qharness.quant.schemes import PerChannel, PerGroup, PerTensor, PerToken, TensorQuant, get_scheme
from qharness.quant.sim import SimQuantLinear, fake_quantize


def ref_int_symmetric(values: list[float], qmin: int, qmax: int) -> list[float]:
    amax = max(abs(v) for v in values)
    scale = amax / qmax if amax > 0 else 1.0
    # Python's round() is round-half-to-even like torch.round
    return [min(max(round(v / scale), qmin), qmax) * scale for v in values]


def ref_int_asymmetric(values: list[float], qmin: int, qmax: int) -> list[float]:
    lo, hi = min(min(values), 0.0), max(max(values), 0.0)
    scale = (hi - lo) / (qmax - qmin) or 1.0
    zero = qmin - round(lo / scale)
    return [(min(max(round(v / scale) + zero, qmin), qmax) - zero) * scale for v in values]


def test_int8_per_channel_matches_reference_row_by_row():
    torch.manual_seed(0)
    w = torch.randn(5, 37, dtype=torch.float64)
    out = fake_quantize(w, TensorQuant("int8", PerChannel()))
    for row, got in zip(w.tolist(), out.tolist(), strict=True):
        assert got == pytest.approx(ref_int_symmetric(row, -128, 127), rel=1e-12, abs=1e-12)


def test_int8_per_tensor_uses_one_scale_so_an_outlier_crushes_the_rest():
    x = torch.tensor([[0.01, 0.02, -0.03], [0.015, 0.0, 300.0]], dtype=torch.float64)
    out = fake_quantize(x, TensorQuant("int8", PerTensor()))
    assert out.flatten().tolist() == pytest.approx(ref_int_symmetric(x.flatten().tolist(), -128, 127))
    assert out[0].abs().max() == 0  # 300 / 127 = 2.36 per step: every small value rounds to zero
    per_token = fake_quantize(x, TensorQuant("int8", PerToken()))
    assert per_token[0].tolist() == pytest.approx(x[0].tolist(), rel=0.02)  # its own scale keeps it


def test_rounding_is_half_to_even_and_clamps_at_the_grid_edges():
    # amax 127 -> scale 1: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -0.5 -> 0
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -127.0]])
    assert fake_quantize(x, TensorQuant("int8", PerToken())).tolist() == [[127.0, 0.0, 2.0, 2.0, 0.0, -127.0]]


def test_int4_asymmetric_groups_with_ragged_tail_match_reference():
    torch.manual_seed(1)
    w = torch.randn(3, 300, dtype=torch.float64) + 0.3  # 300 = 2 groups of 128 + a tail of 44
    out = fake_quantize(w, TensorQuant("int4", PerGroup(128), symmetric=False))
    for row, got in zip(w.tolist(), out.tolist(), strict=True):
        expected = []
        for start in range(0, 300, 128):
            expected += ref_int_asymmetric(row[start : start + 128], -8, 7)
        assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_all_zero_group_stays_exactly_zero():
    w = torch.zeros(2, 256)
    w[1, :128] = torch.linspace(-1, 1, 128)
    for tq in (TensorQuant("int4", PerGroup(128), symmetric=False), TensorQuant("int8", PerGroup(128)),
               TensorQuant("fp8_e4m3", PerGroup(128))):
        out = fake_quantize(w, tq)
        assert torch.isfinite(out).all()
        assert out[0].abs().sum() == 0 and out[1, 128:].abs().sum() == 0


def test_nan_and_inf_propagate_instead_of_being_clipped():
    x = torch.tensor([[1.0, float("nan"), 2.0], [1.0, 2.0, 3.0]])
    out = fake_quantize(x, TensorQuant("int8", PerToken()))
    assert torch.isnan(out[0]).all()  # the poisoned token's scale is NaN
    assert torch.isfinite(out[1]).all()
    y = torch.tensor([[1.0, float("inf")]])
    assert not torch.isfinite(fake_quantize(y, TensorQuant("int8", PerTensor()))).all()


def test_fp8_e4m3_scaled_keeps_massive_values_and_relative_error_bounded():
    x = torch.tensor([[0.5, -3.0, 1000.0, 0.01]])
    out = fake_quantize(x, TensorQuant("fp8_e4m3", PerToken()))
    assert out[0, 2] == pytest.approx(1000.0, rel=1e-6)  # the amax maps exactly onto 448
    assert (out - x).abs().max() / x.abs().max() < 2**-3  # 3 mantissa bits
    e5m2 = fake_quantize(x, TensorQuant("fp8_e5m2", PerToken()))
    assert e5m2[0, 2] == pytest.approx(1000.0, rel=1e-6)


def test_fp8_is_the_torch_cast_of_the_scaled_value():
    torch.manual_seed(2)
    x = torch.randn(4, 16) * 10
    scale = x.abs().amax(dim=-1, keepdim=True) / 448
    expected = (x / scale).to(torch.float8_e4m3fn).float() * scale
    assert torch.equal(fake_quantize(x, TensorQuant("fp8_e4m3", PerToken())), expected)


def test_shape_and_dtype_are_kept():
    x = torch.randn(2, 3, 200, dtype=torch.bfloat16)
    for tq in (TensorQuant("int8", PerToken()), TensorQuant("int4", PerGroup(64), symmetric=False)):
        out = fake_quantize(x, tq)
        assert out.shape == x.shape and out.dtype == x.dtype


def test_invalid_configs_raise_config_error():
    with pytest.raises(ConfigError, match="unknown format 'int9'; valid: int8, int4, fp8_e4m3, fp8_e5m2"):
        TensorQuant("int9", PerTensor())
    with pytest.raises(ConfigError, match="symmetric only"):
        TensorQuant("fp8_e4m3", PerTensor(), symmetric=False)
    with pytest.raises(ConfigError, match="group size must be >= 1"):
        PerGroup(0)


def test_w8a8_linear_equals_the_integer_gemm_it_simulates():
    """s_x * s_w * sum(q_x q_w) computed with exact int64 arithmetic, against SimQuantLinear."""
    torch.manual_seed(3)
    linear = torch.nn.Linear(96, 40, bias=True).double()
    x = torch.randn(2, 7, 96, dtype=torch.float64) * 3
    x[0, 0, 5] = 250.0  # a massive activation on the first token
    out = SimQuantLinear(linear, get_scheme("int8-w8a8-token"))(x)

    w = linear.weight.detach()
    s_w = w.abs().amax(dim=1, keepdim=True) / 127
    q_w = torch.round(w / s_w).to(torch.int64)
    s_x = x.abs().amax(dim=-1, keepdim=True) / 127
    q_x = torch.round(x / s_x).to(torch.int64)
    acc = q_x @ q_w.T  # exact integer accumulation, (2, 7, 40)
    expected = acc.double() * s_x * s_w.T + linear.bias.detach()
    assert torch.allclose(out, expected, rtol=1e-12, atol=1e-12)
    assert not math.isclose(out.abs().max().item(), linear(x).abs().max().item(), rel_tol=1e-9)  # it did quantize


@pytest.mark.parametrize(("name", "activation_bits"), [("int4-w4a8-token-g128", 8), ("int4-w4a4-token-g128", 4)])
def test_grouped_int4_weights_combine_with_per_token_activations(name, activation_bits):
    """W4A8/W4A4 g128: per-token integer activations times INT4 weights with one symmetric scale per 128 inputs."""
    torch.manual_seed(4)
    linear = torch.nn.Linear(384, 16).double()  # 3 groups per row
    x = torch.randn(2, 5, 384, dtype=torch.float64)
    out = SimQuantLinear(linear, get_scheme(name))(x)

    w = linear.weight.detach()
    groups = w.view(16, 3, 128)
    s_w = groups.abs().amax(dim=-1, keepdim=True) / 7
    w_q = (torch.clamp(torch.round(groups / s_w), -8, 7) * s_w).view(16, 384)
    qmax = 2 ** (activation_bits - 1) - 1
    s_x = x.abs().amax(dim=-1, keepdim=True) / qmax
    x_q = torch.clamp(torch.round(x / s_x), -qmax - 1, qmax) * s_x
    assert torch.allclose(out, x_q @ w_q.T + linear.bias.detach(), rtol=1e-12, atol=1e-12)
    per_channel = SimQuantLinear(linear, get_scheme(name.removesuffix("-g128"))).weight
    assert (w_q - w).norm() < (per_channel - w).norm()  # a scale per 128 inputs tracks the weights more closely


def test_tinygemm_int4_keeps_a_float_zero_point_and_the_group_range_by_hand():
    """lo = -0.25, hi = 7.25: s = 7.5 / 15 = 0.5, z = lo + 8 s = 3.75; q = round((x - lo) / s) on codes 0..15 (ties
    to even) and x' = (q - 8) s + z. Zero is not on that grid (0 -> -0.25), where the integer zero point keeps it."""
    x = torch.tensor([[-0.25, 0.0, 1.3, 7.25]])
    tinygemm = get_scheme("int4-weight-g128-tinygemm").weights
    assert tinygemm.zero_point == "float" and not tinygemm.symmetric
    got = fake_quantize(x, TensorQuant("int4", PerGroup(4), symmetric=False, zero_point="float"))
    assert got.tolist() == [[-0.25, -0.25, 1.25, 7.25]]
    integer = fake_quantize(x, TensorQuant("int4", PerGroup(4), symmetric=False))
    assert integer.tolist() == [ref_int_asymmetric(x[0].tolist(), -8, 7)] and integer[0, 1] == 0
    for dtype in (torch.bfloat16, torch.float16):  # computed in the tensor's own dtype, as the kernel stores s, z
        assert fake_quantize(x.to(dtype), tinygemm).dtype == dtype


def test_a_float_zero_point_is_for_asymmetric_integers_only():
    with pytest.raises(ConfigError, match="a float zero point is for asymmetric integer formats"):
        TensorQuant("int4", PerGroup(128), zero_point="float")
    with pytest.raises(ConfigError, match="unknown zero point 'half'"):
        TensorQuant("int4", PerGroup(128), symmetric=False, zero_point="half")


@pytest.mark.parametrize(("scheme", "expected"), [
    # mean over the batches of each one's 99.99th percentile of |x|: batch k holds k * (1 .. 10000), whose
    # ceil(0.9999 * 10000) = 9999th smallest magnitude is 9999 k; k = 1, 2, 4 -> 9999 * 7 / 3
    ("int8-w8a8-tensor-static-p9999", 9999 * 7 / 3),
    ("int8-w8a8-tensor-static", 40000.0),  # minmax: the largest |x| of any batch
])
def test_static_calibration_over_batches_of_different_ranges(scheme, expected):
    layer = SimQuantLinear(torch.nn.Linear(4, 2), get_scheme(scheme))
    layer.observing = True
    for k in (1, 2, 4):
        layer(torch.arange(1, 10001, dtype=torch.float32).reshape(2500, 4) * k * (-1) ** k)
    layer.finish_observing()
    assert layer.act_amax.item() == pytest.approx(expected, rel=1e-6)
