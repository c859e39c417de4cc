"""quant/fp_weights.py: a run's fp weights on disk while a scheme is applied to the model itself."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from qharness.models.sources import ModelSpec, load_model
from qharness.quant.apply import apply_backend_, target_linears
from qharness.quant.backends import load_backends
from qharness.quant.fp_weights import FpWeights
from qharness.quant.schemes import get_scheme
from qharness.quant.types import QuantContext

MAPS = Path("/proc/self/maps")


def mapped(path: Path) -> bool:
    return str(path.resolve()) in MAPS.read_text()


@pytest.mark.skipif(not MAPS.exists(), reason="reads the process's memory mappings from /proc (Linux)")
def test_the_checkpoints_mapping_is_released_and_the_model_restored_exactly(tiny_model_dir):
    """transformers leaves the weights views of a copy-on-write mapping of model.safetensors: in-place quantization
    would dirty pages of it that stay resident while the embeddings keep the mapping alive. FpWeights takes the
    model off that mapping (same values), and each scheme applied in place is undone bit for bit."""
    loaded = load_model(ModelSpec(str(tiny_model_dir), device="cpu"), progress=False)
    model, checkpoint = loaded.model, tiny_model_dir / "model.safetensors"
    ids = torch.arange(2, 40)[None]
    with torch.inference_mode():
        before = model(input_ids=ids).logits
    assert mapped(checkpoint)  # what transformers does today; the test means nothing if it stops mapping
    fp = FpWeights(model, target_linears(model))
    gc.collect()
    assert not mapped(checkpoint)
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).logits, before)
    for name in ("int4-weight-g128", "int8-w8a8-tensor"):
        apply_backend_(model, get_scheme(name), load_backends().get("sim"),
                       context=QuantContext(torch.device("cpu"), consume=True))
        fp.release_()
        with torch.inference_mode():
            assert not torch.equal(model(input_ids=ids).logits, before)
        fp.restore_()
        with torch.inference_mode():
            assert torch.equal(model(input_ids=ids).logits, before)
    fp.close()
