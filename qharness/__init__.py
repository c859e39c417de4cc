"""qharness: how much do massive activations hurt INT8, INT4 and FP8 quantization of LLMs?

The library API is a handful of plain functions (imported lazily so `import qharness` stays cheap):

    from qharness import load_model, ModelSpec, get_scheme, quantize_, perplexity
    loaded = load_model(ModelSpec("smollm2-135m"))
    quantize_(loaded.model, get_scheme("int8-w8a8-token"))

    from qharness import RunSettings, plan, execute        # one run, as `qharness run` does it
    execute(plan(RunSettings(model="smollm2-135m", quants=("int8",), limit=2)))
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "ModelSpec": "qharness.models.sources",
    "load_model": "qharness.models.sources",
    "get_scheme": "qharness.quant.schemes",
    "quantize_": "qharness.quant.apply",
    "fake_quantize": "qharness.quant.sim",
    "perplexity": "qharness.tasks.perplexity",
    "RunSettings": "qharness.experiment.settings",
    "plan": "qharness.experiment.plan",
    "execute": "qharness.experiment.execute",
    "run": "qharness.experiment.runner",
    "append_rows": "qharness.data.results",
}


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'qharness' has no attribute '{name}'")


__all__ = [*_API, "__version__"]
