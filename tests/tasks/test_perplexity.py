import math

import pytest
import torch

from qharness.core.errors import ConfigError
from qharness.tasks.perplexity import bos_token_id, perplexity, token_windows


def test_windows_are_non_overlapping_and_each_starts_with_bos():
    windows = token_windows(list(range(10, 20)), context_length=4, bos_id=0)
    assert windows == [[0, 10, 11, 12], [0, 13, 14, 15], [0, 16, 17, 18], [0, 19]]


def test_windows_without_bos_hold_the_same_text():
    assert token_windows(list(range(10, 17)), 4, None) == [[10, 11, 12], [13, 14, 15]]  # [16] predicts nothing


def hand_nll(model, windows: list[list[int]]) -> tuple[float, int]:
    """Token by token: -log p(w[t] | w[:t]) from a full forward pass per prefix."""
    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            for t in range(1, len(window)):
                logits = model(torch.tensor([window[:t]])).logits[0, -1].double()
                total -= torch.log_softmax(logits, dim=-1)[window[t]].item()
                count += 1
    return total, count


def test_perplexity_matches_hand_computed_nll(tiny_model, tiny_tokenizer):
    text = "And the LORD spake unto the fish, and it vomited out Jonah upon the dry land."
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    for bos in (True, False):
        windows = token_windows(ids, 8, tiny_tokenizer.bos_token_id if bos else None)
        total, count = hand_nll(tiny_model, windows)
        metric = perplexity(tiny_model, tiny_tokenizer, text, 8, bos=bos, progress=False)
        assert metric.n == count == (len(ids) if bos else len(ids) - len(windows))
        assert metric.value == pytest.approx(math.exp(total / count), rel=1e-5)
        assert metric.kind == "token-level" and metric.name == "ppl" and not metric.higher_is_better


def test_result_does_not_depend_on_batch_size(tiny_model, tiny_tokenizer, heldout_text):
    text = heldout_text[:4000]
    values = {b: perplexity(tiny_model, tiny_tokenizer, text, 32, batch_size=b, progress=False).value
              for b in (1, 3, 16)}
    assert values[3] == pytest.approx(values[1], rel=1e-5)
    assert values[16] == pytest.approx(values[1], rel=1e-5)


def test_limit_takes_the_first_windows(tiny_model, tiny_tokenizer, heldout_text):
    full = perplexity(tiny_model, tiny_tokenizer, heldout_text[:2000], 32, progress=False)
    limited = perplexity(tiny_model, tiny_tokenizer, heldout_text[:2000], 32, limit=2, progress=False)
    assert limited.n == 2 * 31 < full.n


def test_bos_falls_back_to_eos_and_errors_without_either():
    class Tok:
        bos_token_id = None
        eos_token_id = 7

    assert bos_token_id(Tok()) == 7
    Tok.eos_token_id = None
    with pytest.raises(ConfigError, match="neither a BOS nor an EOS token to prepend; run with --no-bos"):
        bos_token_id(Tok())


def test_bad_arguments_are_config_errors(tiny_model, tiny_tokenizer):
    with pytest.raises(ConfigError, match="batch size must be >= 1, got 0"):
        perplexity(tiny_model, tiny_tokenizer, "some text", 8, batch_size=0)
    with pytest.raises(ConfigError, match="too short for one perplexity window"):
        perplexity(tiny_model, tiny_tokenizer, "", 8)


def test_per_token_nlls_come_back_in_text_order_whatever_the_batch(tiny_model, tiny_tokenizer, heldout_text):
    """The units intervals are built from: one NLL per predicted token, window after window, the same for any
    batch size (windows of one length share a batch; the last, shorter window comes back last)."""
    text = heldout_text[:1500]
    one = perplexity(tiny_model, tiny_tokenizer, text, 32, batch_size=1, progress=False)
    many = perplexity(tiny_model, tiny_tokenizer, text, 32, batch_size=5, progress=False)
    assert len(one.units) == one.n and one.windows == math.ceil(one.n / 31)
    assert one.value == pytest.approx(math.exp(one.units.mean()), rel=1e-12)
    assert many.units == pytest.approx(one.units, rel=1e-5) and many.units_hash == one.units_hash
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    first = token_windows(ids, 32, tiny_tokenizer.bos_token_id)[:1]
    total, count = hand_nll(tiny_model, first)
    assert one.units[:count].sum() == pytest.approx(total, rel=1e-5)  # the first window's tokens come first
    other = perplexity(tiny_model, tiny_tokenizer, heldout_text[1500:3000], 32, progress=False)
    assert other.units_hash != one.units_hash  # other tokens: never paired
