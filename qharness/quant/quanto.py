"""optimum-quanto backend: int8 and fp8 weights, and int8 W8A8 with static per-tensor activation scales.

quanto calibrates activation scales inside a `Calibration` context and freezes them; we feed it all calibration
sequences as one batch with momentum 0, so its scale is the calibration max, exactly `sim`'s minmax observer. Its
weight-only int8, fp8 and static W8A8 then agree with `sim` to float rounding (tests/quant/test_quanto.py).
quanto's int4 picks its scales by an optimizer, not round-to-nearest, so it is not offered for our int4 scheme.

fp8 weights on CUDA: for an fp16 / bf16 model on compute capability >= 8.0, quanto 0.2.7 routes them to its Marlin
fp8 kernel, which `torch.utils.cpp_extension.load` compiles at first use (nvcc, ninja, a C++ compiler); without
them the first forward fails deep inside the build, so `check` refuses up front. (An fp32 model would take the
plain path, but we do not carve that case out: fp32 on CUDA is not what anyone runs.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qharness.quant.backend import BACKENDS, Backend, Capability, QuantContext, everywhere, recipe
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
    import torch
    from optimum.quanto import Calibration, freeze, quantize

    _, weights, activations = recipe(SCHEMES_HERE, "quanto", scheme)
    quantize(model, weights=getattr(optimum.quanto, weights),
             activations=getattr(optimum.quanto, activations) if activations else None, include=list(targets))
    if activations is not None:
        batches = context.calibration_batches(scheme.name)
        with torch.inference_mode(), Calibration(momentum=0.0):
            model(input_ids=torch.cat(batches))
    freeze(model)


BACKENDS.add("quanto", Backend(
    name="quanto",
    description="optimum-quanto: int8 / fp8 weights, int8 W8A8 with calibrated per-tensor scales (CPU and CUDA)",
    apply=apply_quanto,
    capabilities={name: caps for name, (caps, _, _) in SCHEMES_HERE.items()},
    requires=("optimum.quanto",),
    preference=10,
))
