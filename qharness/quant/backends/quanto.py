"""optimum-quanto backend: int8 and fp8 weights, and int8 W8A8 with static per-tensor activation scales.

Static W8A8: quanto's own `Calibration` context runs a different forward pass from sim's observer. It quantizes
every QLinear's input with the batch's own per-tensor scale and its output too (until it decides no QLinear reads
that output), so each later layer is calibrated on int8-rounded activations, where sim observes fp activations
through quantized weights; through a 2-layer model that moved the calibrated scales enough that one layer's output
was as far from sim's as from the unquantized layer's (tests/quant/test_quanto.py). So the scales are observed
here as sim observes them (max |x| of each input, activations in fp, weights quantized) and handed to quanto as
its `input_scale` (amax / 127, its absmax_scale for qint8); quanto's kernels do the rest. Its weight-only int8,
fp8 and static W8A8 then agree with `sim` layer by layer to float rounding.
quanto's int4 picks its scales by an optimizer, not round-to-nearest, so it is not offered for our int4 scheme.

fp8 weights on CUDA: for an fp16 / bf16 model on compute capability >= 8.0, quanto 0.2.7 routes them to its Marlin
fp8 kernel, which `torch.utils.cpp_extension.load` compiles at first use (nvcc, ninja, a C++ compiler); without
them the first forward fails deep inside the build, so `check` refuses up front. (An fp32 model would take the
plain path, but we do not carve that case out: fp32 on CUDA is not what anyone runs.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qharness.core.errors import QHarnessError
from qharness.quant.backends import BACKENDS, Backend, Capability, QuantContext, everywhere, recipe
from qharness.quant.schemes import Keep, QuantScheme

if TYPE_CHECKING:
    from torch import nn

# seen on an H200: the first fp8 run had not finished building after 90 s
MARLIN = "quanto's Marlin fp8 kernel, typically several minutes, over 90 s on an H200"

# scheme -> (where it runs, quanto's weight qtype, its activation qtype or None): the one table for this backend
SCHEMES_HERE: dict[str, tuple[tuple[Capability, ...], str, str | None]] = {
    "int8-weight-channel": (everywhere(), "qint8", None),
    "fp8-e4m3-weight": ((Capability("cpu"), Capability("cuda", needs=("nvcc", "ninja", "c++"), build_note=MARLIN)),
                        "qfloat8", None),
    "int8-w8a8-tensor-static": (everywhere(), "qint8", "qint8"),
}


def apply_quanto(model: nn.Module, scheme: QuantScheme, targets: dict[str, nn.Linear], keep: Keep,
                 context: QuantContext) -> None:
    import optimum.quanto
    from optimum.quanto import freeze, quantize

    _, weights, activations = recipe(SCHEMES_HERE, "quanto", scheme)
    quantize(model, weights=getattr(optimum.quanto, weights),
             activations=getattr(optimum.quanto, activations) if activations else None, include=list(targets))
    if activations is not None:
        modules = [module for name, module in model.named_modules() if name in targets]
        _calibrate_as_sim(model, modules, context.calibration_batches(scheme.name))
    freeze(model)


def _calibrate_as_sim(model: nn.Module, modules: list[nn.Module], batches: list) -> None:
    """sim's minmax observer for quanto's QLinears: their static input scale is amax / 127 of the inputs they see
    with activations unquantized. quanto keeps its quantization hooks in `_quantize_hooks` (0.2.7); the input hook is
    lifted for the pass and put back, the output one dropped (outputs stay in fp, as in sim)."""
    import torch

    amax: dict[nn.Module, torch.Tensor] = {}

    def observe(module: nn.Module, args: tuple) -> None:
        seen = args[0].detach().abs().max().float()
        amax[module] = torch.maximum(amax[module], seen) if module in amax else seen

    for module in modules:
        module._quantize_hooks.pop("input").remove()
        module._quantize_hooks.pop("output").remove()
    handles = [module.register_forward_pre_hook(observe) for module in modules]
    try:
        with torch.inference_mode():
            for input_ids in batches:
                model(input_ids=input_ids)
    finally:
        for handle in handles:
            handle.remove()
        for module in modules:
            module._quantize_hooks["input"] = module.register_forward_pre_hook(module.quantize_input)
    for module in modules:
        if module not in amax:
            raise QHarnessError(f"calibration never reached a '{type(module).__name__}' layer; is the data empty?")
        module.input_scale = (amax[module] / 127).to(module.input_scale.dtype)  # quanto's absmax_scale, qint8


BACKENDS.add("quanto", Backend(
    name="quanto",
    description="optimum-quanto: int8 / fp8 weights, int8 W8A8 with calibrated per-tensor scales (CPU and CUDA)",
    apply=apply_quanto,
    capabilities={name: caps for name, (caps, _, _) in SCHEMES_HERE.items()},
    requires=("optimum.quanto",),
    preference=10,
))
