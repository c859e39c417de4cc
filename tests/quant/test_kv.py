"""KV-cache quantization: the arithmetic against hand-written scales, keep-first, the KIVI block rule, causality,
eager == SDPA, cached decoding == prefill, and the refusals."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from qharness.core.errors import ConfigError, UnknownName
from qharness.quant.kv import (
    KV_SETTINGS,
    block_done,
    check_kv_model,
    fake_quantize_kv,
    get_kv,
    kv_quantized,
    split_quants,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from test_attention import mitigated_model, small_model  # noqa: E402  (the tiny Llama / GPT-2 of those tests)

ALL = [f"{name}{keep}" for name in KV_SETTINGS.names() for keep in ("", "+keep0")]
QMAX = {"int8": 255, "int4": 15}  # asymmetric integer codes: (qmax - qmin)


def kv_tensors(seed: int = 0, length: int = 40):
    torch.manual_seed(seed)
    query = torch.randn(2, 4, length, 8)
    key, value = torch.randn(2, 2, length, 8), torch.randn(2, 2, length, 8)
    return query, key, value


def asym_int(x: torch.Tensor, levels: int) -> torch.Tensor:
    """The definition, for one group of numbers: min/max range with zero inside, `levels` steps, zero point."""
    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    scale = (hi - lo) / levels or 1.0
    qmin = -(levels + 1) // 2
    zero = qmin - round(lo / scale)
    return (torch.clamp(torch.round(x / scale) + zero, qmin, qmin + levels) - zero) * scale


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_token_setting_has_one_scale_per_token_and_head(fmt):
    setting = get_kv(f"{fmt}-token")
    query, key, value = kv_tensors()
    qkey, qvalue, mask = fake_quantize_kv(setting, query, key, value, None)
    assert mask is None and qkey.shape == key.shape
    for b, h, t in [(0, 0, 0), (1, 1, 17), (0, 1, 39)]:
        torch.testing.assert_close(qkey[b, h, t], asym_int(key[b, h, t], QMAX[fmt]), atol=1e-6, rtol=0)
        torch.testing.assert_close(qvalue[b, h, t], asym_int(value[b, h, t], QMAX[fmt]), atol=1e-6, rtol=0)


def test_kivi_keys_have_one_scale_per_channel_over_a_block_and_values_per_token():
    setting = get_kv("int4-kivi")
    query, key, value = kv_tensors()
    qkey, qvalue, _ = fake_quantize_kv(setting, query, key, value, None)
    quantized = qkey[:, :, :40]  # [quantized; fp]
    torch.testing.assert_close(qkey[:, :, 40:], key)
    for b, h, d, block in [(0, 0, 0, 0), (1, 1, 5, 1)]:
        tokens = slice(block * setting.block, (block + 1) * setting.block)
        torch.testing.assert_close(quantized[b, h, tokens, d], asym_int(key[b, h, tokens, d], 15), atol=1e-6, rtol=0)
    torch.testing.assert_close(qvalue[:, :, :40], fake_quantize_kv(get_kv("int4-token"), query, key, value, None)[1])


def test_an_outlier_costs_its_own_token_per_token_and_its_own_channel_per_channel():
    query, key, value = kv_tensors()
    loud = key.clone()
    loud[:, :, 3] *= 100  # one outlier token
    token = get_kv("int4-token")
    changed = (fake_quantize_kv(token, query, loud, value, None)[0] != fake_quantize_kv(token, query, key, value,
                                                                                       None)[0])
    assert changed[:, :, 3].any() and not changed[:, :, :3].any() and not changed[:, :, 4:].any()
    loud = key.clone()
    loud[..., 2] *= 100  # one outlier channel
    kivi = get_kv("int4-kivi")
    changed = fake_quantize_kv(kivi, query, loud, value, None)[0] != fake_quantize_kv(kivi, query, key, value, None)[0]
    assert changed[..., 2].any() and not changed[..., :2].any() and not changed[..., 3:].any()


@pytest.mark.parametrize("name", [n for n in ALL if n.endswith("+keep0")])
def test_keep0_leaves_position_0_exact_and_out_of_the_scales(name):
    setting = get_kv(name)
    query, key, value = kv_tensors()
    key[:, :, 0] *= 1000  # a sink token far out of range
    value[:, :, 0] *= 1000
    qkey, qvalue, _ = fake_quantize_kv(setting, query, key, value, None)
    assert torch.equal(qkey[:, :, 0], key[:, :, 0]) and torch.equal(qvalue[:, :, 0], value[:, :, 0])
    quiet_key, quiet_value = key.clone(), value.clone()
    quiet_key[:, :, 0], quiet_value[:, :, 0] = 0, 0  # what the others are quantized as: token 0 does not count
    expected_key, expected_value, _ = fake_quantize_kv(dataclasses.replace(setting, keep_first=False), query,
                                                       quiet_key, quiet_value, None)
    torch.testing.assert_close(qkey[:, :, 1:40], expected_key[:, :, 1:40])  # kivi: [quantized; fp], the first 40
    torch.testing.assert_close(qvalue[:, :, 1:40], expected_value[:, :, 1:40])
    plain, _, _ = fake_quantize_kv(get_kv(name.split("+")[0]), query, key, value, None)
    assert not torch.equal(plain[:, :, 0], key[:, :, 0])
    # without keep0 the sink stretches every channel scale of its block; FP8's exponent absorbs a 1000x range, so
    # only the integer grids lose the rest of the block to it
    if setting.key_axis == "channel" and setting.format.startswith("int"):
        error = {n: (k[:, :, 1:setting.block] - key[:, :, 1:setting.block]).abs().mean() for n, k in
                 (("plain", plain), ("kept", qkey))}
        assert error["plain"] > 10 * error["kept"], error


@pytest.mark.parametrize("name", KV_SETTINGS.names())
def test_every_setting_keeps_shapes_and_meets_its_sqnr_floor(name):
    query, key, value = kv_tensors(length=64)
    qkey, qvalue, _ = fake_quantize_kv(get_kv(name), query, key, value, None)
    assert qkey.shape[:2] == key.shape[:2] and qvalue.dtype == value.dtype
    floor = {"int8": 35, "int4": 12, "fp8": 25}[name.split("-")[0]]  # dB; fp8 e4m3: 3 mantissa bits, ~30 dB
    for q, x in ((qkey[:, :, :64], key), (qvalue[:, :, :64], value)):
        sqnr = 10 * torch.log10(x.pow(2).mean() / (q - x).pow(2).mean())
        assert sqnr > floor, f"{name}: {sqnr:.1f} dB"


def test_a_kivi_query_sees_a_quantized_key_only_once_its_block_has_ended():
    done = block_done(query_length=8, key_length=8, block=4, device="cpu")
    assert done[3, :4].all() and not done[2, :4].any() and not done[:7, 4:].any() and done[7].all()
    decode = block_done(query_length=1, key_length=7, block=4, device="cpu")  # one new token, 6 cached
    assert decode[0].tolist() == [True] * 4 + [False] * 3
    query, key, value = kv_tensors(length=8)
    _, _, mask = fake_quantize_kv(dataclasses.replace(get_kv("int4-kivi"), block=4), query, key, value, None)
    causal = torch.ones(8, 8, dtype=torch.bool).tril()
    assert torch.equal(mask[0, 0, :, :8], causal & done) and torch.equal(mask[0, 0, :, 8:], causal & ~done)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("name", ALL)
def test_eager_and_sdpa_give_the_same_logits_and_stay_causal(arch, name):
    """The keys and values are quantized before eager or SDPA is chosen, so both see the same numbers; what is left
    is the fp32 summation order of the two attention kernels (~1e-7), the tolerance of the unquantized models in
    test_attention. A rounding flip in a later layer would break this, and does not happen on these inputs."""
    setting = get_kv(name)
    ids = torch.randint(2, 64, (2, 40))
    changed = ids.clone()
    changed[:, 33] = (changed[:, 33] + 1) % 64
    logits = {}
    for implementation in ("eager", "sdpa"):
        model = small_model(arch, implementation)
        with torch.no_grad():
            fp = model(ids).logits
            with kv_quantized(model, setting):
                before, after = model(ids).logits, model(changed).logits
        assert model.config._attn_implementation == implementation  # put back as it was
        assert torch.equal(before[:, :33], after[:, :33]), "a later token changed an earlier output"
        assert not torch.allclose(before, fp, atol=1e-5), "the KV cache was not quantized"
        logits[implementation] = before
    torch.testing.assert_close(logits["eager"], logits["sdpa"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["int4-token+keep0", "int4-kivi", "fp8-e4m3-kivi+keep0"])
def test_decoding_through_the_cache_gives_the_prefill_logits(name):
    """What the prefill simulates is a cache filled token by token: decoding one token at a time (the cache holds
    fp keys, quantized at each step) must give the same logits, block rule included."""
    model = small_model("llama", "sdpa")
    ids = torch.randint(2, 64, (1, 40))
    with torch.no_grad(), kv_quantized(model, get_kv(name)):
        prefill = model(ids).logits
        out = model(ids[:, :30], use_cache=True)
        steps = [out.logits]
        for t in range(30, 40):
            out = model(ids[:, t:t + 1], cache=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), prefill, atol=1e-5, rtol=1e-4)


def test_kv_quantization_composes_with_a_kv_bias_mitigation():
    ids = torch.randint(2, 64, (1, 40))
    logits = {}
    for implementation in ("eager", "sdpa"):
        model = mitigated_model("llama", "kv_bias", implementation)
        with torch.no_grad(), kv_quantized(model, get_kv("int4-kivi+keep0")):
            logits[implementation] = model(ids).logits
        assert model.config._attn_implementation.startswith("qharness")  # the mitigation keeps its implementation
    torch.testing.assert_close(logits["eager"], logits["sdpa"], atol=1e-5, rtol=1e-4)


def test_names_parse_and_bad_names_say_what_is_valid():
    assert get_kv("none") is None and get_kv("") is None
    kept = get_kv("int4-kivi+keep0")
    assert (kept.name, kept.keep_first, kept.key_axis, kept.format) == ("int4-kivi+keep0", True, "channel", "int4")
    with pytest.raises(UnknownName, match=r"unknown KV setting 'int4-tokn'; did you mean 'int4-token'.*append \+keep0"):
        get_kv("int4-tokn")
    with pytest.raises(ConfigError, match=r"unknown option '\+keep1'; the one option is \+keep0"):
        get_kv("int8-token+keep1")
    with pytest.raises(ConfigError, match="given twice"):
        get_kv("int8-token+keep0+keep0")


def test_combinations_that_measure_nothing_new_are_refused():
    kv = get_kv("int8-token")
    assert split_quants(("none", "int8"), kv, has_keep=False) == (("int8",), True)
    assert split_quants(("int8",), None, has_keep=False) == (("int8",), False)
    assert split_quants(("none", "int8"), None, has_keep=False) == (("int8",), False)  # none: the baseline it runs
    with pytest.raises(ConfigError, match="--quant none alone is the full-precision baseline"):
        split_quants(("none",), None, has_keep=False)
    with pytest.raises(ConfigError, match=r"quantizes no Linear; drop them .* --kv int8-token\+keep0"):
        split_quants(("none",), kv, has_keep=True)


def test_a_model_without_the_attention_interface_is_refused(monkeypatch):
    model = small_model("llama", "sdpa")
    monkeypatch.setattr(type(model), "_supports_attention_backend", False)
    with pytest.raises(ConfigError, match="LlamaForCausalLM does not take transformers' attention implementations"):
        check_kv_model(model, get_kv("int8-token"))


def test_a_model_whose_attention_never_calls_the_quantizer_is_refused(monkeypatch):
    from qharness.models import attention

    model = small_model("llama", "sdpa")
    monkeypatch.setattr(attention, "use_mitigated_attention_", lambda m: None)  # stays on transformers' own sdpa
    with pytest.raises(ConfigError, match=r"computes attention in layers \[0, 1\] without calling the registered"):
        check_kv_model(model, get_kv("int8-token"))
    assert not hasattr(model.model.layers[0].self_attn, "kv_quant")  # nothing left attached


# ---- CUDA (none of this has run on a GPU yet: the tolerances are reasoned, not measured) ---------------------------
# CUDA computes the keys with other kernels, so an int4 code can flip where a key sits on a rounding boundary; one
# flip moves a logit by far less than 1% of the largest. 16-bit adds its own rounding (bf16: 8 bits, ~0.4% per
# value, through two layers). A mask or device bug moves them by O(1).
CUDA_TOLERANCE = {torch.float32: 1e-2, torch.float16: 2e-2, torch.bfloat16: 5e-2}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["int8-token", "int4-token+keep0", "int4-kivi", "fp8-e4m3-kivi+keep0"])
def test_on_cuda_eager_and_sdpa_quantize_the_cache_as_on_the_cpu_and_stay_causal(name, dtype):
    """On CUDA, SDPA picks its own kernels (flash without a mask, memory-efficient with KIVI's bool mask) and the
    model may be 16-bit: both implementations must still see the quantized cache, causally."""
    setting = get_kv(name)
    ids = torch.randint(2, 64, (2, 40))
    changed = ids.clone()
    changed[:, 33] = (changed[:, 33] + 1) % 64
    reference_model = small_model("llama", "eager")  # fp32 on the CPU, same seed: the same weights
    with torch.no_grad(), kv_quantized(reference_model, setting):
        reference = reference_model(ids).logits.double()
    tolerance = CUDA_TOLERANCE[dtype]
    for implementation in ("eager", "sdpa"):
        model = small_model("llama", implementation).to("cuda", dtype)
        with torch.no_grad(), kv_quantized(model, setting):
            before = model(ids.cuda()).logits
            after = model(changed.cuda()).logits
        assert before.dtype == dtype and torch.isfinite(before).all()
        before, after = before.double().cpu(), after.double().cpu()
        scale = reference.abs().max()
        assert (before[:, :33] - after[:, :33]).abs().max() <= tolerance * scale, "a later token changed an earlier"
        assert (before - reference).abs().max() <= tolerance * scale, implementation


@pytest.mark.gpu
@pytest.mark.parametrize(("backend", "scheme"), [
    pytest.param("bnb", "nf4", marks=pytest.mark.needs("bitsandbytes")),
    pytest.param("bnb", "llm-int8-bnb", marks=pytest.mark.needs("bitsandbytes")),
    pytest.param("torchao", "int8-weight-channel-halfspan", marks=pytest.mark.needs("torchao")),
    pytest.param("torchao", "int8-w8a8-token-halfspan", marks=pytest.mark.needs("torchao")),
])
def test_on_cuda_the_cache_is_quantized_inside_a_library_backends_model(tiny_model, backend, scheme):
    """The library backends swap the Linears only; attention, where the cache is quantized, stays transformers'.
    Every layer must still call the quantizer (check_kv_model) and the logits must move. (tiny_model: widths of 64
    and 128, whole NF4 blocks.)"""
    from qharness.quant.apply import quantize_
    from qharness.quant.schemes import get_scheme

    model = tiny_model.to("cuda", torch.bfloat16)
    assert quantize_(model, get_scheme(scheme), backend=backend) == backend
    setting = get_kv("int4-kivi+keep0")
    check_kv_model(model, setting)
    ids = torch.randint(2, 300, (2, 40), device="cuda")
    with torch.no_grad():
        plain = model(ids).logits
        with kv_quantized(model, setting):
            quantized = model(ids).logits
    assert torch.isfinite(quantized).all() and not torch.equal(plain, quantized)
    assert model.config._attn_implementation == "sdpa"


def reference_attention(setting):
    """transformers' own SDPA attention on keys and values quantized by fake_quantize_kv (whose arithmetic the tests
    above check by hand): an independent route to what kv_quantized must compute."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attention(module, query, key, value, attention_mask, **kwargs):
        key, value, attention_mask = fake_quantize_kv(setting, query, key, value, attention_mask)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    return attention


@pytest.mark.parametrize("name", ALL)
def test_the_model_computes_with_exactly_the_quantized_cache(name):
    """The logits under kv_quantized equal those of transformers' attention fed the quantized keys and values, to
    float rounding (measured: 0, the same kernels on the same numbers), while quantizing the cache moves them by
    9.5e-4 (int8+keep0) to 5.0e-2 (int4) of their range: the cache was quantized, keys and values both, as
    defined, in every layer."""
    from transformers import AttentionInterface

    setting = get_kv(name)
    AttentionInterface.register(f"kv_reference_{name}", reference_attention(setting))
    ids = torch.randint(2, 64, (2, 40))
    model = small_model("llama", "sdpa")
    reference_model = small_model("llama", "sdpa")
    reference_model.set_attn_implementation(f"kv_reference_{name}")
    with torch.no_grad():
        fp = model(ids).logits
        with kv_quantized(model, setting):
            quantized = model(ids).logits
        reference = reference_model(ids).logits
    distance = ((quantized - reference).abs().max() / reference.abs().max()).item()
    effect = ((fp - reference).abs().max() / reference.abs().max()).item()
    assert distance <= 1e-6 and effect >= 5e-4, (distance, effect)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["int8-token", "int4-token+keep0", "int4-kivi", "fp8-e4m3-kivi+keep0"])
def test_on_cuda_the_model_computes_with_exactly_the_quantized_cache(name, dtype):
    """As test_the_model_computes_with_exactly_the_quantized_cache, on CUDA in each dtype: compared on the same
    device, dtype and SDPA kernels, so 16-bit rounding is on both sides and the bound can be a quarter of what
    quantizing the cache changes (on the CPU in fp32 the two are identical). Not yet run on a GPU."""
    from transformers import AttentionInterface

    setting = get_kv(name)
    AttentionInterface.register(f"kv_reference_{name}", reference_attention(setting))
    ids = torch.randint(2, 64, (2, 40), device="cuda")
    model = small_model("llama", "sdpa").to("cuda", dtype)
    reference_model = small_model("llama", "sdpa").to("cuda", dtype)
    reference_model.set_attn_implementation(f"kv_reference_{name}")
    with torch.no_grad():
        fp = model(ids).logits.double()
        with kv_quantized(model, setting):
            quantized = model(ids).logits.double()
        reference = reference_model(ids).logits.double()
    scale = reference.abs().max()
    distance, effect = (quantized - reference).abs().max() / scale, (fp - reference).abs().max() / scale
    assert effect > 0 and distance <= 0.25 * effect, (distance.item(), effect.item())
