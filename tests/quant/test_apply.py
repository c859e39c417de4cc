import importlib

import pytest
import torch

from qharness.core.errors import UnknownName
from qharness.quant.apply import convert_conv1d_, quantize_, target_linears
from qharness.quant.backends import QuantContext, backends_for
from qharness.quant.calibrate import calibration_batches
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
    assert quantize_(tiny_model, get_scheme("int8")) == "sim"  # auto on CPU
    swapped = [m for m in tiny_model.modules() if isinstance(m, SimQuantLinear)]
    assert len(swapped) == 14
    assert isinstance(tiny_model.lm_head, torch.nn.Linear) and not isinstance(tiny_model.lm_head, SimQuantLinear)
    assert torch.equal(tiny_model.model.embed_tokens.weight, embed)


def test_skip_keeps_chosen_linears(tiny_model):
    quantize_(tiny_model, get_scheme("int8"), skip=lambda name: name.endswith("down_proj"))
    assert not isinstance(tiny_model.model.layers[0].mlp.down_proj, SimQuantLinear)
    assert isinstance(tiny_model.model.layers[0].mlp.up_proj, SimQuantLinear)


def sqnr_floor(scheme) -> float:
    """torchao's bar for 8-bit formats (compute_error > 20 dB); 4-bit formats keep about half the bits."""
    return 20.0 if scheme.weight_bits == 8 else 10.0


@pytest.mark.parametrize("name", [n for n in SCHEMES.names() if "sim" in backends_for(SCHEMES.get(n))])
def test_every_scheme_keeps_shapes_and_meets_its_sqnr_floor(tiny_model, tiny_tokenizer, heldout_text, name):
    scheme = get_scheme(name)
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 16))
    calibration = calibration_batches(tiny_tokenizer, heldout_text, n=2, length=32)
    with torch.inference_mode():
        reference = tiny_model(ids).logits
        quantize_(tiny_model, scheme, backend="sim", context=QuantContext(torch.device("cpu"), lambda: calibration))
        approx = tiny_model(ids).logits
    assert approx.shape == reference.shape
    assert sqnr_db(reference, approx) > sqnr_floor(scheme)


def test_unknown_backend_is_a_clear_error(tiny_model):
    with pytest.raises(UnknownName, match="unknown backend 'bnbx'; did you mean 'bnb'"):
        quantize_(tiny_model, get_scheme("int8"), backend="bnbx")


def test_gpt2_conv1d_is_converted_to_an_equivalent_linear():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=32)).eval()
    ids = torch.randint(0, 50, (1, 12))
    with torch.inference_mode():
        before = model(ids).logits
        with pytest.raises(TypeError, match="is a Conv1D; call convert_conv1d_"):  # a query never swaps modules
            target_linears(model)
        assert convert_conv1d_(model) == 2 * 4
        targets = target_linears(model)
        after = model(ids).logits
    assert convert_conv1d_(model) == 0  # converted once
    assert len(targets) == 2 * 4  # c_attn, c_proj (attention), c_fc, c_proj (MLP)
    assert all(isinstance(m, torch.nn.Linear) for m in targets.values())
    assert torch.allclose(before, after, atol=1e-5)


def test_four_bit_activations_cost_more_than_eight_and_per_tensor_most(tiny_model, heldout_text):
    """W4A8 -> W4A4 per token -> W4A4 per tensor: each step down in activation precision loses signal."""
    import copy

    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference = tiny_model(ids).logits
        sqnr = {}
        for name in ("int4-w4a8-token", "int4-w4a4-token", "int4-w4a4-tensor"):
            model = copy.deepcopy(tiny_model)
            quantize_(model, get_scheme(name), backend="sim")
            sqnr[name] = sqnr_db(reference, model(ids).logits)
    assert sqnr["int4-w4a8-token"] > sqnr["int4-w4a4-token"] > sqnr["int4-w4a4-tensor"], sqnr


def test_kept_linears_stay_unquantized_and_are_named_in_the_label(tiny_model):
    from qharness.quant.schemes import Keep

    keep = Keep(linears=("q_proj", "layers.1.mlp"))
    quantize_(tiny_model, get_scheme("int8-w8a8-token"), backend="sim", keep=keep)
    kinds = {name: type(module) for name, module in tiny_model.named_modules()
             if isinstance(module, torch.nn.Linear | SimQuantLinear) and name.startswith("model.layers.")}
    exact = {name for name, kind in kinds.items() if kind is torch.nn.Linear}
    assert exact == {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
                     "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"}
    assert sum(kind is SimQuantLinear for kind in kinds.values()) == 14 - len(exact)
    assert keep.label == "lin:q_proj,layers.1.mlp" and not keep.in_activations
    assert Keep(positions=(0,), linears=("o_proj",)).label == "pos:0;lin:o_proj"


def test_every_name_of_the_quant_face_resolves_to_its_module():
    import qharness.quant as quant

    for name in quant.__all__:
        assert getattr(quant, name) is getattr(importlib.import_module(f"qharness.quant.{quant._FACE[name]}"), name)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        quant.nope  # noqa: B018
