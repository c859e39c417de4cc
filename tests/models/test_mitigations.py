import pytest
import torch

from qharness.core.errors import ConfigError
from qharness.models import mitigations
from qharness.models.layers import decoder_layers, is_norm, norm_modules
from qharness.models.mitigations import load_mitigations
from qharness.models.mitigations.dyt import ALPHA_ATTENTION, ALPHA_OTHER, DyT, apply_dyt_
from qharness.models.mitigations.tvr import TVRConfig, decoder_matrices, lir_init_, tvr_after_step, tvr_rescale_


def test_registry_lists_what_each_mitigation_changes():
    registry = load_mitigations()
    assert registry.get("dyt").build is not None and registry.get("dyt").after_step is None
    assert registry.get("tvr").init is not None and registry.get("tvr").after_step is not None


def test_dyt_is_the_formula():
    torch.manual_seed(0)
    layer = DyT(8, alpha_init=0.7)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(8))
        layer.bias.copy_(torch.randn(8))
    x = torch.randn(3, 8) * 50
    assert torch.allclose(layer(x), layer.weight * torch.tanh(0.7 * x) + layer.bias)
    assert layer(torch.full((1, 8), 1e6)).abs().max() <= (layer.weight.abs() + layer.bias.abs()).max() + 1e-6


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dyt_leaves_no_norm_and_sets_alpha_by_position(arch, tiny_model):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = tiny_model if arch == "llama" else GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=2,
                                                                          n_head=4, n_positions=32))
    count = len(norm_modules(model))
    assert apply_dyt_(model) == count == 2 * 2 + 1  # two per layer and the final one
    assert not any(is_norm(m) for m in model.modules())
    first = decoder_layers(model)[0]
    dyts = [m for m in first.modules() if isinstance(m, DyT)]
    assert dyts[0].alpha.item() == ALPHA_ATTENTION and dyts[1].alpha.item() == ALPHA_OTHER
    ids = torch.randint(0, 50, (1, 8))
    assert torch.isfinite(model(ids).logits).all()


def test_tvr_rescales_exactly_the_wide_decoder_weights_and_nothing_else(tiny_model):
    config = TVRConfig(target=0.02, threshold=1.2)
    (_, wide), (_, narrow) = decoder_matrices(tiny_model)[:2]
    with torch.no_grad():
        wide.normal_(0.3, 0.1)  # std 0.1 > 1.2 x 0.02: rescaled
        narrow.normal_(0.0, 0.02)  # std 0.02 <= 0.024: left alone
    others = {n: p.clone() for n, p in tiny_model.named_parameters() if not n.startswith("model.layers.")}
    norms = {n: p.clone() for n, p in tiny_model.named_parameters() if "layernorm" in n}
    before_wide, before_narrow = wide.clone(), narrow.clone()
    tvr_rescale_(tiny_model, config)
    expected = (before_wide - before_wide.mean()) / before_wide.std() * 0.02 + before_wide.mean()
    assert torch.allclose(wide, expected, atol=1e-6)
    assert wide.std().item() == pytest.approx(0.02, rel=1e-4)
    assert torch.equal(narrow, before_narrow)
    for name, value in {**others, **norms}.items():  # embeddings, head, final and layer norms
        assert torch.equal(dict(tiny_model.named_parameters())[name], value), name


def test_tvr_runs_every_interval_steps(tiny_model):
    config = TVRConfig(interval=50, target=0.001)
    assert tvr_after_step(tiny_model, 49, config) == 0
    assert tvr_after_step(tiny_model, 50, config) == len(decoder_matrices(tiny_model))


def test_lir_init_scales_by_layer_index(tiny_model):
    torch.manual_seed(0)
    lir_init_(tiny_model, TVRConfig(init_sigma=0.5))
    stds = {index: [] for index in (1, 2)}
    for index, weight in decoder_matrices(tiny_model):
        stds[index].append(weight.std().item())
    assert sum(stds[1]) / len(stds[1]) == pytest.approx(0.5, rel=0.1)
    assert sum(stds[2]) / len(stds[2]) == pytest.approx(0.5 / 2**0.5, rel=0.1)


BF16_SPECS = [*load_mitigations().names(), "tvr+kv_bias", "tvr+dyt", "kv_bias+gated_attention+clipped_softmax+dyt"]


def saved_mitigated(folder, arch: str, spec: str):
    """A tiny fp32 model with `spec`, its new parameters moved off their neutral start, saved as a folder."""
    from qharness.training.architectures import ArchConfig, new_model

    model = new_model(ArchConfig(arch=arch, d_model=32, layers=2, heads=2, context=32, vocab_size=64), 0, 1, seed=0)
    mitigations.initialize_(model, mitigations.build_(model, spec))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(part in name for part in ("kv_bias", "gate", "alpha")):
                param.normal_(0.5, 0.2)
    model.save_pretrained(folder, safe_serialization=True)
    return model.eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("spec", BF16_SPECS)
def test_mitigated_models_load_and_run_in_the_dtype_asked_for(arch, spec, tmp_path):
    from transformers import AutoConfig

    from qharness.models.loading import load_mitigated

    reference = saved_mitigated(tmp_path, arch, spec)
    ids = torch.randint(2, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids).logits
        fp32 = load_mitigated(tmp_path, AutoConfig.from_pretrained(tmp_path), torch.float32).eval()
        bf16 = load_mitigated(tmp_path, AutoConfig.from_pretrained(tmp_path), torch.bfloat16).eval()
        assert {p.dtype for p in fp32.parameters()} == {torch.float32}  # fp32 stays fp32: nothing is cast down
        assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}  # the mitigation's modules too
        assert torch.equal(fp32(ids).logits, expected)
        logits = bf16(ids).logits  # fp32 modules in a bf16 model failed here: "mat1 and mat2 must have the same dtype"
    assert logits.dtype == torch.bfloat16
    error = (logits.float() - expected).norm() / expected.norm()
    assert error < 0.02, f"bf16 relative error {error:.4f}"  # bf16 rounding (8 bits), not a wrong computation


def test_the_lp_penalty_is_its_formula_by_hand():
    """strength * mean over layers of mean over entries of (|h| / threshold)^power, against a hand computation."""
    from qharness.models.mitigations.lp_penalty import LpPenalty

    layer = torch.nn.Linear(2, 2)
    for power, by_hand in ((4.0, (0.5**4 + 1.5**4 + 3.0**4 + 0.25**4) / 4),
                           (8.0, (0.5**8 + 1.5**8 + 3.0**8 + 0.25**8) / 4)):
        penalty = LpPenalty(threshold=2.0, power=power, strength=0.5)
        penalty._record(layer, (), torch.tensor([[1.0, -3.0, 6.0, 0.5]]))  # layer 1: |h| / 2 = .5, 1.5, 3, .25
        penalty._record(layer, (), (torch.tensor([[2.0, -2.0]]),))  # layer 2 (a tuple output): every entry costs 1
        assert penalty.take().item() == pytest.approx(0.5 * (by_hand + 1.0) / 2)
        assert penalty.take() is None  # taken once
    with torch.no_grad():  # the activation probe's forward passes are not penalized
        penalty._record(layer, (), torch.ones(2))
    assert penalty.take() is None


def test_the_lp_input_penalty_costs_every_decoder_linears_input(tiny_model):
    """strength * mean over the decoder's Linears of mean (|x| / threshold)^power of each one's input, by hand from
    inputs captured separately; the head (outside the decoder layers) and the no_grad probe cost nothing."""
    from qharness.models.mitigations.lp_input_penalty import LpInputPenalty

    inputs: list[torch.Tensor] = []
    linears = [m for layer in decoder_layers(tiny_model) for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    handles = [m.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach())) for m in linears]
    ids = torch.randint(2, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    penalty = LpInputPenalty(threshold=0.5, power=4.0, strength=2.0)
    with penalty.attached(tiny_model):
        tiny_model(ids)
        value = penalty.take()
        with torch.no_grad():
            tiny_model(ids)
        assert penalty.take() is None
    for handle in handles:
        handle.remove()
    assert len(inputs) == 2 * len(linears) == 2 * 7 * len(decoder_layers(tiny_model))  # q k v o gate up down
    by_hand = 2.0 * sum(float(((x.double().abs() / 0.5) ** 4).mean()) for x in inputs[:len(linears)]) / len(linears)
    assert value.item() == pytest.approx(by_hand, rel=1e-5)
    assert value.requires_grad  # it trains the weights that made those inputs
    with penalty.attached(tiny_model):  # hooks gone on exit: a forward after it records nothing
        pass
    tiny_model(ids)
    assert penalty.take() is None
    with pytest.raises(ConfigError, match="lp_input_penalty threshold must be a number > 0"):
        LpInputPenalty(threshold=0)


def test_the_lp_input_penalty_sees_gpt2s_conv1d_projections():
    """GPT-2's projections are transformers' Conv1D, not nn.Linear: each of the 4 per layer is observed (the penalty
    returned None on GPT-2 when only nn.Linear was hooked, training the control under this mitigation's name)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from qharness.models.mitigations.lp_input_penalty import LpInputPenalty

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32))
    penalty = LpInputPenalty(threshold=0.5)
    with penalty.attached(model):
        model(torch.randint(0, 64, (1, 8)))
        assert len(penalty._terms) == 4 * 2  # c_attn, attn.c_proj, c_fc, mlp.c_proj in each layer
        assert penalty.take() > 0


def test_list_mitigations_shows_every_one_with_its_reference(capsys):
    from qharness.cli import main

    assert main(["list", "mitigations"]) == 0
    out = capsys.readouterr().out
    for entry in load_mitigations():
        assert f"  {entry.name} " in out and entry.obj.reference in out
    assert "lp_penalty" in out and "--penalty-power" in out
