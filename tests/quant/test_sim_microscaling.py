"""sim.py's microscaling formats (MXFP8, MXFP4, NVFP4) against their definitions: the OCP MX v1.0 spec, NVIDIA's
NVFP4 and torchao's reference quantizers."""

import pytest
import torch

from qharness.core.errors import ConfigError
from qharness.quant.schemes import PerBlock, PerGroup, PerTensor, TensorQuant, get_scheme
from qharness.quant.sim import SimQuantLinear, fake_quantize, round_to_float

MXFP8 = TensorQuant("fp8_e4m3", PerBlock(32, "e8m0"))
MXFP4 = TensorQuant("fp4_e2m1", PerBlock(32, "e8m0"))
NVFP4 = TensorQuant("fp4_e2m1", PerBlock(16, "e4m3"))


def e2m1_values() -> list[float]:
    """Every E2M1 code decoded by the format's definition: bias 1, exponent 0 is subnormal (0.m x 2^0)."""
    values = []
    for code in range(16):
        sign, exponent, mantissa = code >> 3, (code >> 1) & 0b11, code & 1
        magnitude = mantissa / 2 if exponent == 0 else (1 + mantissa / 2) * 2 ** (exponent - 1)
        values.append(-magnitude if sign else magnitude)
    return values


def block(*values: float, size: int = 32, dtype=torch.float32) -> torch.Tensor:
    """One row holding one block: `values` then zeros."""
    row = torch.zeros(1, size, dtype=dtype)
    row[0, : len(values)] = torch.tensor(values, dtype=dtype)
    return row


def test_every_e2m1_value_round_trips():
    values = torch.tensor(e2m1_values())
    assert sorted(set(values.abs().tolist())) == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert torch.equal(round_to_float(values, "fp4_e2m1"), values)
    # inside a block whose amax is 6 the shared scale is 2^(2 - 2) = 1, so the grid is the format's own
    assert fake_quantize(block(*values.tolist(), 6.0), MXFP4)[0, :16].tolist() == values.tolist()


def test_e2m1_ties_round_to_the_even_code():
    grid = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]  # code i holds grid[i]; even codes have mantissa bit 0
    midpoints = torch.tensor([(a + b) / 2 for a, b in zip(grid, grid[1:], strict=False)])
    expected = [grid[i] if i % 2 == 0 else grid[i + 1] for i in range(7)]
    assert round_to_float(midpoints, "fp4_e2m1").tolist() == expected  # 0.25->0, 0.75->1, 1.25->1, 1.75->2, ...
    assert round_to_float(-midpoints, "fp4_e2m1").tolist() == [-v for v in expected]
    # one ulp off a tie goes to the nearer value, whatever its parity
    above = torch.nextafter(midpoints, torch.tensor(10.0))
    assert round_to_float(above, "fp4_e2m1").tolist() == grid[1:]


def test_e2m1_saturates_at_six_and_keeps_nan():
    out = round_to_float(torch.tensor([6.5, 7.0, 100.0, -1e30, float("nan")]), "fp4_e2m1")
    assert out[:4].tolist() == [6.0, 6.0, 6.0, -6.0] and out[4].isnan()


def test_mxfp4_hand_computed_blocks():
    # amax 6: scale 2^(floor(log2 6) - 2) = 1; 5 and 2.5 are ties (to 4 and 2), 3.5 a tie up to 4
    assert fake_quantize(block(6.0, 5.0, 2.5, 0.25, 0.75, -1.25, 3.5, 0.1), MXFP4)[0, :8].tolist() == [
        6.0, 4.0, 2.0, 0.0, 1.0, -1.0, 4.0, 0.0]
    # amax 12: scale 2; 12 -> 6 x 2, 5 -> 2.5 -> 2 (tie to even) x 2
    assert fake_quantize(block(12.0, 5.0, -0.5), MXFP4)[0, :3].tolist() == [12.0, 4.0, -0.0]
    # the floor rule gives no headroom: amax 7.9 keeps scale 1, so 7.9 saturates to 6 (a 24% error by design)
    assert fake_quantize(block(7.9, 1.0), MXFP4)[0, :2].tolist() == [6.0, 1.0]


def test_mxfp8_hand_computed_blocks():
    # amax 448: scale 2^(8 - 8) = 1, the plain E4M3 cast
    x = block(448.0, 300.0, 0.3, -17.0)
    assert torch.equal(fake_quantize(x, MXFP8), x.to(torch.float8_e4m3fn).float())
    # amax 1: scale 2^-8; 1 -> 256 and 0.3 -> 76.8 -> 80 (3 mantissa bits: spacing 8 in [64, 128))
    assert fake_quantize(block(1.0, 0.3), MXFP8)[0, :2].tolist() == [1.0, 80 / 256]


def test_an_outlier_in_the_block_zeroes_its_neighbours_in_fp4_but_not_in_fp8():
    """The project's point: a massive activation sets its block's scale. MXFP4 (scale 2^(9 - 2) = 128 for amax
    1000) rounds everything below 0.25 x 128 = 32 to zero; E4M3's wider exponent range keeps them."""
    torch.manual_seed(0)
    small = torch.rand(31) + 0.5  # in [0.5, 1.5)
    x = torch.cat([torch.tensor([1000.0]), small, small]).unsqueeze(0)  # block 0 has the outlier, block 1 not
    fp4 = fake_quantize(x, MXFP4)
    assert fp4[0, 0] == 768.0  # 1000 / 128 = 7.8 saturates to 6: the floor rule again
    assert fp4[0, 1:32].abs().max() == 0
    assert ((fp4[0, 32:] - x[0, 32:]).abs() / x[0, 32:]).max() <= 0.25  # block 1 keeps its own scale
    fp8 = fake_quantize(x, MXFP8)
    assert ((fp8[0, 1:32] - small).abs() / small).max() <= 2**-4  # E4M3's relative half-spacing
    nv = fake_quantize(x[:, :32], NVFP4)
    assert nv[0, 1:16].abs().max() == 0 and nv[0, 16:].abs().min() > 0  # 16-wide blocks: the next block survives


def test_nvfp4_two_level_scale_by_hand():
    # tensor amax 2688 = 448 x 6 makes the fp32 tensor scale exactly 1; a block of amax 6 then has E4M3 scale 1
    x = torch.zeros(2, 16)
    x[0, 0] = 2688.0
    x[1, :4] = torch.tensor([6.0, 5.0, 0.75, 0.25])
    assert fake_quantize(x, NVFP4)[1, :4].tolist() == [6.0, 4.0, 1.0, 0.0]
    # a small block far below the tensor's amax: its scale 0.06 / 6 = 0.01 is clamped up to E4M3's smallest normal
    # 2^-6, so 0.06, 0.03, 0.01 land on 4, 2, 0.5 x 2^-6 instead of their exact 6, 3, 1 x 0.01
    x[1, :4] = torch.tensor([0.06, 0.03, 0.01, 0.0])
    assert fake_quantize(x, NVFP4)[1, :3].tolist() == [4 / 64, 2 / 64, 0.5 / 64]
    alone = fake_quantize(x[1:], NVFP4)  # without the outlier the tensor scale serves this block
    assert alone[0, :3].tolist() == pytest.approx([0.06, 0.03, 0.01], rel=1e-6)


def test_nvfp4_couples_tokens_through_the_tensor_scale_mx_does_not():
    torch.manual_seed(1)
    x = torch.randn(2, 64)
    spiked = x.clone()
    spiked[1, 0] = 3e4  # a massive activation on another token
    assert torch.equal(fake_quantize(x, MXFP4)[0], fake_quantize(spiked, MXFP4)[0])
    assert not torch.equal(fake_quantize(x, NVFP4)[0], fake_quantize(spiked, NVFP4)[0])


def test_nan_or_inf_makes_its_whole_block_nan_never_a_saturated_value():
    for value in (float("nan"), float("inf"), float("-inf")):
        x = torch.ones(2, 64)
        x[0, 3] = value
        for tq in (MXFP8, MXFP4):
            out = fake_quantize(x, tq)
            assert out[0, :32].isnan().all(), (tq, value)
            assert torch.equal(out[0, 32:], x[0, 32:]) and torch.equal(out[1], x[1])
        # NVFP4's tensor scale sees every block, so one NaN or inf poisons the tensor
        assert fake_quantize(x, NVFP4).isnan().all()


def test_e8m0_scale_is_clamped_to_its_range():
    # all-zero block: scale 2^-127, exactly zero out
    assert fake_quantize(torch.zeros(1, 32), MXFP4).abs().sum() == 0
    # tiny fp32 (subnormal) values: floor(log2 2^-128) - 2 = -130 clamps to -127, so 2^-128 -> 0.5 (kept) and
    # 2^-129 -> 0.25, a tie that rounds to 0; an unclamped scale 2^-130 would have kept both
    out = fake_quantize(block(2.0**-128, 2.0**-129), MXFP4)
    assert out[0, :2].tolist() == [2.0**-128, 0.0]
    # fp32 cannot reach the top of E8M0 (2^127 x 2^emax); fp64 can, and then the elements saturate
    out = fake_quantize(block(2.0**200, 2.0**199, dtype=torch.float64), MXFP4)
    assert out[0, :2].tolist() == [6 * 2.0**127, 6 * 2.0**127]


def test_ragged_last_block_gets_its_own_scale_and_shapes_and_dtypes_are_kept():
    torch.manual_seed(2)
    x = torch.randn(3, 40)
    x[:, 35] = 50.0  # in the 8-wide tail
    out = fake_quantize(x, MXFP4)
    assert torch.equal(out[:, :32], fake_quantize(x[:, :32], MXFP4))
    assert torch.equal(out[:, 32:], fake_quantize(x[:, 32:], MXFP4))
    y = torch.randn(2, 5, 48, dtype=torch.bfloat16)
    for tq in (MXFP8, MXFP4, NVFP4):
        got = fake_quantize(y, tq)
        assert got.shape == y.shape and got.dtype == y.dtype


def test_blocks_run_along_the_input_dimension_of_weights_and_activations():
    """SimQuantLinear = fake-quantized activation rows times fake-quantized weight rows (both blocked along in)."""
    torch.manual_seed(3)
    linear = torch.nn.Linear(64, 24)
    x = torch.randn(2, 5, 64)
    for name in ("mxfp8-w8a8", "mxfp4-w4a4", "nvfp4-w4a4"):
        scheme = get_scheme(name)
        expected = torch.nn.functional.linear(fake_quantize(x, scheme.activations),
                                              fake_quantize(linear.weight.detach(), scheme.weights), linear.bias)
        assert torch.equal(SimQuantLinear(linear, scheme)(x), expected), name


def test_invalid_block_configs_raise_config_error():
    with pytest.raises(ConfigError, match=r"^format 'fp4_e2m1' needs a PerBlock granularity \(MX or NVFP4 scales\)"):
        TensorQuant("fp4_e2m1", PerGroup(32))
    with pytest.raises(ConfigError, match=r"^PerBlock holds float elements \(fp8_e4m3, fp8_e5m2, fp4_e2m1\), not "
                                          r"'int8'$"):
        TensorQuant("int8", PerBlock())
    with pytest.raises(ConfigError, match="^PerBlock scales are dynamic .*; set dynamic=True$"):
        TensorQuant("fp8_e4m3", PerBlock(), dynamic=False)
    with pytest.raises(ConfigError, match="^PerBlock is a scaled format; scaled=False applies to per-tensor fp8 only$"):
        TensorQuant("fp8_e4m3", PerBlock(), scaled=False)
    with pytest.raises(ConfigError, match="^block size must be >= 1, got 0$"):
        PerBlock(0)
    with pytest.raises(ConfigError, match="^unknown block scale format 'ue8m0'; valid: e8m0, e4m3$"):
        PerBlock(32, "ue8m0")
    TensorQuant("fp4_e2m1", PerBlock())  # the valid spelling
    with pytest.raises(ConfigError, match="unknown format"):
        TensorQuant("fp4", PerTensor())


@pytest.mark.needs("torchao")
@pytest.mark.parametrize("name", ["mxfp8-w8a8", "mxfp4-w4a4"])
def test_mx_matches_torchao_to_mx_bit_for_bit(name):
    from torchao.prototype.mx_formats.mx_tensor import ScaleCalculationMode, to_dtype, to_mx

    elem = torch.float8_e4m3fn if name.startswith("mxfp8") else torch.float4_e2m1fn_x2
    x = random_with_outliers(4)
    scale, data = to_mx(x, elem, 32, ScaleCalculationMode.FLOOR)  # FLOOR is the OCP rule
    assert torch.equal(fake_quantize(x, get_scheme(name).weights), to_dtype(data, scale, elem, 32, torch.float32))


@pytest.mark.needs("torchao")
def test_nvfp4_matches_torchao_nvfp4_quantize_bit_for_bit():
    """torchao multiplies by the reciprocal of the scale where sim divides by it (the definition); on random data
    they agree exactly, and could only differ where one ulp decides a tie."""
    from torchao.prototype.mx_formats.kernels import f4_unpacked_to_f32
    from torchao.prototype.mx_formats.nvfp4_tensor import nvfp4_quantize, per_tensor_amax_to_scale, unpack_uint4

    x = random_with_outliers(5)
    tensor_scale = per_tensor_amax_to_scale(x.abs().amax())
    scales, data = nvfp4_quantize(x, 16, tensor_scale)
    elements = f4_unpacked_to_f32(unpack_uint4(data)).view(64, 16, 16)
    reference = (elements * (scales.float() * tensor_scale).unsqueeze(-1)).view(64, 256)
    assert torch.equal(fake_quantize(x, get_scheme("nvfp4-w4a4").weights), reference)


def random_with_outliers(seed: int) -> torch.Tensor:
    """Columns spanning six decades and one massive value: blocks of every scale, some at the E4M3 clamp."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 256, generator=generator) * torch.logspace(-3, 3, 256)[torch.randperm(256, generator=generator)]
    x[3, 7] = 5e4
    return x
