"""Attention mitigations: the arithmetic against hand-written formulas, causality, eager == SDPA, persistence."""

import pytest
import torch

from qharness.models import mitigations
from qharness.models.attention import (
    EAGER,
    SDPA,
    AttentionGate,
    KVBias,
    SoftmaxClip,
    causal_mask,
    mitigated_attention,
)
from qharness.models.layers import attention_modules

ATTENTION_SPECS = ["kv_bias", "gated_attention", "clipped_softmax", "tvr+kv_bias", "kv_bias+gated_attention"]


def small_model(arch: str, implementation: str, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if arch == "llama":  # 4 query heads over 2 key/value heads: the grouped path too
        config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             bos_token_id=0, eos_token_id=1)
        return LlamaForCausalLM._from_config(config, attn_implementation=implementation).eval()
    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                        eos_token_id=1)
    return GPT2LMHeadModel._from_config(config, attn_implementation=implementation).eval()


def mitigated_model(arch: str, spec: str, implementation: str, seed: int = 0):
    model = small_model(arch, implementation, seed)
    applied = mitigations.build_(model, spec)
    mitigations.initialize_(model, applied)
    with torch.no_grad():  # move every new parameter off its neutral start so a bug cannot hide behind zeros
        for attention in attention_modules(model):
            for param in (*getattr(attention, "kv_bias", torch.nn.Module()).parameters(),
                          *getattr(attention, "gate", torch.nn.Module()).parameters()):
                param.normal_(0, 0.5)
    return model


def reference_attention(q, k, v, mask_bool, scale, k_bias=None, v_bias=None, clip=None):
    """softmax(Q [k'; K]^T * scale) [v'; V], one head at a time with Python loops: the definition, nothing shared."""
    batch, heads, length, _ = q.shape
    out = torch.zeros_like(q)
    for b in range(batch):
        for h in range(heads):
            kv_head = h // (heads // k.shape[1])
            keys, values = k[b, kv_head], v[b, kv_head]
            visible = mask_bool
            if k_bias is not None:
                keys = torch.cat([k_bias[kv_head], keys])
                values = torch.cat([v_bias[kv_head], values])
                visible = torch.cat([torch.ones(length, 1, dtype=torch.bool), mask_bool], dim=1)
            for i in range(length):
                scores = (keys @ q[b, h, i]) * scale
                scores = scores.masked_fill(~visible[i], float("-inf"))
                probs = torch.softmax(scores, dim=0)
                if clip is not None:
                    probs = ((clip[1] - clip[0]) * probs + clip[0]).clamp(0, 1)
                out[b, h, i] = probs @ values
    return out.transpose(1, 2)


@pytest.mark.parametrize("use_sdpa", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("with_clip", [False, True])
def test_attention_function_matches_the_formula(use_sdpa, with_bias, with_clip):
    torch.manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups = 2
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    if with_bias:
        module.kv_bias = KVBias(2, 8, std=1.0)
    if with_clip:
        module.softmax_clip = SoftmaxClip(gamma=-0.1, zeta=1.05)
    module.eval()
    out, _ = mitigated_attention(use_sdpa)(module, q, k, v, None, scaling=8**-0.5)
    expected = reference_attention(
        q, k, v, causal_mask(6, 6, q.device)[0, 0], 8**-0.5,
        module.kv_bias.k.detach() if with_bias else None, module.kv_bias.v.detach() if with_bias else None,
        (-0.1, 1.05) if with_clip else None)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_sdpa", [False, True])
def test_kv_bias_extends_a_padding_mask_with_one_visible_column(use_sdpa):
    torch.manual_seed(1)
    module = torch.nn.Module()
    module.kv_bias = KVBias(2, 8, std=1.0)
    module.eval()
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    visible = causal_mask(5, 5, q.device)[0, 0].clone()
    visible[:, 0] = False  # left padding: nobody may see position 0
    visible[0, 0] = True  # ...except itself, so the reference has one finite score per row even without the bias
    bool_mask = visible[None, None]
    float_mask = torch.zeros(1, 1, 5, 5).masked_fill(~bool_mask, torch.finfo(torch.float32).min)
    expected = reference_attention(q, k, v, visible, 8**-0.5, module.kv_bias.k.detach(), module.kv_bias.v.detach())
    for mask in (bool_mask, float_mask):
        out, _ = mitigated_attention(use_sdpa)(module, q, k, v, mask, scaling=8**-0.5)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_softmax_clip_reaches_exact_zero_and_one():
    clip = SoftmaxClip(gamma=-0.03, zeta=1.0)
    probs = torch.tensor([0.0, 0.01, 0.5, 1.0])
    torch.testing.assert_close(clip(probs), torch.tensor([0.0, 0.0, 1.03 * 0.5 - 0.03, 1.0]))


def test_gate_is_sigmoid_of_the_layer_input():
    torch.manual_seed(0)
    gate = AttentionGate(hidden_size=8, heads=2, head_dim=3)
    x, out = torch.randn(2, 5, 8), torch.randn(2, 5, 2, 3)
    gate.input = x
    expected = out * torch.sigmoid(x @ gate.proj.weight.T + gate.proj.bias).view(2, 5, 2, 3)
    torch.testing.assert_close(gate(out), expected)
    with pytest.raises(RuntimeError, match="pre-hook"):
        gate(out)  # the stashed input is used once


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("spec", ATTENTION_SPECS)
def test_sequence_stays_causal_and_eager_equals_sdpa(arch, spec):
    ids = torch.randint(2, 64, (2, 12))
    changed = ids.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 64
    logits = {}
    for implementation, mitigated_name in (("eager", EAGER), ("sdpa", SDPA)):
        model = mitigated_model(arch, spec, implementation)
        assert model.config._attn_implementation == mitigated_name
        with torch.no_grad():
            before, after = model(ids).logits, model(changed).logits
        assert torch.equal(before[:, :7], after[:, :7]), "a future token changed an earlier output"
        assert not torch.allclose(before[:, 7:], after[:, 7:])
        logits[implementation] = before
    torch.testing.assert_close(logits["eager"], logits["sdpa"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("spec", ["kv_bias", "gated_attention", "clipped_softmax"])
def test_each_mitigation_changes_the_output(arch, spec):
    ids = torch.randint(2, 64, (1, 10))
    with torch.no_grad():
        plain = small_model(arch, "sdpa")(ids).logits
        mitigated = mitigated_model(arch, spec, "sdpa")(ids).logits
    assert not torch.allclose(plain, mitigated, atol=1e-4)


def test_batched_padding_matches_single_sequences_with_kv_bias():
    model = mitigated_model("llama", "kv_bias", "sdpa")
    short, long = torch.randint(2, 64, (1, 5)), torch.randint(2, 64, (1, 8))
    batch = torch.cat([torch.cat([short, torch.zeros(1, 3, dtype=torch.long)], dim=1), long])
    mask = torch.tensor([[1] * 5 + [0] * 3, [1] * 8])
    with torch.no_grad():
        batched = model(batch, attention_mask=mask).logits
        alone = model(short).logits
    torch.testing.assert_close(batched[0, :5], alone[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("spec", ["kv_bias", "gated_attention", "clipped_softmax", "dyt", "tvr+kv_bias", "tvr+dyt"])
def test_saved_model_reloads_with_its_mitigation_and_identical_logits(arch, spec, tmp_path, tiny_tokenizer):
    from qharness.models.sources import ModelSpec, load_model

    model = mitigated_model(arch, spec, "sdpa")
    model.save_pretrained(tmp_path, safe_serialization=True)
    tiny_tokenizer.save_pretrained(tmp_path)
    loaded = load_model(ModelSpec(str(tmp_path), device="cpu"), progress=False).model
    assert loaded.config.qharness_mitigation == spec
    ids = torch.randint(2, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert type(loaded.get_input_embeddings()) is type(model.get_input_embeddings())


def test_load_refuses_weights_that_do_not_fit_the_recorded_mitigation(tmp_path, tiny_tokenizer):
    from qharness.core.errors import ModelLoadError
    from qharness.models.sources import ModelSpec, load_model

    model = mitigated_model("llama", "kv_bias", "sdpa")
    model.config.qharness_mitigation = "gated_attention"  # config says one thing, weights hold another
    model.save_pretrained(tmp_path, safe_serialization=True)
    tiny_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="do not fit"):
        load_model(ModelSpec(str(tmp_path), device="cpu"), progress=False)


def test_spec_parsing_names_the_valid_mitigations():
    from qharness.core.errors import ConfigError, UnknownName

    assert mitigations.resolve("none") == []
    assert [m.name for m in mitigations.resolve("tvr+kv_bias")] == ["tvr", "kv_bias"]
    with pytest.raises(UnknownName, match="kv_bias"):
        mitigations.resolve("kv-bais")
    with pytest.raises(ConfigError, match="twice"):
        mitigations.resolve("tvr+tvr")
