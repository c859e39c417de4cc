"""torchao against `sim` where they implement the same math (CPU kernels)."""

import copy

import pytest
import torch
from agreement import layer_distances, logit_distances, relative

from qharness.quant.apply import quantize_
from qharness.quant.schemes import get_scheme

pytestmark = pytest.mark.needs("torchao")


def make_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # widths divisible by 128 so int4 g128 has no ragged group
    config = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


CPU_SCHEMES = ["fp8-e4m3-weight", "int4-weight-g128", "int4-weight-g128-tinygemm", "int8-weight-channel-halfspan",
               "int8-w8a8-token-halfspan"]


def quantized_pair(scheme: str):
    """(torchao model, sim model, unquantized model, target names) from one tiny model."""
    from qharness.quant.apply import target_linears

    fp = make_model()
    names = list(target_linears(fp))
    ao, sim = copy.deepcopy(fp), copy.deepcopy(fp)
    assert quantize_(ao, get_scheme(scheme), backend="torchao") == "torchao"
    quantize_(sim, get_scheme(scheme), backend="sim")
    return ao, sim, fp, names


# The same arithmetic (int8: the half-span scale amax/127.5 and x * (1 / s), which torchao computes; see
# quant/schemes.py), so every Linear, given the input its sim twin saw, agrees to float rounding: measured at most
# 1.1e-6 of the output's range, while quantization itself moves each layer by at least 5.0e-3 (int8 weights),
# 8.0e-3 (int8 W8A8), 2.0e-2 (fp8) and 7.4e-2 (int4). A wrong grid, granularity or an unquantized layer is >= 1e-3.
@pytest.mark.parametrize("scheme", CPU_SCHEMES)
def test_every_layer_computes_sims_arithmetic(scheme):
    ao, sim, fp, names = quantized_pair(scheme)
    ids = torch.randint(0, 300, (2, 16))
    distances = layer_distances(ao, sim, fp, names, ids)
    assert sorted(distances) == sorted(names)
    for name, d in distances.items():
        assert d.backend < 1e-5, (name, d)
        assert d.effect > 1e-3, (name, d)  # quantization moves every layer: the agreement above is not vacuous


# Weight-only: nothing is re-quantized between layers, so the logits agree too (measured: 0 for fp8 and int4, 7e-7
# for int8, against an effect of 1.0e-2 to 1.9e-1). W8A8 is held layer by layer only: at model level a 1e-7
# rounding difference flips an occasional activation code in a later layer, which moved these logits by 6e-3
# (40% of the effect) though every layer computes the same thing.
@pytest.mark.parametrize("scheme", [s for s in CPU_SCHEMES if get_scheme(s).activations is None])
def test_weight_only_logits_agree_with_sim(scheme):
    ao, sim, fp, _ = quantized_pair(scheme)
    d = logit_distances(ao, sim, fp, torch.randint(0, 300, (2, 16)))
    assert d.backend <= 1e-3 * d.effect, d


@pytest.mark.parametrize("scheme", ["int8-weight-channel", "int8-w8a8-token"])
def test_int8_under_sims_amax_over_127_is_not_what_torchao_computes(scheme):
    """torchao's int8 grid is amax/127.5; asked for the amax/127 scheme by name it refuses, and auto on CPU runs
    sim, so a row named int8-weight-channel is never torchao's other grid. The two grids are not close enough to
    share a name: torchao's logits are further from amax/127 sim than the unquantized model is (0.0152 vs 0.0118)."""
    from qharness.core.errors import BackendUnavailable

    model = make_model()
    with pytest.raises(BackendUnavailable, match=rf"^backend 'torchao' does not implement scheme '{scheme}'; its "
                                                 r"backends: (quanto, )?sim$"):
        quantize_(model, get_scheme(scheme), backend="torchao")
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    halfspan, sim, fp, _ = quantized_pair(f"{scheme}-halfspan")
    plain = copy.deepcopy(fp)
    quantize_(plain, get_scheme(scheme), backend="sim")
    d = logit_distances(halfspan, plain, fp, torch.randint(0, 300, (2, 16)))
    assert d.backend > 0.5 * d.effect, d  # the other grid is a different scheme, not a rounding difference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sim_tinygemm_is_bit_equal_to_torchaos_tinygemm_primitives(dtype):
    """What the CUDA int4 kernel stores (torchao's own quantize/dequantize), against sim on a 256 x 1024 weight with one
    x40 input channel; the integer-zero-point scheme is far from it there, which is why they are two schemes."""
    from torchao.quantization.quant_primitives import (
        MappingType,
        _choose_qparams_affine_tinygemm,
        _dequantize_affine_tinygemm,
        _quantize_affine_tinygemm,
    )

    from qharness.quant.sim import fake_quantize

    torch.manual_seed(0)
    weight = torch.randn(256, 1024)
    weight[:, 7] *= 40
    weight = weight.to(dtype)
    block = (1, 128)
    scale, zero = _choose_qparams_affine_tinygemm(weight, MappingType.ASYMMETRIC, block, torch.int32, 0, 15,
                                                  scale_dtype=dtype, zero_point_dtype=dtype)
    codes = _quantize_affine_tinygemm(weight, block, scale, zero, torch.int32, 0, 15)
    kernel_weight = _dequantize_affine_tinygemm(codes, block, scale, zero, torch.int32, 0, 15, output_dtype=dtype)
    assert torch.equal(fake_quantize(weight, get_scheme("int4-weight-g128-tinygemm").weights), kernel_weight)
    integer = fake_quantize(weight, get_scheme("int4-weight-g128").weights)
    assert (integer.float() - kernel_weight.float()).abs().max() > 0.02 * weight.float().abs().max()


def test_ragged_int4_groups_point_to_sim(tiny_model):
    from qharness.core.errors import BackendUnavailable

    # torchao 0.18 would leave such a Linear in full precision (logged at INFO) and the row would lie
    with pytest.raises(BackendUnavailable, match=r"^backend 'torchao' runs 'int4-weight-g128' on input widths "
                                                 r"divisible by 128; model.layers.0.self_attn.q_proj has 64; "
                                                 r"use --backend sim"):
        quantize_(tiny_model, get_scheme("int4"), backend="torchao")
    assert type(tiny_model.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # refused before any swap


def test_cuda_int4_uses_the_built_in_tinygemm_packing():
    from torchao.quantization import Int4WeightOnlyConfig, IntxWeightOnlyConfig
    from torchao.quantization.quantize_.workflows import Int4PackingFormat

    from qharness.quant.backends.torchao import torchao_config

    # the default (PLAIN) packing imports the mslk package, which nothing here installs
    config = torchao_config(get_scheme("int4-weight-g128-tinygemm"), torch.device("cuda"))
    assert isinstance(config, Int4WeightOnlyConfig)
    assert config.int4_packing_format == Int4PackingFormat.TILE_PACKED_TO_4D and config.group_size == 128
    # the integer-zero-point scheme is never handed to tinygemm, on any device
    assert isinstance(torchao_config(get_scheme("int4"), torch.device("cuda")), IntxWeightOnlyConfig)


def compare_on_cuda(scheme: str, dtype: torch.dtype) -> tuple[float, bool]:
    """(max |torchao - sim| / max |sim| over the logits, whether torchao changed them at all) on CUDA."""
    model = make_model().to("cuda", dtype)
    sim_model = copy.deepcopy(model)
    ids = torch.randint(0, 300, (2, 16), device="cuda")
    with torch.inference_mode():
        reference = model(ids).logits.float()
        assert quantize_(model, get_scheme(scheme), backend="torchao") == "torchao"
        quantize_(sim_model, get_scheme(scheme), backend="sim")
        ao, sim = model(ids).logits.float(), sim_model(ids).logits.float()
    assert torch.isfinite(ao).all()
    return ((ao - sim).abs().max() / sim.abs().max()).item(), not torch.allclose(ao, reference, atol=1e-6)


# Every kernel declared on CUDA against sim: tests/quant/test_cuda_agreement.py, from the capability tables.


# Not yet run anywhere (no Blackwell GPU here): the tolerances are bf16's, as above, with room for bf16 rounding of
# an activation to flip the occasional FP4 code
@pytest.mark.gpu
@pytest.mark.parametrize(("scheme", "tolerance"), [("mxfp8-w8a8", 0.03), ("mxfp4-w4a4", 0.1), ("nvfp4-w4a4", 0.1)])
def test_blackwell_block_scaled_kernels_agree_with_sim(scheme, tolerance):
    if torch.cuda.get_device_capability() < (10, 0):
        pytest.skip("block-scaled _scaled_mm needs compute capability >= 10.0 (Blackwell)")
    error, changed = compare_on_cuda(scheme, torch.bfloat16)
    assert error < tolerance, error
    assert changed


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", ["mxfp8-w8a8", "mxfp4-w4a4", "nvfp4-w4a4"])
def test_cuda_before_blackwell_refuses_block_scaled_kernels_in_one_line_and_auto_runs_sim(scheme):
    """An H100/H200 is compute capability 9.0: torchao would quantize the weights and then fail in the first
    _scaled_mm (MX) or assert is_sm_at_least_100 (NVFP4), so torchao is refused by name and auto falls back."""
    from qharness.core.errors import BackendUnavailable

    if torch.cuda.get_device_capability() >= (10, 0):
        pytest.skip("on Blackwell torchao runs these (test_blackwell_block_scaled_kernels_agree_with_sim)")
    model = make_model().to("cuda", torch.bfloat16)
    with pytest.raises(BackendUnavailable, match=rf"^backend 'torchao' runs '{scheme}' on cuda with compute "
                                                 r"capability >= 10\.0, not \d+\.\d+; use --backend sim") as caught:
        quantize_(model, get_scheme(scheme), backend="torchao")
    assert "\n" not in str(caught.value)
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # refused before any swap
    assert quantize_(model, get_scheme(scheme)) == "sim"
    with torch.inference_mode():
        assert torch.isfinite(model(torch.randint(0, 300, (2, 16), device="cuda")).logits).all()


@pytest.mark.gpu
def test_cuda_refusals_and_the_auto_fallback(tiny_model):
    from qharness.core.errors import BackendUnavailable

    fp32 = make_model().to("cuda")
    tinygemm = get_scheme("int4-weight-g128-tinygemm")
    with pytest.raises(BackendUnavailable, match="in bf16 only, not fp32; pass --dtype bf16"):
        quantize_(fp32, tinygemm, backend="torchao")
    assert quantize_(fp32, tinygemm) == "sim"  # auto: tinygemm declines fp32, sim runs it
    assert quantize_(make_model().to("cuda"), get_scheme("int4")) == "torchao"  # integer zero point: any dtype
    with pytest.raises(BackendUnavailable, match="'fp8-e4m3-w8a8-token' on cuda in bf16 only, not fp16"):
        quantize_(make_model().to("cuda", torch.float16), get_scheme("fp8-e4m3-w8a8-token"), backend="torchao")
    ragged = tiny_model.to("cuda", torch.bfloat16)  # hidden 64: no whole group of 128
    assert quantize_(ragged, get_scheme("int4")) == "sim"


def test_nvfp4_weight_only_recipe_matches_sim_when_run_on_cpu():
    """Declared for CUDA only (on CPU it is no kernel, just torchao's emulation), but the recipe is pure torch, so
    its numerics are checked here: weights bit-equal to sim's, hence the same logits."""
    from qharness.quant.apply import target_linears
    from qharness.quant.backends import QuantContext
    from qharness.quant.backends.torchao import apply_torchao

    model = make_model()
    sim_model = copy.deepcopy(model)
    ids = torch.randint(0, 300, (2, 16))
    scheme = get_scheme("nvfp4-weight")
    with torch.inference_mode():
        reference = model(ids).logits
        apply_torchao(model, scheme, target_linears(model), None, QuantContext(torch.device("cpu")))
        quantize_(sim_model, scheme, backend="sim")
        ao, sim = model(ids).logits, sim_model(ids).logits
    assert relative(ao, sim) <= 1e-3 * relative(reference, sim)  # measured: 0 against NVFP4's own 0.19


def test_mx_recipes_use_the_ocp_floor_scale_that_sim_implements():
    from torchao.prototype.mx_formats import MXDynamicActivationMXWeightConfig, ScaleCalculationMode

    from qharness.quant.backends.torchao import torchao_config

    for name, dtype in (("mxfp8-w8a8", torch.float8_e4m3fn), ("mxfp4-w4a4", torch.float4_e2m1fn_x2)):
        config = torchao_config(get_scheme(name), torch.device("cuda"))
        assert isinstance(config, MXDynamicActivationMXWeightConfig)
        assert config.scaling_mode == ScaleCalculationMode.FLOOR  # torchao's default, RCEIL, rounds the scale up
        assert (config.block_size, config.weight_dtype, config.activation_dtype) == (32, dtype, dtype)
