import pytest
import torch

from qharness.errors import UnknownName
from qharness.quant.apply import quantize_, target_linears
from qharness.quant.schemes import SCHEMES, get_scheme
from qharness.quant.sim import SimQuantLinear


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    return (10 * torch.log10(reference.pow(2).mean() / (reference - approx).pow(2).mean())).item()


def test_targets_are_the_decoder_layer_linears_only(tiny_model):
    names = set(target_linears(tiny_model))
    assert len(names) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert all(name.startswith("model.layers.") for name in names)
    assert "lm_head" not in names


def test_quantize_swaps_in_place_and_keeps_head_and_embeddings(tiny_model):
    embed = tiny_model.model.embed_tokens.weight.clone()
    result = quantize_(tiny_model, get_scheme("int8"))
    assert result is tiny_model
    swapped = [m for m in tiny_model.modules() if isinstance(m, SimQuantLinear)]
    assert len(swapped) == 14
    assert isinstance(tiny_model.lm_head, torch.nn.Linear) and not isinstance(tiny_model.lm_head, SimQuantLinear)
    assert torch.equal(tiny_model.model.embed_tokens.weight, embed)


def test_skip_keeps_chosen_linears(tiny_model):
    quantize_(tiny_model, get_scheme("int8"), skip=lambda name: name.endswith("down_proj"))
    assert not isinstance(tiny_model.model.layers[0].mlp.down_proj, SimQuantLinear)
    assert isinstance(tiny_model.model.layers[0].mlp.up_proj, SimQuantLinear)


@pytest.mark.parametrize("name", SCHEMES.names())
def test_every_scheme_keeps_shapes_and_meets_its_sqnr_floor(tiny_model, name):
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 16))
    with torch.inference_mode():
        reference = tiny_model(ids).logits
        quantize_(tiny_model, get_scheme(name))
        approx = tiny_model(ids).logits
    assert approx.shape == reference.shape
    assert sqnr_db(reference, approx) > 20


def test_unknown_backend_is_a_clear_error(tiny_model):
    with pytest.raises(UnknownName, match="unknown backend 'bnb'; known: sim"):
        quantize_(tiny_model, get_scheme("int8"), backend="bnb")
