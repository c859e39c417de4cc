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
        ("int4-weight-g128-tinygemm", 1e-5),  # tinygemm's CPU kernel: identical arithmetic, 1.6e-6 measured
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
    from qharness.errors import BackendUnavailable

    # torchao 0.18 would leave such a Linear in full precision (logged at INFO) and the row would lie
    with pytest.raises(BackendUnavailable, match=r"^backend 'torchao' runs 'int4-weight-g128' on input widths "
                                                 r"divisible by 128; model.layers.0.self_attn.q_proj has 64; "
                                                 r"use --backend sim"):
        quantize_(tiny_model, get_scheme("int4"), backend="torchao")
    assert type(tiny_model.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # refused before any swap


def test_cuda_int4_uses_the_built_in_tinygemm_packing():
    from torchao.quantization import Int4WeightOnlyConfig, IntxWeightOnlyConfig
    from torchao.quantization.quantize_.workflows import Int4PackingFormat

    from qharness.quant.torchao import torchao_config

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
    from qharness.errors import BackendUnavailable

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
    from qharness.errors import BackendUnavailable

    fp32 = make_model().to("cuda")
    with pytest.raises(BackendUnavailable, match="in bf16 only, not fp32; pass --dtype bf16"):
        quantize_(fp32, get_scheme("int4"), backend="torchao")
    assert quantize_(fp32, get_scheme("int4")) == "sim"  # auto: tinygemm declines fp32, sim runs it
    with pytest.raises(BackendUnavailable, match="'fp8-e4m3-w8a8-token' on cuda in bf16 only, not fp16"):
        quantize_(make_model().to("cuda", torch.float16), get_scheme("fp8-e4m3-w8a8-token"), backend="torchao")
    ragged = tiny_model.to("cuda", torch.bfloat16)  # hidden 64: no whole group of 128
    assert quantize_(ragged, get_scheme("int4")) == "sim"


def test_nvfp4_weight_only_recipe_matches_sim_when_run_on_cpu():
    """Declared for CUDA only (on CPU it is no kernel, just torchao's emulation), but the recipe is pure torch, so
    its numerics are checked here: weights bit-equal to sim's, hence the same logits."""
    from qharness.quant.apply import target_linears
    from qharness.quant.backend import QuantContext
    from qharness.quant.torchao import apply_torchao

    model = make_model()
    sim_model = copy.deepcopy(model)
    ids = torch.randint(0, 300, (2, 16))
    scheme = get_scheme("nvfp4-weight")
    with torch.inference_mode():
        reference = model(ids).logits
        apply_torchao(model, scheme, target_linears(model), None, QuantContext(torch.device("cpu")))
        quantize_(sim_model, scheme, backend="sim")
        ao, sim = model(ids).logits, sim_model(ids).logits
    assert torch.allclose(ao, sim, rtol=0, atol=1e-5)
    assert not torch.allclose(ao, reference, atol=1e-3)  # it did quantize


def test_mx_recipes_use_the_ocp_floor_scale_that_sim_implements():
    from torchao.prototype.mx_formats import MXDynamicActivationMXWeightConfig, ScaleCalculationMode

    from qharness.quant.torchao import torchao_config

    for name, dtype in (("mxfp8-w8a8", torch.float8_e4m3fn), ("mxfp4-w4a4", torch.float4_e2m1fn_x2)):
        config = torchao_config(get_scheme(name), torch.device("cuda"))
        assert isinstance(config, MXDynamicActivationMXWeightConfig)
        assert config.scaling_mode == ScaleCalculationMode.FLOOR  # torchao's default, RCEIL, rounds the scale up
        assert (config.block_size, config.weight_dtype, config.activation_dtype) == (32, dtype, dtype)
