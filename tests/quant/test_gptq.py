"""GPTQ through gptqmodel on CPU, on a tiny model: real calibrated 4-bit weights swapped into our model."""

import copy

import pytest
import torch

from qharness.quant.apply import quantize_
from qharness.quant.backends import QuantContext
from qharness.quant.calibrate import calibration_batches
from qharness.quant.schemes import get_scheme

pytestmark = pytest.mark.needs("gptqmodel")


@pytest.fixture(autouse=True)
def _logs_in_a_temporary_folder(tmp_path, monkeypatch):
    """gptqmodel writes its quantization logs into ./logs; keep them out of the checkout."""
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("hidden", [128, 192])  # whole groups of 128, and a ragged last group (as SmolLM2's 576)
def test_gptq_quantizes_every_target_and_beats_round_to_nearest(tiny_tokenizer, heldout_text, hidden):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=hidden, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=0, eos_token_id=1)
    model = LlamaForCausalLM(config).eval()
    rtn = copy.deepcopy(model)
    batches = calibration_batches(tiny_tokenizer, heldout_text, n=8, length=64)
    context = QuantContext(torch.device("cpu"), calibration=lambda: batches, tokenizer=tiny_tokenizer)
    ids = torch.cat(calibration_batches(tiny_tokenizer, heldout_text[20000:], n=4, length=64))
    with torch.inference_mode():
        reference = model(ids).logits
        assert quantize_(model, get_scheme("gptq"), context=context) == "gptq"
        quantize_(rtn, get_scheme("int4-weight-g128"), backend="sim")
        gptq_logits, rtn_logits = model(ids).logits, rtn(ids).logits
    swapped = [m for name, m in model.named_modules() if name.startswith("model.layers.") and name.endswith("proj")]
    assert len(swapped) == 14 and not any(type(m) is torch.nn.Linear for m in swapped)
    assert gptq_logits.dtype == torch.float32
    assert torch.isfinite(gptq_logits).all()
    gptq_error = (gptq_logits - reference).norm() / reference.norm()
    rtn_error = (rtn_logits - reference).norm() / reference.norm()
    assert 0 < gptq_error < rtn_error * 1.05, (gptq_error, rtn_error)


def test_gptq_without_the_library_says_how_to_install(monkeypatch):
    from qharness.core.errors import BackendUnavailable
    from qharness.quant import backends as backend_module
    from qharness.quant.backends import select_backend

    monkeypatch.setattr(backend_module, "_installed", lambda package: package != "gptqmodel")
    with pytest.raises(BackendUnavailable, match="no backend can run scheme 'gptq-int4-g128' on cpu: backend "
                                                 "'gptq' needs gptqmodel: pip install -c constraints.txt gptqmodel"):
        select_backend(get_scheme("gptq"), torch.device("cpu"))


def tiny_gpt2(vocab_size: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                        bos_token_id=0, eos_token_id=1)
    return GPT2LMHeadModel(config).eval()


def test_gptq_on_gpt2_conv1d_is_as_close_as_round_to_nearest(tiny_tokenizer, heldout_text):
    """GPT-2's projections are Conv1D, (in, out); qharness turns them into Linear, (out, in). gptqmodel rebuilds
    the model from a saved folder with GPT-2's own classes: a Linear's weight saved as is came back transposed in
    the square attention c_proj, with a logit error many times round-to-nearest's."""
    model = tiny_gpt2(len(tiny_tokenizer))
    rtn = copy.deepcopy(model)
    batches = calibration_batches(tiny_tokenizer, heldout_text, n=8, length=64)
    context = QuantContext(torch.device("cpu"), calibration=lambda: batches, tokenizer=tiny_tokenizer)
    ids = torch.cat(calibration_batches(tiny_tokenizer, heldout_text[20000:], n=4, length=64))
    with torch.inference_mode():
        reference = model(ids).logits
        assert quantize_(model, get_scheme("gptq"), context=context) == "gptq"
        quantize_(rtn, get_scheme("int4-weight-g128"), backend="sim")
        gptq_logits, rtn_logits = model(ids).logits, rtn(ids).logits
    assert torch.isfinite(gptq_logits).all()
    gptq_error = (gptq_logits - reference).norm() / reference.norm()
    rtn_error = (rtn_logits - reference).norm() / reference.norm()
    assert 0 < gptq_error < rtn_error * 1.5, (gptq_error, rtn_error)


def test_native_state_dict_puts_conv1d_weights_back_in_their_layout():
    from qharness.quant.apply import convert_conv1d_
    from qharness.quant.backends.gptq import native_state_dict

    model = tiny_gpt2(50)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    convert_conv1d_(model)  # Conv1D -> Linear, in place
    native = native_state_dict(model)
    assert native.keys() == original.keys()
    assert all(torch.equal(native[k], original[k]) for k in original)


def test_gptq_quantizes_on_the_device_it_is_given(tiny_tokenizer, heldout_text, monkeypatch):
    """gptqmodel picks CUDA for quantization whenever CUDA is visible unless QuantizeConfig.device says otherwise;
    the device we pass must reach it."""
    import gptqmodel

    seen = []
    original = gptqmodel.GPTQModel.load

    def load(path, quantize_config=None, **kwargs):
        if quantize_config is not None:
            seen.append(str(quantize_config.device))
        return original(path, quantize_config, **kwargs)

    monkeypatch.setattr(gptqmodel.GPTQModel, "load", load)
    model = tiny_gpt2(len(tiny_tokenizer))
    batches = calibration_batches(tiny_tokenizer, heldout_text, n=4, length=64)
    quantize_(model, get_scheme("gptq"), context=QuantContext(torch.device("cpu"), lambda: batches, tiny_tokenizer))
    assert seen == ["cpu"]


# gptqmodel's CUDA kernels run fp16/bf16; the model is bf16 (the CUDA default). GPTQ is not round-to-nearest, so
# the bar is the CPU test's: no worse than sim's int4 g128 on the same model
@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [128, 192])
def test_gptq_on_cuda_beats_round_to_nearest(tiny_tokenizer, heldout_text, hidden):
    from transformers import LlamaConfig, LlamaForCausalLM

    from qharness.core.errors import BackendUnavailable

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=hidden, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=0, eos_token_id=1)
    cuda = torch.device("cuda")
    model = LlamaForCausalLM(config).eval().to(cuda, torch.bfloat16)
    rtn = copy.deepcopy(model)
    batches = [b.to(cuda) for b in calibration_batches(tiny_tokenizer, heldout_text, n=8, length=64)]
    context = QuantContext(cuda, calibration=lambda: batches, tokenizer=tiny_tokenizer)
    ids = torch.cat(calibration_batches(tiny_tokenizer, heldout_text[20000:], n=4, length=64)).to(cuda)
    with torch.inference_mode():
        reference = model(ids).logits.float()
        assert quantize_(model, get_scheme("gptq"), context=context) == "gptq"
        quantize_(rtn, get_scheme("int4-weight-g128"), backend="sim")
        gptq_logits, rtn_logits = model(ids).logits.float(), rtn(ids).logits.float()
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert torch.isfinite(gptq_logits).all()
    gptq_error = (gptq_logits - reference).norm() / reference.norm()
    rtn_error = (rtn_logits - reference).norm() / reference.norm()
    assert 0 < gptq_error < rtn_error * 1.05, (gptq_error, rtn_error)
    with pytest.raises(BackendUnavailable, match="in bf16 or fp16 only, not fp32"):
        quantize_(LlamaForCausalLM(config).to(cuda), get_scheme("gptq"), context=context)


ONE_THREAD = """
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from qharness.quant.apply import quantize_
from qharness.quant.backends import QuantContext
from qharness.quant.schemes import get_scheme
from qharness.training.text import train_tokenizer
tokenizer = train_tokenizer(["in the beginning god created the heaven and the earth " * 50], vocab_size=300)
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
                                     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                     bos_token_id=0, eos_token_id=1)).eval()
batches = [torch.randint(2, len(tokenizer), (1, 64), generator=torch.Generator().manual_seed(i)) for i in range(4)]
context = QuantContext(torch.device("cpu"), calibration=lambda: batches, tokenizer=tokenizer)
print(quantize_(model, get_scheme("gptq"), context=context))
"""


def test_gptq_runs_on_one_thread(tmp_path):
    """OMP_NUM_THREADS=1 (a one-core job): gptqmodel 7.6's model loader asks for 2 CPU workers and failed inside it
    when we gave it the thread count; a fresh process, since gptqmodel builds its worker pool once."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import qharness

    here = str(Path(qharness.__file__).resolve().parents[1])  # the checkout or site-packages these tests import
    paths = [str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([here, *paths])}
    done = subprocess.run([sys.executable, "-c", ONE_THREAD], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "gptq"
