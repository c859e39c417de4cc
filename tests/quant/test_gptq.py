"""GPTQ through gptqmodel on CPU, on a tiny model: real calibrated 4-bit weights swapped into our model."""

import copy

import pytest
import torch

from qharness.quant.apply import quantize_
from qharness.quant.backend import QuantContext
from qharness.quant.calibrate import calibration_batches
from qharness.quant.schemes import get_scheme

pytestmark = pytest.mark.needs("gptqmodel")


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
    from qharness.errors import BackendUnavailable
    from qharness.quant import backend as backend_module
    from qharness.quant.backend import select_backend

    monkeypatch.setattr(backend_module, "_installed", lambda package: package != "gptqmodel")
    with pytest.raises(BackendUnavailable, match="no backend can run scheme 'gptq-int4-g128' on cpu: backend "
                                                 "'gptq' needs gptqmodel: pip install -c constraints.txt gptqmodel"):
        select_backend(get_scheme("gptq"), torch.device("cpu"))
