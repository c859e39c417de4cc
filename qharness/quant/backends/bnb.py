"""bitsandbytes backend: LLM.int8() (Linear8bitLt with outlier decomposition) and NF4 (Linear4bit).

Both run on CPU in bitsandbytes >= 0.45 as well as on CUDA. NF4 uses blocks of 64 without double quantization
of the block scales, so its weights equal `sim`'s NF4 exactly. Its LLM.int8() is the scheme `llm-int8-bnb`, not
`llm-int8`: it keeps an outlier column's other entries in each row's scale (and tests |x| >= 6, not > 6), which
sim computes as that scheme within fp16 rounding (tests/quant/test_bnb.py); `llm-int8` stays the paper's rule, run
by sim on every device. bitsandbytes quantizes an Int8Params weight only when it moves *from the
CPU* to a device, so each module is built on the CPU and then moved, whatever the model's device.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from qharness.quant.backends import BACKENDS, Backend, Capability, QuantContext, everywhere, recipe
from qharness.quant.schemes import Keep, QuantScheme

if TYPE_CHECKING:
    from torch import nn


def _int8_linear(linear: nn.Linear, threshold: float) -> nn.Module:
    import torch
    from bitsandbytes.nn import Int8Params, Linear8bitLt

    _silence_fp16_cast_warning()
    module = Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          has_fp16_weights=False, threshold=threshold)
    # a weight already on CUDA would move without being quantized (Int8Params.to quantizes only from the CPU)
    module.weight = Int8Params(linear.weight.data.to("cpu", copy=True), requires_grad=False, has_fp16_weights=False)
    if linear.bias is not None:
        module.bias = torch.nn.Parameter(linear.bias.data.to("cpu", copy=True), requires_grad=False)
    return module.to(linear.weight.device)  # the move quantizes the weight


def _nf4_linear(linear: nn.Linear, blocksize: int) -> nn.Module:
    import torch
    from bitsandbytes.nn import Linear4bit, Params4bit

    module = Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                        compute_dtype=linear.weight.dtype, quant_type="nf4", compress_statistics=False)
    # built on the CPU like the int8 weight: Params4bit also quantizes on its first move to a device
    module.weight = Params4bit(linear.weight.data.to("cpu", copy=True), requires_grad=False, quant_type="nf4",
                               blocksize=blocksize, compress_statistics=False)
    if linear.bias is not None:
        module.bias = torch.nn.Parameter(linear.bias.data.to("cpu", copy=True), requires_grad=False)
    return module.to(linear.weight.device)


class _DropFp16CastNotice(logging.Filter):
    """bitsandbytes logs "inputs will be cast from <dtype> to float16" at WARNING on every LLM.int8() forward call
    of an fp32 or bf16 model (thousands of lines per evaluation). The cast is the method (int8 quantization of fp16
    activations, documented above), not a problem with the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def _silence_fp16_cast_warning() -> None:
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropFp16CastNotice) for f in logger.filters):
        logger.addFilter(_DropFp16CastNotice())


# scheme -> how to build one quantized Linear from a float one; a scheme missing here is an error, not NF4
BUILDERS: dict[str, Callable[[nn.Linear, QuantScheme], nn.Module]] = {
    "llm-int8-bnb": lambda linear, scheme: _int8_linear(linear, scheme.outlier_threshold or 0.0),
    "nf4": lambda linear, scheme: _nf4_linear(linear, scheme.weights.granularity.size),
}


def apply_bnb(model: nn.Module, scheme: QuantScheme, targets: dict[str, nn.Linear], keep: Keep,
              context: QuantContext) -> None:
    from qharness.quant.modules import swap_module

    build = recipe(BUILDERS, "bnb", scheme)
    for name, linear in targets.items():
        # in training mode bnb on CPU skips the int8 activations
        swap_module(model, name, build(linear, scheme).train(linear.training))


BACKENDS.add("bnb", Backend(
    name="bnb",
    description="bitsandbytes: LLM.int8() with fp16 outlier columns, NF4 (CPU and CUDA)",
    apply=apply_bnb,
    # NF4 on the CPU: bitsandbytes 0.50 repacks the weight at the first eval forward on an AVX512-BF16 CPU
    # (_convert_weight_packed_for_cpu), reshaping the block scales to (out, in // 64) and asserting out % 32 == 0: a
    # ragged width fails there, after quantization looked fine, so it is refused up front
    # LLM.int8() casts activations to fp16 on every device (MatMul8bitLt), so fp16's rounding is part of its output
    capabilities={"llm-int8-bnb": everywhere(computes_in="fp16"),
                  "nf4": (Capability("cpu", whole_groups=True, width_multiple=32), Capability("cuda"))},
    requires=("bitsandbytes",),
    preference=30,
))
