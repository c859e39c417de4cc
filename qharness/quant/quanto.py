"""optimum-quanto backend: int8 and fp8 weights, and int8 W8A8 with static per-tensor activation scales.

quanto calibrates activation scales inside a `Calibration` context and freezes them; we feed it all calibration
sequences as one batch with momentum 0, so its scale is the calibration max, exactly `sim`'s minmax observer. Its
weight-only int8, fp8 and static W8A8 then agree with `sim` to float rounding (tests/quant/test_quanto.py).
quanto's int4 picks its scales by an optimizer, not round-to-nearest, so it is not offered for our int4 scheme.
"""

from __future__ import annotations

import torch
from torch import nn

from qharness.quant.backend import BACKENDS, Backend, QuantContext
from qharness.quant.schemes import Keep, QuantScheme

SCHEMES_HERE = ("int8-weight-channel", "fp8-e4m3-weight", "int8-w8a8-tensor-static")


def apply_quanto(model: nn.Module, scheme: QuantScheme, targets: dict[str, nn.Linear], keep: Keep,
                 context: QuantContext) -> None:
    from optimum.quanto import Calibration, freeze, qfloat8, qint8, quantize

    weights = qfloat8 if scheme.weights.format == "fp8_e4m3" else qint8
    activations = qint8 if scheme.activations is not None else None
    quantize(model, weights=weights, activations=activations, include=list(targets))
    if activations is not None:
        batches = context.calibration_batches(scheme.name)
        with torch.inference_mode(), Calibration(momentum=0.0):
            model(input_ids=torch.cat(batches))
    freeze(model)



BACKENDS.add("quanto", Backend(
    name="quanto",
    description="optimum-quanto: int8 / fp8 weights, int8 W8A8 with calibrated per-tensor scales (CPU and CUDA)",
    apply=apply_quanto,
    requires=("optimum.quanto",),
    schemes=SCHEMES_HERE,
))
