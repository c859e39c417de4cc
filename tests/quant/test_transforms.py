"""The post-hoc transforms (qharness/quant/transforms/): each keeps the fp model's logits, and does what its paper
says to the inputs the Linears see."""

from __future__ import annotations

import copy

import pytest
import torch

from qharness.core.errors import ConfigError, UnknownName
from qharness.quant.apply import target_linears
from qharness.quant.transforms import TransformSpec, parse_transform, transform_
from qharness.quant.transforms.smoothquant import input_maxima

ROTATE = pytest.param("rotate", marks=pytest.mark.needs("torchao"))
# fp32 rounds each product to about 6e-8 of its size; through two layers, a norm and a 400-wide head the logits of
# the transformed tiny model move by 2e-7 to 5e-7 of their largest magnitude (measured). 1e-5 leaves room for other
# seeds and BLAS orders while a transform that misses a part moves them by more than 1e-1 (test below).
FP32_TOLERANCE = 1e-5


def gqa_llama(vocab_size: int, tied: bool = False, seed: int = 0, weight_std: float = 0.02):
    """A tiny Llama whose norms are not all ones (so folding them matters), with grouped-query attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=weight_std, bos_token_id=0, eos_token_id=1, tie_word_embeddings=tied)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


@pytest.fixture()
def batches(tiny_tokenizer, heldout_text):
    from qharness.quant.calibrate import calibration_batches, calibration_text

    return calibration_batches(tiny_tokenizer, calibration_text(), n=4, length=64)


def logits(model, batch):
    with torch.inference_mode():
        return model(input_ids=batch).logits.double()


def relative_change(before, after) -> float:
    return ((after - before).abs().max() / before.abs().max()).item()


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("text", ["smoothquant", "smoothquant:0", "smoothquant:1", ROTATE])
def test_each_transform_keeps_the_fp32_logits(tiny_tokenizer, batches, text, tied):
    model = gqa_llama(len(tiny_tokenizer), tied=tied)
    reference = copy.deepcopy(model)
    drift = transform_(model, parse_transform(text), batches)
    assert drift < FP32_TOLERANCE
    unseen = torch.tensor([[0, *range(5, 60)]])  # not a calibration batch
    assert relative_change(logits(reference, unseen), logits(model, unseen)) < FP32_TOLERANCE
    params = dict(model.named_parameters())
    assert any(n not in params or not torch.equal(p, params[n]) for n, p in reference.named_parameters())


@pytest.mark.needs("torchao")
def test_rotate_unties_tied_embeddings(tiny_tokenizer, batches):
    model = gqa_llama(len(tiny_tokenizer), tied=True)
    transform_(model, parse_transform("rotate"), batches)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings is False


@pytest.mark.needs("torchao")
def test_rotate_spreads_an_injected_outlier_channel(tiny_tokenizer, batches):
    """A massive channel (7, +60 in every token's embedding) dominates every Linear reading the residual stream;
    the Hadamard spreads it over all 64 channels, so their largest input shrinks several-fold."""
    model = gqa_llama(len(tiny_tokenizer))
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 7] += 60
    rotated = copy.deepcopy(model)
    transform_(rotated, parse_transform("rotate"), batches)

    def largest_inputs(m) -> dict[str, float]:
        readers = {n: lin for n, lin in target_linears(m).items() if n.endswith(("q_proj", "gate_proj"))}
        with input_maxima(list(readers.values())) as maxima, torch.inference_mode():
            for batch in batches:
                m(input_ids=batch)
        return {n: maxima[lin].max().item() for n, lin in readers.items()}

    before, after = largest_inputs(model), largest_inputs(rotated)
    assert before.keys() == after.keys() and len(before) == 4
    for name in before:
        assert after[name] < before[name] / 3, (name, before[name], after[name])
    down = target_linears(rotated)["model.layers.0.mlp.down_proj.linear"]  # the online Hadamard feeds it
    assert type(rotated.get_submodule("model.layers.0.mlp.down_proj")).__name__ == "OnlineRotation"
    assert down.in_features == 128


def test_smoothquant_balances_activation_and_weight_ranges(tiny_tokenizer, batches):
    """Each smoothed input channel's activation max becomes max|X_j| / s_j: alpha = 0.5 gives sqrt(max|X_j|
    max|W_j|), the geometric mean of the two ranges; alpha = 1 gives 1 (all the range moved into the weights)."""
    model = gqa_llama(len(tiny_tokenizer))

    def readers(m):
        layer = m.model.layers[1]
        attn, mlp = layer.self_attn, layer.mlp
        return {"qkv": (attn.q_proj, attn.k_proj, attn.v_proj), "gate/up": (mlp.gate_proj, mlp.up_proj),
                "down": (mlp.down_proj,)}

    def act_max(m):
        groups = readers(m)
        with input_maxima([g[0] for g in groups.values()]) as maxima, torch.inference_mode():
            for batch in batches:
                m(input_ids=batch)
        return {name: maxima[g[0]] for name, g in groups.items()}

    act = act_max(model)
    weight = {name: torch.cat([lin.weight.detach().double() for lin in g]).abs().amax(dim=0)
              for name, g in readers(model).items()}
    for alpha in (0.5, 1.0):
        smoothed = copy.deepcopy(model)
        transform_(smoothed, TransformSpec("smoothquant", alpha), batches)
        for name, after in act_max(smoothed).items():
            expected = (act[name] * weight[name]).sqrt() if alpha == 0.5 else torch.ones_like(after)
            torch.testing.assert_close(after, expected, rtol=1e-4, atol=0, msg=f"{name}, alpha {alpha}")


def test_smoothquant_shares_one_scale_per_value_head(tiny_tokenizer, batches):
    """o_proj's input is smoothed through v_proj's rows: query heads 0 and 1 read value head 0, so their
    channels are divided by one shared s, and the smoothing still leaves the logits alone (test above)."""
    model = gqa_llama(len(tiny_tokenizer))
    smoothed = copy.deepcopy(model)
    transform_(smoothed, parse_transform("smoothquant"), batches)
    before, after = model.model.layers[0].self_attn.o_proj.weight, smoothed.model.layers[0].self_attn.o_proj.weight
    s = (after.double() / before.double())[0].reshape(2, 2, 16)  # (kv head, query head in group, head dim)
    torch.testing.assert_close(s[:, 0], s[:, 1])
    assert not torch.allclose(s[0, 0], torch.ones(16, dtype=torch.float64))


def _llama_with(mitigation: str) -> torch.nn.Module:
    """A Llama whose attention has a mitigation's parts (kv_bias: a learned key k' and value v'; gated_attention: a
    sigmoid gate read from the attention's input), set far from their neutral start so that they matter."""
    from qharness.models import mitigations
    from qharness.training.architectures import ArchConfig, new_model

    model = new_model(ArchConfig(arch="llama", d_model=32, layers=2, heads=2, context=64, vocab_size=400), 0, 1,
                      seed=0)
    mitigations.initialize_(model, mitigations.build_(model, mitigation))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "kv_bias" in name or "gate.proj" in name:
                param.normal_(0.5, 0.2)
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.needs("torchao")
@pytest.mark.parametrize("mitigation", ["kv_bias", "gated_attention", "kv_bias+gated_attention"])
def test_rotate_turns_a_mitigations_attention_parts_with_the_model(batches, mitigation):
    """The gate's projection reads the rotated stream and v' is a value row: both are rotated, so the logits hold
    (rotating neither moves them by more than 1e-1: the check would refuse the model)."""
    model = _llama_with(mitigation)
    reference = copy.deepcopy(model)
    assert transform_(model, parse_transform("rotate"), batches) < FP32_TOLERANCE
    unseen = torch.tensor([[0, *range(5, 60)]])
    assert relative_change(logits(reference, unseen), logits(model, unseen)) < FP32_TOLERANCE
    attention = model.model.layers[0].self_attn
    if "kv_bias" in mitigation and "gated" not in mitigation:  # heads rotated: v' turned with them, k' untouched
        before = reference.model.layers[0].self_attn.kv_bias
        assert not torch.allclose(attention.kv_bias.v, before.v) and torch.equal(attention.kv_bias.k, before.k)


def test_a_model_the_transform_only_seems_to_know_is_refused(batches):
    """kv_bias adds a learned value v' that v_proj does not produce: smoothing v_proj's rows would leave v'
    unscaled, so o_proj would read it multiplied by s. The logit check catches that and refuses the model."""
    model = _llama_with("kv_bias")
    with pytest.raises(ConfigError, match=r"changed this model's fp logits by .* supports Llama-style decoders"):
        transform_(model, parse_transform("smoothquant"), batches)


@pytest.mark.parametrize("text", ["smoothquant", ROTATE])
def test_gpt2_is_refused_naming_the_architectures_supported(text, batches):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=400, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()
    name = text.partition(":")[0]
    with pytest.raises(ConfigError, match=rf"^transform '{name}' supports Llama-style decoders .*; GPT2LMHeadModel "
                                          "is not one$"):
        transform_(model, parse_transform(text), batches)


@pytest.mark.parametrize(("text", "expected"), [
    ("", None), ("none", None), ("smoothquant", "smoothquant:0.5"), ("smoothquant:0.8", "smoothquant:0.8"),
    ("smoothquant:1", "smoothquant:1"), ("rotate", "rotate"), ("smoothquant:-0", "smoothquant:0")])
def test_labels_name_the_argument_always(text, expected):
    spec = parse_transform(text)
    assert (spec.label if spec else None) == expected


@pytest.mark.parametrize(("text", "error", "message"), [
    ("spin", UnknownName, "unknown transform 'spin'; known: rotate, smoothquant"),
    ("smooth", UnknownName, "did you mean 'smoothquant'?"),
    ("smoothquant:1.5", ConfigError, "transform 'smoothquant' takes alpha in [0, 1], got '1.5'; e.g. --transform "
                                     "smoothquant:0.5"),
    ("smoothquant:-0.1", ConfigError, "takes alpha in [0, 1], got '-0.1'"),
    ("smoothquant:high", ConfigError, "takes alpha in [0, 1], got 'high'"),
    ("rotate:0.5", ConfigError, "transform 'rotate' takes no argument, got 'rotate:0.5'; use --transform rotate"),
])
def test_bad_transform_names_what_is_valid(text, error, message):
    with pytest.raises(error) as caught:
        parse_transform(text)
    assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.needs("torchao")
def test_rotate_refuses_a_width_with_no_known_hadamard():
    from qharness.quant.transforms.rotate import hadamard

    with pytest.raises(ConfigError, match="this model has a width of 100$"):
        hadamard(100, seed=0)  # 100 = 20 x 5: no power of 2 times a known order
    q = hadamard(576, seed=0)  # SmolLM2's hidden size: 36 x 16
    torch.testing.assert_close(q @ q.T, torch.eye(576, dtype=torch.float64), rtol=0, atol=1e-12)


def wide_llama(vocab_size: int, seed: int = 0):
    """gqa_llama with weights of std 0.3: bf16's rounding of them moves the logits as far as a wrong layout does."""
    return gqa_llama(vocab_size, seed=seed, weight_std=0.3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("text", ["smoothquant", ROTATE])
def test_a_16_bit_model_is_checked_in_fp32_where_rounding_cannot_pass_for_a_wrong_layout(tiny_tokenizer, batches,
                                                                                          text, dtype):
    """bf16 is what --dtype auto loads on CUDA. Re-rounding a correctly transformed model's weights to bf16 moves
    this model's logits by 0.08 (rotate) and 0.10 (smoothquant), fp16 by 0.01 (measured): a check made in bf16 at a
    tolerance that still catches a wrong layout (0.31, 0.53) refused the correct transform, blaming the layout."""
    model = wide_llama(len(tiny_tokenizer)).to(dtype)
    reference = copy.deepcopy(model)
    drift = transform_(model, parse_transform(text), batches)
    assert 0 < drift < 0.3
    assert {p.dtype for p in model.parameters()} == {dtype}  # the checked fp32 copy is not what is returned
    unseen = torch.tensor([[0, *range(5, 60)]])
    assert relative_change(logits(reference, unseen), logits(model, unseen)) < 0.3  # transformed, not broken


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_model_the_transform_only_seems_to_know_is_refused_by_its_fp32_copy(batches, dtype):
    model = _llama_with("kv_bias")
    with pytest.raises(ConfigError, match=r"changed this model's fp logits by .* \(checked on an fp32 copy\) "
                                          r"\(tolerance 1e-03\), so its layout is not what the transform knows"):
        transform_(model.to(dtype), parse_transform("smoothquant"), batches)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("text", ["smoothquant", ROTATE])
def test_on_cuda_a_transformed_16_bit_model_stays_on_its_device_and_quantizes(tiny_tokenizer, batches, text, dtype):
    """The Hadamard matrices are made on the CPU in float64 and the online one before down_proj is a buffer: all of
    it must land on the model's device, the weights in the model's dtype, and every backend must then quantize the
    transformed model there. Not yet run on a GPU; the tolerances are the CPU test's reasoning (bf16 rounding of
    gqa_llama's weights moves its logits by about 1e-2)."""
    from qharness.core.errors import BackendUnavailable
    from qharness.quant.apply import quantize_
    from qharness.quant.modules import OnlineRotation
    from qharness.quant.schemes import get_scheme

    model = gqa_llama(len(tiny_tokenizer)).to("cuda", dtype)
    reference = copy.deepcopy(model)
    cuda_batches = [b.cuda() for b in batches]
    drift = transform_(model, parse_transform(text), cuda_batches)
    assert drift < 5e-2
    assert {p.device.type for p in model.parameters()} | {b.device.type for b in model.buffers()} == {"cuda"}
    assert {p.dtype for p in model.parameters()} == {dtype}
    rotations = [m.rotation for m in model.modules() if isinstance(m, OnlineRotation)]
    assert all(r.dtype == torch.float32 for r in rotations) and len(rotations) == (2 if text == "rotate" else 0)
    unseen = torch.tensor([[0, *range(5, 60)]], device="cuda")
    assert relative_change(logits(reference, unseen), logits(model, unseen)) < 5e-2
    for backend, scheme in (("sim", "int4-w4a4-token"), ("torchao", "int8-w8a8-token-halfspan"),
                            ("bnb", "llm-int8-bnb")):
        quantized = copy.deepcopy(model)
        try:
            assert quantize_(quantized, get_scheme(scheme), backend=backend) == backend
        except BackendUnavailable as exc:
            if "pip install" in str(exc):  # that library is not installed on this machine
                continue
            raise
        out = logits(quantized, unseen)
        assert torch.isfinite(out).all(), (backend, scheme)
