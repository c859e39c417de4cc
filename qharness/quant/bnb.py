"""bitsandbytes backend: LLM.int8() (Linear8bitLt with outlier decomposition) and NF4 (Linear4bit).

Both run on CPU in bitsandbytes >= 0.45 as well as on CUDA. NF4 uses blocks of 64 without double quantization
of the block scales, so its weights equal `sim`'s NF4 exactly; LLM.int8() matches `sim`'s `llm-int8` within
float rounding (tests/quant/test_bnb.py).
"""

from __future__ import annotations

from torch import nn

from qharness.quant.backend import BACKENDS, Backend, QuantContext
from qharness.quant.schemes import Keep, QuantScheme

SCHEMES_HERE = ("llm-int8", "nf4")


def _int8_linear(linear: nn.Linear, threshold: float) -> nn.Module:
    from bitsandbytes.nn import Int8Params, Linear8bitLt

    module = Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          has_fp16_weights=False, threshold=threshold)
    module.weight = Int8Params(linear.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    if linear.bias is not None:
        module.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return module.to(linear.weight.device)  # the move quantizes the weight


def _nf4_linear(linear: nn.Linear, blocksize: int) -> nn.Module:
    from bitsandbytes.nn import Linear4bit, Params4bit

    module = Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                        compute_dtype=linear.weight.dtype, quant_type="nf4", compress_statistics=False)
    module.weight = Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4",
                               blocksize=blocksize, compress_statistics=False)
    if linear.bias is not None:
        module.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return module.to(linear.weight.device)


def apply_bnb(model: nn.Module, scheme: QuantScheme, targets: dict[str, nn.Linear], keep: Keep,
              context: QuantContext) -> None:
    from qharness.quant.apply import swap_module

    for name, linear in targets.items():
        if scheme.name == "llm-int8":
            new = _int8_linear(linear, scheme.outlier_threshold or 0.0)
        else:
            new = _nf4_linear(linear, scheme.weights.granularity.size)
        swap_module(model, name, new.train(linear.training))  # in training mode bnb on CPU skips the int8 activations



BACKENDS.add("bnb", Backend(
    name="bnb",
    description="bitsandbytes: LLM.int8() with fp16 outlier columns, NF4 (CPU and CUDA)",
    apply=apply_bnb,
    requires=("bitsandbytes",),
    schemes=SCHEMES_HERE,
))
