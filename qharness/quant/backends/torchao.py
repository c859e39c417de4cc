"""torchao backend: real int8 / int4 / fp8 kernels through `torchao.quantization.quantize_`.

On CPU: int8 weight-only, int8 dynamic W8A8, int4 grouped weight-only, fp8 weight-only.
On CUDA: the same plus fp8 dynamic W8A8 (compute capability >= 8.9).
Each entry of `SCHEMES_HERE` names the sim scheme whose arithmetic the library computes, never a near one:
- `int4-weight-g128` (integer zero point, range holding 0) is torchao's IntxWeightOnly: dequantize + matmul, the
  same numbers as sim on any device in fp32 (in bf16 it computes its scales in bf16: refused, sim runs it), and no
  faster than the fp matmul (0.50x bf16's decode on an H200).
- `int4-weight-g128-tinygemm` is the fast tinygemm kernel, which computes something else: a float zero point, each
  group's own min..max, scale and zero stored in bf16. On a weight with one x40 input channel its output is 0.3
  relative away from `int4-weight-g128` (measured, torchao's own primitives), so it has a sim scheme of its own,
  bit-equal to torchao's primitives (tests/quant/test_torchao.py), and on CPU torchao's tinygemm twin runs it.
- torchao's int8 scales by amax/127.5 (choose_qparams_affine, SYMMETRIC: the whole code span -128..127), not by
  amax/127 as `int8-weight-channel` / `int8-w8a8-token` (and bitsandbytes) do, so torchao runs only the schemes that
  name its arithmetic, `int8-weight-channel-halfspan` and `int8-w8a8-token-halfspan` (quant/schemes.py), which sim
  also runs and the tests hold torchao to; `--backend torchao --quant int8` is refused rather than computing a
  different scheme than the row's name says.

Limits read from torchao 0.18's source, declared in `SCHEMES_HERE` so `check` refuses before any weight moves:
- tinygemm on CUDA: Int4WeightOnlyConfig's default packing (PLAIN, version 2) runs on the `mslk` package, which we
  do not install; the tinygemm packing (`tile_packed_to_4d`) is built in but takes bfloat16 weights only and needs
  compute capability >= 8.0 (Int4TilePackedTo4dTensor.from_hp).
- int4 and fp8 W8A8 leave a Linear in full precision, logging at INFO only, when its input width is not a whole
  number of groups (int4) or a width is not a multiple of 16 (fp8 `_scaled_mm`): the model is refused instead.
- fp8 W8A8 per row (`fp8-e4m3-w8a8-token`) asserts bfloat16 weights; both fp8 W8A8 need compute capability >= 8.9.
- MX and NVFP4 W8A8/W4A4 (torchao.prototype.mx_formats) multiply in `torch._scaled_mm` / `F.scaled_mm` with block
  scales, which needs compute capability >= 10.0 (Blackwell) and NVFP4's input widths in multiples of 32 (the
  packed operand's bytes in multiples of 16); MX asserts bfloat16 weights. MX is configured with
  the OCP floor scale rule (torchao's default is RCEIL) so it does sim's arithmetic. NVFP4 weight-only stores
  packed FP4 and dequantizes before an ordinary matmul: no FP4 kernel, any CUDA device. Declared for CUDA only:
  CPU runs the same prototype code as emulation, which is what sim is. These rows were read from the source and
  their quantizers checked bit-exact against sim on CPU (tests/quant/test_torchao.py); none has been run on a
  Blackwell GPU here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from qharness.quant.backends import BACKENDS, Backend, Capability, QuantContext, everywhere, recipe
from qharness.quant.schemes import Keep, QuantScheme

if TYPE_CHECKING:
    import torch
    from torch import nn

FP8_MM = dict(min_compute=(8, 9), width_multiple=16)  # torch._scaled_mm on CUDA
# Float8Tensor records a per-tensor scale's block as the weight's whole shape, and its matmul tells block-scaled
# weights by that shape alone (float8_tensor.py: _is_128_128_scaled), so a 128x128 weight asserts "input_tensor must
# be 1x128 scaled" mid-run (seen on an H200)
SQUARE_128 = (128, 128)
MISREAD_128 = "torchao 0.18 reads its per-tensor scale as a 128x128 block scale and fails in the first matmul"


def _int8_weight_only(scheme: QuantScheme, device: torch.device) -> Any:
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig()


def _int8_dynamic(scheme: QuantScheme, device: torch.device) -> Any:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    return Int8DynamicActivationInt8WeightConfig()


def _int4_integer_zero(scheme: QuantScheme, device: torch.device) -> Any:
    """sim's int4-weight-g128 exactly (integer zero point): torchao dequantizes and multiplies, on any device."""
    import torch
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quant_primitives import MappingType

    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(scheme.weights.granularity.size),
                                mapping_type=MappingType.ASYMMETRIC)


def _int4_tinygemm(scheme: QuantScheme, device: torch.device) -> Any:
    """The tinygemm int4 kernels (float zero point): `_weight_int4pack_mm` on CUDA, its CPU twin
    `_weight_int4pack_mm_for_cpu` (torchao's prototype Int4OpaqueTensor) on CPU, so CI checks the same arithmetic."""
    group_size = scheme.weights.granularity.size
    if device.type == "cuda":
        from torchao.quantization import Int4WeightOnlyConfig
        from torchao.quantization.quantize_.workflows import Int4PackingFormat

        return Int4WeightOnlyConfig(group_size=group_size, int4_packing_format=Int4PackingFormat.TILE_PACKED_TO_4D)
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

    return PrototypeInt4WeightOnlyConfig(group_size=group_size, set_inductor_config=False)


def _fp8_weight_only(scheme: QuantScheme, device: torch.device) -> Any:
    from torchao.quantization import Float8WeightOnlyConfig

    return Float8WeightOnlyConfig()


def _fp8_dynamic(granularity: str) -> Callable[[QuantScheme, torch.device], Any]:
    def config(scheme: QuantScheme, device: torch.device) -> Any:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor

        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow() if granularity == "row" else PerTensor())

    return config


def _mx_dynamic(scheme: QuantScheme, device: torch.device) -> Any:
    import torch
    from torchao.prototype.mx_formats import MXDynamicActivationMXWeightConfig, ScaleCalculationMode

    dtype = torch.float8_e4m3fn if scheme.weights.format == "fp8_e4m3" else torch.float4_e2m1fn_x2
    return MXDynamicActivationMXWeightConfig(block_size=scheme.weights.granularity.size, activation_dtype=dtype,
                                             weight_dtype=dtype, scaling_mode=ScaleCalculationMode.FLOOR)


def _nvfp4_dynamic(scheme: QuantScheme, device: torch.device) -> Any:
    from torchao.prototype.mx_formats import NVFP4DynamicActivationNVFP4WeightConfig

    # the fused activation kernel lives in the mslk package, which we do not install
    return NVFP4DynamicActivationNVFP4WeightConfig(use_triton_kernel=False, use_dynamic_per_tensor_scale=True)


def _nvfp4_weight_only(scheme: QuantScheme, device: torch.device) -> Any:
    from torchao.prototype.mx_formats import NVFP4WeightOnlyConfig

    return NVFP4WeightOnlyConfig(use_dynamic_per_tensor_scale=True)


BLOCK_MM = dict(min_compute=(10, 0), whole_groups=True, width_multiple=16)  # block-scaled _scaled_mm

# scheme -> (where and how it runs, the torchao config that runs it): the one table for this backend
SCHEMES_HERE: dict[str, tuple[tuple[Capability, ...], Callable[[QuantScheme, torch.device], Any]]] = {
    "int8-weight-channel-halfspan": (everywhere(), _int8_weight_only),  # amax/127.5: not int8-weight-channel
    "int8-w8a8-token-halfspan": (everywhere(), _int8_dynamic),
    # fp32 only: in bf16 torchao computes the scale and zero point in bf16 (sim in fp32), and on an H200 that put its
    # logits 5.3e-2 from sim's (a third of int4's own effect, twice bf16's noise); in fp32 it is sim exactly
    "int4-weight-g128": (everywhere(whole_groups=True, dtypes=("fp32",)), _int4_integer_zero),
    "int4-weight-g128-tinygemm": ((Capability("cpu", whole_groups=True),
                                   Capability("cuda", dtypes=("bf16",), min_compute=(8, 0), whole_groups=True)),
                                  _int4_tinygemm),
    "fp8-e4m3-weight": (everywhere(), _fp8_weight_only),
    "fp8-e4m3-w8a8-tensor": ((Capability("cuda", not_shape=(SQUARE_128, MISREAD_128), **FP8_MM),),
                             _fp8_dynamic("tensor")),
    "fp8-e4m3-w8a8-token": ((Capability("cuda", dtypes=("bf16",), **FP8_MM),), _fp8_dynamic("row")),
    "mxfp8-w8a8": ((Capability("cuda", dtypes=("bf16",), **BLOCK_MM),), _mx_dynamic),
    "mxfp4-w4a4": ((Capability("cuda", dtypes=("bf16",), **BLOCK_MM),), _mx_dynamic),
    # _scaled_mm wants the packed FP4 operand's width, 2 values a byte, in multiples of 16 bytes (torch 2.13's
    # _check_scaled_mm_sizes: self.size(1) % 16): 32 values, two NVFP4 blocks (MXFP4's block of 32 is enough)
    "nvfp4-w4a4": ((Capability("cuda", dtypes=("bf16",), input_multiple=32, **BLOCK_MM),), _nvfp4_dynamic),
    "nvfp4-weight": ((Capability("cuda", dtypes=("bf16", "fp32"), width_multiple=16),), _nvfp4_weight_only),
}


def torchao_config(scheme: QuantScheme, device: torch.device) -> Any:
    return recipe(SCHEMES_HERE, "torchao", scheme)[1](scheme, device)


def apply_torchao(model: nn.Module, scheme: QuantScheme, targets: dict[str, nn.Linear], keep: Keep,
                  context: QuantContext) -> None:
    from torchao.quantization import quantize_ as torchao_quantize_

    names = set(targets)
    torchao_quantize_(model, torchao_config(scheme, context.device), filter_fn=lambda module, fqn: fqn in names)


BACKENDS.add("torchao", Backend(
    name="torchao",
    description="torchao kernels: int8 weight-only / dynamic W8A8, int4 g128 (integer or tinygemm zero point), fp8 "
                "(fp8 W8A8 on CUDA >= 8.9)",
    apply=apply_torchao,
    capabilities={name: caps for name, (caps, _) in SCHEMES_HERE.items()},
    requires=("torchao",),
    preference=20,
))
