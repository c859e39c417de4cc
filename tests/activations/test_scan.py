import json

import pytest
import torch

from qharness.activations.intervene import intervention, replaced
from qharness.activations.profile import Profile
from qharness.activations.scan import SCHEMA, ScanConfig, scan
from qharness.models.layers import decoder_layers
from qharness.quant.calibrate import calibration_batches

COMMON = dict(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=128)
ARCHITECTURES = {
    "LlamaConfig": dict(COMMON, num_key_value_heads=2),
    "MistralConfig": dict(COMMON, num_key_value_heads=2),
    "Qwen2Config": dict(COMMON, num_key_value_heads=2),
    "Qwen3Config": dict(COMMON, num_key_value_heads=2, head_dim=8),
    "Gemma2Config": dict(COMMON, num_key_value_heads=2, head_dim=8),
    "Gemma3TextConfig": dict(COMMON, num_key_value_heads=2, head_dim=8),
    "PhiConfig": dict(COMMON),
    "Phi3Config": dict(COMMON, num_key_value_heads=2, pad_token_id=0, bos_token_id=0, eos_token_id=1),
    "OlmoConfig": dict(COMMON),
    "Olmo2Config": dict(COMMON),
    "GPT2Config": dict(vocab_size=400, n_embd=32, n_layer=3, n_head=4, n_positions=128),
    "OPTConfig": dict(vocab_size=400, hidden_size=32, ffn_dim=64, num_hidden_layers=3, num_attention_heads=4,
                      word_embed_proj_dim=32, max_position_embeddings=128),
    "FalconConfig": dict(vocab_size=400, hidden_size=32, num_hidden_layers=3, num_attention_heads=4),
    "GPTNeoXConfig": dict(COMMON),
}


def build(config_name: str):
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**ARCHITECTURES[config_name])
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def batches(tiny_tokenizer, heldout_text):
    return calibration_batches(tiny_tokenizer, heldout_text, n=2, length=24)


@pytest.mark.parametrize("config_name", sorted(ARCHITECTURES))
def test_scan_runs_on_every_supported_architecture(config_name, tiny_tokenizer, batches):
    model = build(config_name)
    attention_before = model.config._attn_implementation
    profile = scan(model, tiny_tokenizer, batches, ScanConfig(sequences=2, length=24))
    assert len(decoder_layers(model)) == 3 and len(profile.layers) == 3
    assert profile.schema == SCHEMA
    for entry in profile.layers:
        assert entry.max >= entry.median > 0
        assert entry.attention_on_first is None or 0 <= entry.attention_on_first <= 1
    data = json.loads(json.dumps(profile.to_json()))  # the profile is plain JSON and reads back whole
    assert data["schema"] == SCHEMA and Profile.from_json(data) == profile
    assert model.config._attn_implementation == attention_before  # eager only for the scan
    assert any(entry.attention_on_first is not None for entry in profile.layers)


def plant(layer: torch.nn.Module, position: int, channel: int, value: float):
    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.clone()
        hidden[:, position, channel] += value
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return layer.register_forward_hook(hook)


def test_a_planted_outlier_is_found_at_its_layer_token_and_channel(tiny_model, tiny_tokenizer, batches):
    layers = decoder_layers(tiny_model)
    handle = plant(layers[1], position=0, channel=5, value=5000.0)
    try:
        profile = scan(tiny_model, tiny_tokenizer, batches, ScanConfig(sequences=2, length=24))
    finally:
        handle.remove()
    top = profile.layers[1].top[0]
    assert (top.position, top.channel, top.token) == (0, 5, "<|bos|>")
    assert profile.layers[1].massive_fraction == 1.0
    assert profile.layers[0].massive_fraction == 0.0
    summary = profile.summary
    assert summary.first_massive_layer == 1 and summary.bos_holds_max == 1.0 and summary.top_channel == 5
    assert summary.intervention.layer == 1 and summary.intervention.channels == [5]
    assert summary.intervention.criterion == "massive"
    assert summary.intervention.mean_first[0] == pytest.approx(
        5000.0 + profile_free_value(tiny_model, batches, layer=1, channel=5), rel=1e-4)


def profile_free_value(model, batches, layer: int, channel: int) -> float:
    """The unplanted value of (position 0, channel) at `layer`, averaged over the batches."""
    seen = []
    handle = decoder_layers(model)[layer].register_forward_hook(
        lambda m, a, out: seen.append(float((out[0] if isinstance(out, tuple) else out)[0, 0, channel])))
    with torch.inference_mode():
        for ids in batches:
            model(input_ids=ids)
    handle.remove()
    return sum(seen) / len(seen)


def test_overflow_is_reported_per_layer(tiny_model, tiny_tokenizer, batches):
    handle = plant(decoder_layers(tiny_model)[0], position=2, channel=1, value=float("inf"))
    try:
        profile = scan(tiny_model, tiny_tokenizer, batches, ScanConfig(sequences=2, length=24, attention=False))
    finally:
        handle.remove()
    assert profile.layers[0].nonfinite >= 2
    assert 0 in profile.summary.overflow_layers


def test_replaced_changes_exactly_the_targeted_entries():
    torch.manual_seed(0)
    h = torch.randn(2, 5, 8)
    original = h.clone()
    zero = replaced(h, [1, 6], "zero")
    assert (zero[..., [1, 6]] == 0).all()
    untouched = [c for c in range(8) if c not in (1, 6)]
    assert torch.equal(zero[..., untouched], h[..., untouched])
    mean = replaced(h, [1, 6], "mean", mean_first=[10.0, 20.0], mean_rest=[-1.0, -2.0])
    assert mean[:, 0, 1].eq(10).all() and mean[:, 0, 6].eq(20).all()
    assert mean[:, 1:, 1].eq(-1).all() and mean[:, 1:, 6].eq(-2).all()
    assert torch.equal(mean[..., untouched], h[..., untouched])
    assert torch.equal(h, original)  # the input is not modified in place


def test_intervention_hook_is_removed_and_only_changes_its_layer(tiny_model):
    ids = torch.randint(0, tiny_model.config.vocab_size, (1, 10))
    layer = decoder_layers(tiny_model)[0]
    seen = {}
    watch = [decoder_layers(tiny_model)[i].register_forward_hook(
        lambda m, a, out, i=i: seen.__setitem__(i, (out[0] if isinstance(out, tuple) else out).clone()))
        for i in range(2)]
    with torch.inference_mode():
        base = tiny_model(ids).logits
        before = dict(seen)
        with intervention(layer, [3], "zero"):
            changed = tiny_model(ids).logits
            during = dict(seen)
        after = tiny_model(ids).logits
    for handle in watch:
        handle.remove()
    assert not torch.allclose(base, changed)
    assert torch.equal(base, after)  # removed on exit
    # the watch hook ran before the intervention hook on layer 0, so it saw the original output there
    assert torch.equal(during[0], before[0])
    assert not torch.allclose(during[1], before[1])  # the next layer received the changed state


# ---- the summary's definitions on a fixed model, against values computed by hand -----------------------------------
VOCAB = {0: "<bos>", 1: "the", 2: ",", 3: " word", 4: "."}
SEQUENCES = [[0, 3, 2, 1], [0, 1, 4, 3]]  # tokens: <bos> ' word' ',' 'the' / <bos> 'the' '.' ' word'
# (layer, sequence) -> (position, channel, value) of the one large entry; everything else is 1.0 (median 1)
PLANTED = {(0, 0): (2, 1, 5.0), (0, 1): (2, 1, 5.0),  # layer 0: no outlier (5 < 100 x median), on delimiters
           (1, 0): (0, 3, 1000.0), (1, 1): (2, 3, 1000.0),  # BOS, then '.' (a delimiter)
           (2, 0): (0, 3, 3000.0), (2, 1): (1, 5, -1000.0)}  # BOS, then 'the' (content), another channel
# every layer's attention (heads 2, queries 4, keys 4), causal rows summing to 1
ATTENTION = torch.tensor([[[1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [0.2, 0.6, 0.2, 0], [0.4, 0.1, 0.1, 0.4]],
                          [[1.0, 0, 0, 0], [0.9, 0.1, 0, 0], [0.3, 0.3, 0.4, 0], [0.1, 0.7, 0.1, 0.1]]])


class FixedTokenizer:
    def decode(self, ids):
        return "".join(VOCAB[i] for i in ids)


class FixedLayer(torch.nn.Module):
    def __init__(self, index: int, owner: "FixedModel"):
        super().__init__()
        self.index, self.owner = index, [owner]  # a list: not a submodule

    def forward(self, x):
        hidden = torch.ones(1, 4, 8)
        position, channel, value = PLANTED[self.index, self.owner[0].sequence]
        hidden[0, position, channel] = value
        return hidden


class FixedModel(torch.nn.Module):
    """Three layers whose outputs and attention weights are the tables above: the scan's arithmetic, nothing else."""

    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {"_attn_implementation": "eager"})()
        self.layers = torch.nn.ModuleList(FixedLayer(i, self) for i in range(3))
        self.sequence = -1

    def forward(self, input_ids, output_attentions=False):
        self.sequence = SEQUENCES.index(input_ids[0].tolist())
        for layer in self.layers:
            layer(input_ids)
        attentions = tuple(ATTENTION.unsqueeze(0) for _ in self.layers) if output_attentions else None
        return type("Output", (), {"attentions": attentions})()


def test_summary_shares_and_attention_on_position_0_by_hand():
    model = FixedModel()
    batches = [torch.tensor([ids]) for ids in SEQUENCES]
    profile = scan(model, FixedTokenizer(), batches, ScanConfig(sequences=2, length=4), layers=model.layers)
    # attention on key 0, averaged over both heads and the queries after the first (query 0 can only see key 0):
    # head 0 gives 0.5, 0.2, 0.4 and head 1 0.9, 0.3, 0.1, so (0.5 + 0.2 + 0.4 + 0.9 + 0.3 + 0.1) / 6 = 0.4 (key 1
    # instead: 2.3 / 6; query 0 counted: 4.4 / 8)
    assert [entry.attention_on_first for entry in profile.layers] == [pytest.approx(0.4, abs=1e-7)] * 3  # fp32 weights
    summary = profile.summary
    # the largest entries from the first layer with outlier channels (layer 1) on: (1, BOS), (1, '.'), (2, BOS),
    # (2, 'the'); layer 0's two delimiter entries are below the outlier ratio and do not count
    assert summary.first_outlier_layer == 1 and summary.outlier_channels == [3]
    assert summary.bos_holds_max == pytest.approx(2 / 4)
    assert summary.delimiter_holds_max == pytest.approx(1 / 4)
    assert summary.top_channel == 3 and summary.top_channel_stability == pytest.approx(3 / 4)
    assert [entry.top[0].token for entry in profile.layers] == [",", "<bos>", "<bos>"]
    # each sequence's largest |h| over the layers: 3000 (layer 2's BOS), then 1000 (layer 1's '.', layer 2's |-1000|)
    assert summary.sequence_max == [3000.0, 1000.0] and summary.max == 3000.0
