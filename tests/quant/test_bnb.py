"""bitsandbytes against `sim`: the same math, checked on a layer and on a tiny model (CPU kernels)."""

import copy

import pytest
import torch
from agreement import logit_distances, relative

from qharness.quant.apply import quantize_
from qharness.quant.schemes import get_scheme
from qharness.quant.sim import SimQuantLinear

pytestmark = pytest.mark.needs("bitsandbytes")


def test_nf4_weights_equal_sim_exactly():
    from bitsandbytes.functional import dequantize_4bit

    from qharness.quant.backends.bnb import _nf4_linear
    from qharness.quant.sim import fake_quantize

    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 64)
    module = _nf4_linear(linear, 64)
    weights = dequantize_4bit(module.weight.data, module.weight.quant_state)
    assert torch.equal(weights, fake_quantize(linear.weight.data, get_scheme("nf4").weights))


def test_llm_int8_layer_without_outliers_is_sim_computed_in_fp16():
    """bitsandbytes' CPU LLM.int8() quantizes the weight and the activations from fp16 copies: without an outlier
    column it is sim's llm-int8 (and llm-int8-bnb, the same there) on the layer in fp16. Measured over 4 seeds:
    3.3e-4 to 1.2e-3 of the output's range from sim-in-fp16, against the quantization's own effect there of 5.2e-3
    to 9.4e-3 (ratio <= 0.13).
    With an outlier column the two can differ by more than rounding (the next test)."""
    from qharness.quant.backends.bnb import _int8_linear

    for seed in range(4):
        torch.manual_seed(seed)
        linear = torch.nn.Linear(128, 64)
        x = torch.randn(2, 5, 128).clamp(-5.9, 5.9)  # below the threshold of 6: no column kept
        with torch.inference_mode():
            bnb_out = _int8_linear(linear, 6.0).eval()(x)
            half = copy.deepcopy(linear).half()
            sim16 = SimQuantLinear(half, get_scheme("llm-int8"))(x.half()).float()
            reference = half(x.half()).float()
        assert relative(bnb_out, sim16) <= 0.2 * relative(reference, sim16), seed


def bnb_llm_int8_by_hand(linear: torch.nn.Linear, x: torch.Tensor, threshold: float) -> torch.Tensor:
    """bitsandbytes 0.50's CPU LLM.int8() (MatMul8bitLt and its default kernels), written out: weight and
    activations quantized from fp16 copies with scale absmax/127; only the entries >= threshold are zeroed before a
    row's absmax is taken, then the whole outlier column is dropped from the int8 product and added back from x."""
    a = x.reshape(-1, x.shape[-1])
    a16 = a.half()
    outliers = a16.abs() >= threshold
    columns = outliers.any(dim=0)
    rows = a16.masked_fill(outliers, 0)
    row_stats = rows.abs().amax(dim=1).float()
    ca = torch.round(rows * (127.0 / row_stats.unsqueeze(-1))).masked_fill(columns, 0)
    w16 = linear.weight.detach().half()
    col_stats = w16.abs().amax(dim=1).float()
    cb = torch.round(w16 * (127.0 / col_stats.unsqueeze(-1)))
    out = (ca @ cb.t()) * (row_stats.unsqueeze(-1) * col_stats.unsqueeze(0)) * 6.200124e-05  # bnb's 1 / 127^2
    out = out + a[:, columns] @ (cb[:, columns] * (col_stats.unsqueeze(-1) / 127)).t()
    if linear.bias is not None:
        out = out + linear.bias.detach()
    return out.reshape(*x.shape[:-1], -1)


def test_llm_int8_with_an_outlier_column_is_bitsandbytes_rule_which_sim_computes_as_llm_int8_bnb():
    """With an outlier column bitsandbytes computes its own rule (bnb_llm_int8_by_hand: the column's other entries
    stay in each row's scale), not the paper's (the whole kept column out of the scale, sim's `llm-int8`). Where
    those other entries are their rows' largest (5.5 here, under the threshold), the two rules part: measured over 3
    seeds, bnb is <= 1.0e-7 of the output's range from its rule by hand and 4.3e-3 to 5.1e-3 from sim's llm-int8 in
    fp16, as far as the unquantized layer is (4.3e-3 to 5.2e-3). sim's `llm-int8-bnb` is that rule: bnb is within
    fp16 rounding of it (the no-outlier test's bound), so bnb runs `llm-int8-bnb` and never `llm-int8`."""
    from qharness.quant.backends.bnb import _int8_linear

    for seed in range(3):
        torch.manual_seed(seed)
        linear = torch.nn.Linear(128, 64)
        x = torch.randn(2, 5, 128)
        x[0, 0, 3] = 50.0  # column 3 is an outlier column, kept in 16-bit by both
        x[1, :, 3] = 5.5  # and holds the largest entry of these rows
        with torch.inference_mode():
            bnb_out = _int8_linear(linear, 6.0).eval()(x)
            by_hand = bnb_llm_int8_by_hand(linear, x, 6.0)
            half = copy.deepcopy(linear).half()
            paper = SimQuantLinear(half, get_scheme("llm-int8"))(x.half()).float()
            bnb_rule = SimQuantLinear(half, get_scheme("llm-int8-bnb"))(x.half()).float()
            reference = half(x.half()).float()
        assert relative(bnb_out, by_hand) <= 1e-5, seed
        assert relative(bnb_out, paper) >= 0.5 * relative(reference, paper), seed
        assert relative(bnb_out, bnb_rule) <= 0.2 * relative(reference, bnb_rule), seed


def test_the_bnb_rule_in_sim_counts_the_threshold_and_keeps_other_entries_in_the_scale():
    """By hand on one row: entries 8 (outlier) and 6 (at the threshold: an outlier for bitsandbytes, not for the
    paper's > 6) and 3 in a kept column's other row."""
    linear = torch.nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, 1.0, 1.0, 1.0]]))
    x = torch.tensor([[[8.0, 1.0, 0.5, 0.25], [3.0, 1.0, 6.0, 0.25]]])  # columns 0 and 2 hold outliers
    bnb_rule = SimQuantLinear(linear, get_scheme("llm-int8-bnb"))
    paper = SimQuantLinear(linear, get_scheme("llm-int8"))
    with torch.inference_mode():
        bnb_input = bnb_rule._quantize_input(x)
        paper_input = paper._quantize_input(x)
    # bnb: columns 0 (8 >= 6) and 2 (6 >= 6) kept. Row 0's scale from max(1, 0.5, 0.25) = 1 with 8 zeroed; row 1's
    # from max(3, 1, 0.25) = 3: its column-0 entry 3 is no outlier, so it counts, and only the 6 is zeroed
    assert torch.allclose(bnb_input[0, 0], torch.tensor([8.0, 127 / 127, 0.5, 32 / 127]))
    assert torch.allclose(bnb_input[0, 1], torch.tensor([3.0, 42 * 3 / 127, 6.0, 11 * 3 / 127]))
    # the paper's rule: only column 0 kept (6 is not > 6), its every entry out of the scale: row 1's scale from 6
    assert torch.allclose(paper_input[0, 1], torch.tensor([3.0, 21 * 6 / 127, 127 * 6 / 127, 5 * 6 / 127]))


def test_llm_int8_through_quantize_is_that_rule_at_the_schemes_threshold(tiny_model):
    """The layers quantize_ builds compute the rule above with llm-int8's threshold of 6 (measured <= 1e-7 of the
    output's range from it by hand); at another threshold the outlier column would be quantized too."""
    fp = copy.deepcopy(tiny_model)
    assert quantize_(tiny_model, get_scheme("llm-int8-bnb"), backend="bnb") == "bnb"
    torch.manual_seed(0)
    x = torch.randn(2, 5, 128)
    x[0, 0, 3] = 50.0
    x[1, :, 3] = 5.5
    with torch.inference_mode():
        out = tiny_model.model.layers[0].mlp.down_proj(x)
        by_hand = bnb_llm_int8_by_hand(fp.model.layers[0].mlp.down_proj, x, 6.0)
        no_outliers = bnb_llm_int8_by_hand(fp.model.layers[0].mlp.down_proj, x, 1e9)
    assert relative(out, by_hand) <= 1e-5
    assert relative(no_outliers, by_hand) > 1e-3  # the threshold matters on this input (measured 2.3e-2)


# NF4: the weights are equal (above), but bitsandbytes' 4-bit CPU matmul is not an fp32 GEMM on them (about 0.3%
# of the output's range away): measured 4.0e-3 from sim against NF4's own effect of 0.12-0.13, ratio <= 0.034.
def test_nf4_logits_agree_with_sim(tiny_model):
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 16))
    fp, sim_model = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    assert quantize_(tiny_model, get_scheme("nf4"), backend="bnb") == "bnb"
    quantize_(sim_model, get_scheme("nf4"), backend="sim")
    d = logit_distances(tiny_model, sim_model, fp, ids)
    assert d.backend <= 0.1 * d.effect, d


def test_llm_int8_does_not_log_a_cast_notice_per_call(caplog):
    from qharness.quant.backends.bnb import _int8_linear

    torch.manual_seed(0)
    module = _int8_linear(torch.nn.Linear(64, 32), 6.0).eval()
    with caplog.at_level("WARNING"), torch.inference_mode():
        out = module(torch.randn(3, 64))  # fp32 in: bitsandbytes casts to fp16 and would log it every call
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert not [r for r in caplog.records if "cast" in r.getMessage()]


def test_a_scheme_outside_the_table_is_an_error_not_nf4(tiny_model):
    from qharness.core.errors import BackendUnavailable
    from qharness.quant.apply import target_linears
    from qharness.quant.backends import QuantContext
    from qharness.quant.backends.bnb import apply_bnb
    from qharness.quant.schemes import Keep

    targets = target_linears(tiny_model)
    with pytest.raises(BackendUnavailable, match="^backend 'bnb' does not implement scheme 'int4-weight-g128'; "
                                                 "it implements llm-int8-bnb, nf4$"):
        apply_bnb(tiny_model, get_scheme("int4"), targets, Keep(), QuantContext(torch.device("cpu")))
    assert type(tiny_model.model.layers[0].mlp.down_proj) is torch.nn.Linear



def test_nf4_on_the_cpu_refuses_widths_its_packed_kernel_cannot_take():
    """On a CPU with AVX512-BF16, Linear4bit repacks its weight at the first eval forward and reshapes the block
    scales to (out, in // blocksize): an input width that is not whole blocks of 64 (or an output width that is not
    a multiple of 32) failed there with "shape '[32, 0]' is invalid", after quantize_ had reported success."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qharness.core.errors import BackendUnavailable

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).eval()
    with pytest.raises(BackendUnavailable, match=r"^backend 'bnb' runs 'nf4' on input widths divisible by 64; "
                                                 r"model.layers.0.self_attn.q_proj has 32; use --backend sim"):
        quantize_(model, get_scheme("nf4"), backend="bnb")
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # refused before any swap
    assert quantize_(model, get_scheme("nf4")) == "sim"

# On CUDA the model is moved first and quantized there: the weights must be quantized by the move from the CPU
# inside _int8_linear (a CUDA weight would stay fp). How close the numbers are to sim: test_cuda_agreement.py
@pytest.mark.gpu
@pytest.mark.parametrize("scheme", ["llm-int8-bnb", "nf4"])
def test_cuda_weights_are_quantized_on_the_device(tiny_model, scheme):
    model = tiny_model.to("cuda", torch.bfloat16)
    assert quantize_(model, get_scheme(scheme)) == "bnb"  # auto on CUDA prefers the library kernel
    layer = model.model.layers[0].mlp.down_proj
    assert layer.weight.device.type == "cuda"
    assert layer.weight.dtype == (torch.int8 if scheme == "llm-int8-bnb" else torch.uint8)  # quantized, not fp
    with torch.inference_mode():
        assert torch.isfinite(model(torch.randint(0, 300, (2, 16), device="cuda")).logits).all()


def test_llm_int8_bnb_agrees_with_sim_in_fp16_layer_by_layer_on_a_random_llama():
    """The CUDA agreement test's measure, on CPU: bitsandbytes casts activations to fp16, so it is held to sim run in
    fp16, within 4x fp16's own gap (measured 5.7e-4 against a tolerance of 1.7e-3 and an effect of 8.8e-3)."""
    from qharness.quant.agreement import llama_builder, measure_agreement

    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    result = measure_agreement(llama_builder(128), "llm-int8-bnb", "bnb", torch.float32, torch.device("cpu"), ids)
    assert result.level == "layer" and result.can_discriminate, result.line()
    assert result.ok, result.line()
