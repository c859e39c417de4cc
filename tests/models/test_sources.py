import pytest
import torch

from qharness.core.errors import ConfigError, ModelLoadError
from qharness.models.sources import ModelSpec, classify, load_model


def test_local_folder_loads_in_eval_mode_with_safetensors(tiny_model_dir):
    loaded = load_model(ModelSpec(str(tiny_model_dir), device="cpu"))
    assert loaded.source == f"local:{tiny_model_dir.resolve()}"
    assert not loaded.model.training
    assert loaded.dtype == torch.float32 and loaded.device.type == "cpu"
    assert loaded.tokenizer.bos_token == "<|bos|>"


def test_local_folder_with_only_pickled_weights_is_refused(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    for f in tiny_model_dir.iterdir():
        if f.suffix != ".safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    torch.save(load_file(tiny_model_dir / "model.safetensors"), tmp_path / "pytorch_model.bin")  # pickle only
    with pytest.raises(ModelLoadError, match=f"cannot load model '{tmp_path}' as a local folder"):
        load_model(ModelSpec(str(tmp_path)))


def test_bf16_dtype_is_honoured(tiny_model_dir):
    assert load_model(ModelSpec(str(tiny_model_dir), dtype="bf16", device="cpu")).model.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("name", "kind"),
    [("smollm2-135m", "builtin"), ("HuggingFaceTB/SmolLM2-135M", "hub"), ("org/model.v2", "hub")],
)
def test_classify_accepted_names(name, kind):
    assert classify(name) == kind


def test_classify_rejects_with_the_valid_forms(tmp_path):
    with pytest.raises(ModelLoadError, match="unknown model 'smollm'"):
        classify("smollm")
    with pytest.raises(ModelLoadError, match="unknown model 'smolm2-135m'; did you mean 'smollm2-135m'"):
        classify("smolm2-135m")
    with pytest.raises(ModelLoadError, match="model file not found: .*x.gguf"):
        classify(str(tmp_path / "x.gguf"))
    text = tmp_path / "weights.txt"
    text.write_text("hi")
    with pytest.raises(ModelLoadError, match="is a file but not a .gguf model"):
        classify(str(text))


def test_spec_validation():
    with pytest.raises(ConfigError, match="unknown dtype 'float64'"):
        ModelSpec(dtype="float64")


def test_quiet_loading_silences_the_gguf_bar_and_restores_everything():
    """transformers' GGUF conversion draws its own tqdm bar; quiet runs swap in a disabled one for the call only, and
    the library's logging settings come back as they were."""
    import logging

    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    from qharness.models.loading import quiet_transformers

    original, verbosity = gguf_utils.tqdm, hf_logging.get_verbosity()
    gguf_level = logging.getLogger("gguf").level
    with quiet_transformers(progress=False):
        assert gguf_utils.tqdm is not original
        assert gguf_utils.tqdm(range(3)).disable
        assert hf_logging.get_verbosity() == hf_logging.ERROR
    assert gguf_utils.tqdm is original and hf_logging.get_verbosity() == verbosity
    assert logging.getLogger("gguf").level == gguf_level
    with quiet_transformers(progress=True):
        assert gguf_utils.tqdm is original
