"""The training loop: data, schedule, logging, checkpoint and resume, and the mitigations' hooks."""

import json
import math
import time
from dataclasses import replace

import pytest
import torch

from qharness.core.errors import ConfigError
from qharness.models import mitigations
from qharness.models.mitigations.tvr import decoder_matrices
from qharness.training import loop
from qharness.training.architectures import ArchConfig, new_model
from qharness.training.loop import CHECKPOINT, LOG, TrainConfig, learning_rate, sample_batch, train

TINY = ArchConfig(d_model=32, layers=2, heads=2, context=32, vocab_size=400)


@pytest.fixture(scope="module")
def tokens(training_tokens) -> torch.Tensor:
    return training_tokens


def tiny(arch: str, spec: str, tokenizer, seed: int = 0):
    model = new_model(ArchConfig(arch=arch, d_model=32, layers=2, heads=2, context=32, vocab_size=len(tokenizer)),
                      tokenizer.bos_token_id, tokenizer.eos_token_id, seed)
    applied = mitigations.build_(model, spec)
    mitigations.initialize_(model, applied)
    return model, [m.after_step for m in applied if m.after_step is not None]


def test_batches_start_with_bos_and_depend_only_on_seed_and_step(tokens):
    cfg = TrainConfig(batch_size=4, context=16)
    batch = sample_batch(tokens, 7, cfg, bos_id=0)
    assert batch.shape == (4, 16) and (batch[:, 0] == 0).all()
    assert torch.equal(batch, sample_batch(tokens, 7, cfg, bos_id=0))
    assert not torch.equal(batch, sample_batch(tokens, 8, cfg, bos_id=0))
    ranks = [sample_batch(tokens, 7, cfg, 0, rank=r, world=2) for r in (0, 1)]
    assert not torch.equal(*ranks)  # data-parallel processes draw different data
    stream = tokens.tolist()
    for row in batch.tolist():  # each row is BOS + a contiguous window of the stream
        window = row[1:]
        assert any(stream[i:i + 15] == window for i in range(len(stream) - 14))


def test_learning_rate_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(steps=1000, lr=1e-3, warmup=100, min_lr_ratio=0.1)
    assert learning_rate(0, cfg) == pytest.approx(1e-5)
    assert learning_rate(99, cfg) == pytest.approx(1e-3)
    assert learning_rate(550, cfg) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))
    assert learning_rate(999, cfg) == pytest.approx(1e-4, rel=1e-3)



def kill_at(stop: int):
    """A step hook that interrupts training at step `stop`, as Ctrl-C or a kill would."""

    def hook(model, step):
        if step == stop:
            raise KeyboardInterrupt

    return hook

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_loss_falls_and_the_log_carries_the_activation_ratio(arch, tokens, tiny_tokenizer, tmp_path):
    model, hooks = tiny(arch, "none", tiny_tokenizer)
    cfg = TrainConfig(steps=60, batch_size=4, context=32, lr=3e-3, warmup=5, log_every=20, checkpoint_every=30)
    result = train(model, tokens, cfg, tmp_path, tiny_tokenizer.bos_token_id, hooks, progress=False)
    log = [json.loads(line) for line in (tmp_path / LOG).read_text().splitlines()]
    assert result.finished and result.step == 60 and [e["step"] for e in log] == [20, 40, 60]
    assert log[-1]["loss"] < log[0]["loss"] < 6.5  # from ln(400) = 6.0 at chance
    for entry in log:
        assert entry["ratio"] == pytest.approx(entry["max_abs"] / entry["median_abs"])
        assert entry["bos_holds_max"] in (0.0, 1.0)
    assert (tmp_path / CHECKPOINT / "model.safetensors").exists()


def test_a_killed_run_resumes_to_the_same_weights(tokens, tiny_tokenizer, tmp_path):
    cfg = TrainConfig(steps=12, batch_size=2, context=32, warmup=2, log_every=4, checkpoint_every=4)
    unbroken, hooks = tiny("llama", "tvr", tiny_tokenizer)
    train(unbroken, tokens, cfg, tmp_path / "a", tiny_tokenizer.bos_token_id, hooks, progress=False)

    first, hooks = tiny("llama", "tvr", tiny_tokenizer)
    with pytest.raises(KeyboardInterrupt):
        train(first, tokens, cfg, tmp_path / "b", tiny_tokenizer.bos_token_id, [*hooks, kill_at(6)], progress=False)
    assert json.loads((tmp_path / "b" / CHECKPOINT / "state.json").read_text())["step"] == 4
    resumed, hooks = tiny("llama", "tvr", tiny_tokenizer, seed=1)  # other init: the checkpoint must overwrite it
    result = train(resumed, tokens, cfg, tmp_path / "b", tiny_tokenizer.bos_token_id, hooks, progress=False)
    assert result.step == 12
    for (name, a), (_, b) in zip(unbroken.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_resume_refuses_other_settings(tokens, tiny_tokenizer, tmp_path):
    model, _ = tiny("llama", "none", tiny_tokenizer)
    train(model, tokens, TrainConfig(steps=2, batch_size=2, context=32), tmp_path, 0, progress=False)
    with pytest.raises(ConfigError, match="lr"):
        train(model, tokens, TrainConfig(steps=2, batch_size=2, context=32, lr=1e-4), tmp_path, 0, progress=False)


class Clock:
    """time.monotonic's stand-in for the loop: one second passes per reading, so a budget stops at a known step."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        self.now += 1.0
        return self.now

    sleep = staticmethod(time.sleep)


def test_budget_stops_with_a_checkpoint(tokens, tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "time", Clock())
    model, _ = tiny("gpt2", "none", tiny_tokenizer)
    cfg = TrainConfig(steps=50, batch_size=2, context=32, budget_minutes=1.5 / 60)  # 1 s gone: a step; 2 s: stop
    result = train(model, tokens, cfg, tmp_path, 0, progress=False)
    assert not result.finished and result.step == 1
    assert json.loads((tmp_path / CHECKPOINT / "state.json").read_text())["step"] == 1


def test_a_budget_gone_before_the_first_step_saves_nothing_and_leaves_no_folder(tokens, tiny_tokenizer, tmp_path):
    model, _ = tiny("gpt2", "none", tiny_tokenizer)
    with pytest.raises(ConfigError, match="0-minute budget ran out before the first training step .* nothing was "
                                          "trained or saved; give a larger --budget"):
        train(model, tokens, TrainConfig(steps=50, batch_size=2, context=32, budget_minutes=0.0), tmp_path / "run", 0,
              progress=False)
    assert not (tmp_path / "run").exists()


def test_a_resumed_run_out_of_budget_before_its_first_step_is_left_as_it_was(tokens, tiny_tokenizer, tmp_path):
    cfg = TrainConfig(steps=8, batch_size=2, context=32, log_every=2, checkpoint_every=2)

    model, _ = tiny("gpt2", "none", tiny_tokenizer)
    with pytest.raises(KeyboardInterrupt):
        train(model, tokens, cfg, tmp_path, 0, [kill_at(3)], progress=False)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match="budget ran out before the first training step"):
        train(model, tokens, replace(cfg, budget_minutes=0.0), tmp_path, 0, progress=False)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_tvr_keeps_decoder_weights_at_the_target_during_training(tokens, tiny_tokenizer, tmp_path):
    from qharness.models.mitigations.tvr import TVRConfig

    model, hooks = tiny("llama", "tvr+kv_bias", tiny_tokenizer)
    embeddings = model.get_input_embeddings().weight.detach().clone()
    cfg = TrainConfig(steps=50, batch_size=2, context=32, lr=3e-2, warmup=1, log_every=50, checkpoint_every=50)
    train(model, tokens, cfg, tmp_path, tiny_tokenizer.bos_token_id, hooks, progress=False)
    target = TVRConfig().target
    for _, weight in decoder_matrices(model):  # step 50 was a rescale step
        assert weight.std().item() <= TVRConfig().threshold * target + 1e-6
    assert not torch.equal(embeddings, model.get_input_embeddings().weight)  # trained, and never rescaled
    assert model.get_input_embeddings().weight.std().item() > TVRConfig().threshold * target


def test_context_longer_than_text_is_refused(tiny_tokenizer, tmp_path):
    model, _ = tiny("llama", "none", tiny_tokenizer)
    with pytest.raises(ConfigError, match="fewer than one sequence"):
        train(model, torch.arange(10), TrainConfig(context=32), tmp_path, 0, progress=False)


def test_batches_of_accumulated_steps_are_the_rows_of_the_unaccumulated_batch(tokens):
    whole = sample_batch(tokens, 3, TrainConfig(batch_size=4, context=16), bos_id=0)
    accumulated = sample_batch(tokens, 3, TrainConfig(batch_size=2, grad_accum=2, context=16), bos_id=0)
    assert torch.equal(whole, accumulated)  # the loop splits it into micro-batches of batch_size rows


def test_grad_accum_takes_the_same_first_step_as_the_whole_batch(tokens, tiny_tokenizer, tmp_path):
    """Batch 2 x 2 micro-batches and batch 4 in one: the same rows, the same mean loss (every row predicts the same
    number of tokens, so the mean of the two halves' means is the mean), so the same gradient up to fp32 summation
    order (~1e-7 relative). AdamW's first step moves each weight by lr x g / (|g| + eps), i.e. by lr = 1e-3 where
    |g| >> eps, and the weights agree to ~1e-8; where |g| is near eps = 1e-8 that ratio amplifies the rounding, and
    a few weights differ by up to ~6e-7 (measured). 1e-6 is 0.1% of one step, a thousand times below a real
    difference."""
    models = []
    for batch_size, grad_accum in ((4, 1), (2, 2)):
        model, _ = tiny("llama", "none", tiny_tokenizer)
        cfg = TrainConfig(steps=1, batch_size=batch_size, grad_accum=grad_accum, context=32, lr=1e-3, warmup=0,
                          grad_clip=1.0, log_every=1)
        train(model, tokens, cfg, tmp_path / f"ga{grad_accum}", tiny_tokenizer.bos_token_id, progress=False)
        models.append(model)
    fresh, _ = tiny("llama", "none", tiny_tokenizer)
    for (name, a), (_, b), (_, before) in zip(models[0].state_dict().items(), models[1].state_dict().items(),
                                              fresh.state_dict().items(), strict=True):
        assert not torch.equal(a, before) or name.endswith("rotary_emb.inv_freq"), name  # both took a step
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_bf16_trains_with_fp32_weights_and_a_loss_close_to_fp32(tokens, tiny_tokenizer, tmp_path):
    """bf16 keeps 8 mantissa bits (relative rounding 2^-9 = 0.2%) in the forward pass only; over a few steps from one
    init the loss (about 6) stays within 0.05 of fp32's."""
    logs, dtypes = {}, set()
    for precision in ("fp32", "bf16"):
        model, _ = tiny("llama", "none", tiny_tokenizer)
        if precision == "bf16":
            model.model.layers[0].mlp.register_forward_hook(lambda module, args, out: dtypes.add(out.dtype))
        cfg = TrainConfig(steps=4, batch_size=4, context=32, warmup=1, log_every=1, precision=precision)
        train(model, tokens, cfg, tmp_path / precision, tiny_tokenizer.bos_token_id, progress=False)
        logs[precision] = [json.loads(line)["loss"] for line in (tmp_path / precision / LOG).read_text().splitlines()]
        assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    assert torch.bfloat16 in dtypes  # the training forward ran under bf16 autocast (the probe's runs in fp32)
    assert logs["fp32"] != logs["bf16"]
    for a, b in zip(logs["fp32"], logs["bf16"], strict=True):
        assert abs(a - b) < 0.05, (logs["fp32"], logs["bf16"])


@pytest.mark.parametrize(("field", "value", "message"), [
    ("grad_accum", 0, "train grad_accum must be >= 1, got 0"),
    ("precision", "fp12", "train precision must be one of fp32, bf16, got 'fp12'"),
])
def test_bad_precision_and_grad_accum_are_one_line_errors(field, value, message):
    with pytest.raises(ConfigError, match=f"^{message}$"):
        TrainConfig(**{field: value})


@pytest.mark.parametrize(("change", "named"), [({"grad_accum": 2}, "grad_accum 1 -> 2"),
                                               ({"precision": "bf16"}, "precision fp32 -> bf16")])
def test_resume_refuses_other_precision_or_accumulation(change, named, tokens, tiny_tokenizer, tmp_path):
    model, _ = tiny("llama", "none", tiny_tokenizer)
    train(model, tokens, TrainConfig(steps=1, batch_size=2, context=32), tmp_path, 0, progress=False)
    with pytest.raises(ConfigError, match=named):
        train(model, tokens, TrainConfig(steps=1, batch_size=2, context=32, **change), tmp_path, 0, progress=False)


def test_checkpoints_from_before_precision_and_grad_accum_resume(tokens, tiny_tokenizer, tmp_path):
    model, _ = tiny("llama", "none", tiny_tokenizer)
    cfg = TrainConfig(steps=3, batch_size=2, context=32, checkpoint_every=1)

    with pytest.raises(KeyboardInterrupt):  # killed after the checkpoint of step 1
        train(model, tokens, cfg, tmp_path, 0, [kill_at(2)], progress=False)
    state_path = tmp_path / CHECKPOINT / "state.json"
    state = json.loads(state_path.read_text())
    for key in ("precision", "grad_accum"):  # as a checkpoint written before these settings existed
        del state["config"][key]
    state_path.write_text(json.dumps(state))
    assert train(model, tokens, cfg, tmp_path, 0, progress=False).step == 3


@pytest.mark.gpu
def test_on_cuda_bf16_accumulated_training_moves_everything_to_the_gpu_and_resumes(tokens, tiny_tokenizer, tmp_path):
    """On CUDA the model is built on the CPU (the zoo's path) and accelerate moves it; a resume loads the optimizer
    state onto the CPU parameters before that move, and accelerate moves the state too. The forward runs under
    CUDA's bf16 autocast over fp32 weights, with the mitigations' own modules (k', v', the gate) in it. Not yet run
    on a GPU. Not bitwise: CUDA's embedding backward accumulates with atomics, so a resume is held to 1e-5."""
    cfg = TrainConfig(steps=6, batch_size=2, grad_accum=2, context=32, warmup=1, log_every=2, checkpoint_every=2,
                      precision="bf16")
    seen: set[tuple[str, torch.dtype]] = set()
    unbroken, hooks = tiny("llama", "tvr+kv_bias+gated_attention", tiny_tokenizer)
    unbroken.model.layers[0].mlp.register_forward_hook(lambda m, a, out: seen.add((out.device.type, out.dtype)))
    train(unbroken, tokens, cfg, tmp_path / "a", tiny_tokenizer.bos_token_id, hooks, progress=False)
    assert ("cuda", torch.bfloat16) in seen
    assert {(p.device.type, p.dtype) for p in unbroken.parameters()} == {("cuda", torch.float32)}
    log = [json.loads(line) for line in (tmp_path / "a" / LOG).read_text().splitlines()]
    assert [e["step"] for e in log] == [2, 4, 6] and all(math.isfinite(e["loss"]) for e in log)

    first, hooks = tiny("llama", "tvr+kv_bias+gated_attention", tiny_tokenizer)
    with pytest.raises(KeyboardInterrupt):
        train(first, tokens, cfg, tmp_path / "b", tiny_tokenizer.bos_token_id, [*hooks, kill_at(3)], progress=False)
    resumed, hooks = tiny("llama", "tvr+kv_bias+gated_attention", tiny_tokenizer, seed=1)
    assert train(resumed, tokens, cfg, tmp_path / "b", tiny_tokenizer.bos_token_id, hooks, progress=False).step == 6
    for (name, a), (_, b) in zip(unbroken.state_dict().items(), resumed.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)


def test_ctrl_c_before_the_first_checkpoint_leaves_no_folder_and_no_empty_log(tokens, tiny_tokenizer, tmp_path):
    model, _ = tiny("gpt2", "none", tiny_tokenizer)
    cfg = TrainConfig(steps=8, batch_size=2, context=32, log_every=4, checkpoint_every=4)
    with pytest.raises(KeyboardInterrupt):
        train(model, tokens, cfg, tmp_path / "run", 0, [kill_at(2)], progress=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(KeyboardInterrupt):  # past a checkpoint: the run stays, to resume
        train(model, tokens, cfg, tmp_path / "run", 0, [kill_at(5)], progress=False)
    assert (tmp_path / "run" / CHECKPOINT).exists() and (tmp_path / "run" / "train_log.jsonl").stat().st_size > 0
