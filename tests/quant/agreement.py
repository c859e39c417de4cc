"""How far a library backend is from `sim`, measured against how far quantization itself moves the numbers.

A backend-vs-sim test that only bounds |backend - sim| passes whenever the bound exceeds the quantization's own
effect: an unquantized model would pass it. So every comparison here returns both distances on the same inputs,
|backend - sim| and |fp - sim|, and the tests assert the first is a small fraction of the second.

Layer by layer (`layer_distances`): each quantized Linear gets the input its sim twin saw in the sim model's forward
pass, so one layer's float rounding cannot flip an activation code in the next (at model level one such flip in an
8-bit per-token activation moves a tiny random model's logits by ~5e-4 of their range, and later layers amplify it).
Where the arithmetic is the same, each layer must then agree to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qharness.quant.agreement import linear_inputs


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the distance the suite uses for logits."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max()).item()


@dataclass(frozen=True)
class Distances:
    backend: float  # |backend - sim| / max |sim|
    effect: float  # |fp - sim| / max |sim|: what the quantization itself changes

    @property
    def ratio(self) -> float:
        return self.backend / self.effect


def logit_distances(backend_model: nn.Module, sim_model: nn.Module, fp_model: nn.Module,
                    ids: torch.Tensor) -> Distances:
    with torch.inference_mode():
        sim = sim_model(ids).logits
        return Distances(relative(backend_model(ids).logits, sim), relative(fp_model(ids).logits, sim))


def layer_distances(backend_model: nn.Module, sim_model: nn.Module, fp_model: nn.Module, names: list[str],
                    ids: torch.Tensor) -> dict[str, Distances]:
    """Per named Linear, the distances of its output on the input the sim model fed it."""
    inputs = linear_inputs(sim_model, names, ids)
    backend, sim, fp = (dict(m.named_modules()) for m in (backend_model, sim_model, fp_model))
    dtype = next(p for p in backend_model.parameters() if p.is_floating_point()).dtype  # sim may run in fp16
    with torch.inference_mode():
        return {name: Distances(relative(backend[name](x.to(dtype)), sim[name](x)), relative(fp[name](x), sim[name](x)))
                for name, x in inputs.items()}
