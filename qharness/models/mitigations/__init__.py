"""Training-time mitigations of massive activations, one file each, registered by name.

A mitigation changes one place, declared as data in a `Mitigation`: `build` changes the architecture before
training (DyT replaces the norms, KV bias adds k' and v'), `init` sets the starting weights (TVR's
layer-index-rescaled init), `after_step` runs after each optimizer step (TVR's rescale). A spec names one or
several joined by '+' ("tvr+kv_bias"); "none" is the baseline. A loss-side mitigation (outlier_penalty, lp_penalty)
declares `penalty` instead, a term added to the training loss, and the names of its settings (`--penalty-NAME`).

Every mitigation module imports torch inside its functions only, so `qharness list mitigations` reads this registry
without loading torch (tests/test_imports.py checks it); the modules it installs (DyT, the attention parts) live in
qharness/models/norms.py and qharness/models/attention.py.

Persistence: `build_` writes the spec to `config.qharness_mitigation`, so `save_pretrained` records it; our loader
(qharness.models.sources) reads it back, builds the same modules and then loads the weights. Plain
`AutoModelForCausalLM.from_pretrained` would drop the extra parameters, and nothing here needs remote code.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qharness.core.errors import ConfigError
from qharness.core.registry import Registry

CONFIG_KEY = "qharness_mitigation"
NONE = "none"


@dataclass(frozen=True)
class Mitigation:
    name: str
    description: str
    reference: str
    build: Callable[[Any], Any] | None = None  # (model) -> None: change the architecture in place
    init: Callable[[Any], Any] | None = None  # (model) -> None: starting weights
    after_step: Callable[[Any, int], Any] | None = None  # (model, step) -> None: after each optimizer step
    # (settings dict or None) -> a penalty with attached(model) and take(): a term added to the training loss
    penalty: Callable[[dict[str, float] | None], Any] | None = None
    settings: tuple[str, ...] = ()  # the penalty's settings, each a `--penalty-NAME` flag (e.g. "strength")
    # whether it can be added to a trained model without changing the function it computes (train --from)
    preserves_function: bool = False
    # (model, calibration input ids) -> None: add it to a trained model in place of `build`, so the function changes
    # as little as it can (train --from measures and records how much it still does); None: it cannot be added
    retrofit: Callable[[Any, list[Any]], Any] | None = None
    # (model) -> the parameters distilled to the original model's logits after the retrofit, before continued
    # training (training/distill.py), for a retrofit that cannot keep the function; None: no distillation
    distill: Callable[[Any], list[Any]] | None = None
    # how the retrofit (and distillation) adds it, when that changed after models were trained with an earlier way:
    # part of a continued-training recipe's digest when set, so those models are not read as the new way's
    version: str = ""


MITIGATIONS: Registry[Mitigation] = Registry("mitigation")


def load_mitigations() -> Registry[Mitigation]:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    return MITIGATIONS


def resolve(spec: str) -> list[Mitigation]:
    """'none' -> []; 'tvr+kv_bias' -> [tvr, kv_bias]. Unknown names raise with the valid ones listed."""
    registry = load_mitigations()
    if spec in ("", NONE):
        return []
    names = spec.split("+")
    if NONE in names:  # not an unknown name: 'none' means no mitigation, so it joins nothing
        rest = "+".join(name for name in names if name != NONE) or NONE
        raise ConfigError(f"mitigation '{spec}' joins {NONE} (no mitigation) with others; write '{rest}'")
    if len(set(names)) != len(names):
        raise ConfigError(f"mitigation '{spec}' names one twice; join distinct ones with '+', e.g. 'tvr+kv_bias'")
    return [registry.get(name) for name in names]


def check_from_scratch(spec: str) -> list[Mitigation]:
    """`resolve`, refusing a loss-side mitigation: training from scratch (the zoo, `train --arch`) builds modules and
    runs step hooks but adds no loss term, so its model would be the baseline under the mitigation's name."""
    resolved = resolve(spec)
    loss_side = [m.name for m in resolved if m.penalty is not None]
    if loss_side:
        raise ConfigError(f"mitigation '{loss_side[0]}' is a loss term that training from scratch does not add yet, "
                          "so the model would be the baseline under its name; add it to a trained model with "
                          f"train --from MODEL --mitigation {spec} --out FOLDER")
    return resolved


def check_penalty(spec: str, settings: tuple[tuple[str, float], ...]) -> Mitigation | None:
    """The loss-side mitigation of `spec` that `settings` (the --penalty-NAME values) configure, or None. Settings
    without a mitigation that reads them would be dropped in silence (a `--penalty-strength` run that is really the
    control), so they are refused, as are settings the named penalty does not take and two penalties in one recipe
    (whose strengths would share one flag)."""
    penalties = [m for m in resolve(spec) if m.penalty is not None]
    if len(penalties) > 1:
        raise ConfigError(f"mitigation '{spec}' joins {len(penalties)} loss penalties "
                          f"({', '.join(m.name for m in penalties)}); use one per recipe")
    given = ", ".join(f"--penalty-{key}" for key, _ in settings)
    if not penalties:
        if settings:
            loss_side = sorted(e.name for e in load_mitigations() if e.obj.penalty is not None)
            example = f" (e.g. --mitigation {loss_side[0]}+{spec})" if spec not in ("", NONE) else ""
            raise ConfigError(f"{given} set a loss penalty but mitigation '{spec}' has none; add one "
                              f"of {', '.join(loss_side)}{example}")
        return None
    penalty = penalties[0]
    foreign = [key for key, _ in settings if key not in penalty.settings]
    if foreign:
        takes = ", ".join(f"--penalty-{key}" for key in penalty.settings)
        raise ConfigError(f"{penalty.name} takes {takes}, not {', '.join(f'--penalty-{k}' for k in foreign)}")
    return penalty


def build_(model: Any, spec: str) -> list[Mitigation]:
    """Change the architecture for `spec` and record it in the config; returns the mitigations."""
    mitigations = resolve(spec)
    for mitigation in mitigations:
        if mitigation.build is not None:
            mitigation.build(model)
    record_(model, spec)
    return mitigations


def record_(model: Any, spec: str) -> None:
    """Write the spec into the config, where `save_pretrained` keeps it for our loader to rebuild the modules."""
    setattr(model.config, CONFIG_KEY, spec if resolve(spec) else NONE)


def placed_like(module: Any, reference: Any) -> Any:
    """`module` on the device and in the floating dtype of `reference`'s parameters (the module it attaches to or
    replaces). New modules are born fp32 on the CPU; left there, a bf16 or CUDA model fails at their first matmul
    ("mat1 and mat2 must have the same dtype"), and the weights loaded into them later would be upcast to fp32."""
    param = next((p for p in reference.parameters() if p.is_floating_point()), None)
    return module if param is None else module.to(device=param.device, dtype=param.dtype)


def initialize_(model: Any, mitigations: list[Mitigation]) -> None:
    for mitigation in mitigations:
        if mitigation.init is not None:
            mitigation.init(model)


def recorded(config: Any) -> str:
    """The mitigation spec a saved config records ('none' for any model we did not build)."""
    return getattr(config, CONFIG_KEY, None) or NONE
