"""How close DyT can start to the model it replaces the norms of: the logit change of each way of adding it to
SmolLM2-135M, and why the best one is still far (README, "Continued training").

    python benchmarks/dyt_retrofit.py                          # the fits: all at once vs sequential, per norm
    python benchmarks/dyt_retrofit.py --distill dyt --steps 100 --lr 1e-2   # then KL-distil the DyT parameters
    python benchmarks/dyt_retrofit.py --distill all --steps 40 --lr 1e-4    # or every parameter

The logit change is the measure `train --from` records: max |logits after - logits before| / max |logits before| on
two 128-token calibration sequences. The per-norm table gives each sequential fit's relative residual on the BOS rows
and on the other tokens, and the RMS of what the norm receives there (the scale RMSNorm divides away and tanh, with
one alpha per layer, cannot). Distillation (qharness/training/distill.py) runs on the continued-training recipe's
batches (2 x 256 tokens), KL(original || converted) per token, logged every --log-every steps.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from qharness.data.recipe import TUNE400_TRAIN
from qharness.models.drift import logit_drift, logit_gap
from qharness.models.mitigations import dyt
from qharness.models.norms import DyT
from qharness.models.sources import ModelSpec, load_model
from qharness.quant.calibrate import calibration_batches, calibration_text
from qharness.tasks.perplexity import bos_token_id
from qharness.training.continued import tuning_tokens
from qharness.training.distill import DistillConfig, distill_


def all_at_once_(model: torch.nn.Module, batches: list[torch.Tensor]) -> None:
    """The earlier retrofit: every DyT fitted to its norm on the original model's inputs."""
    captured = dyt.norm_inputs_and_outputs(model, batches)
    dyt.apply_dyt_(model)
    for name, (x, y) in captured.items():
        dyt.fit_dyt_(model.get_submodule(name), x, y)


def sequential_with_table(model: torch.nn.Module, batches: list[torch.Tensor]) -> list[str]:
    """The retrofit `train --from` uses, with each fit's residual on BOS rows and on the rest."""
    length, lines = batches[0].shape[1], []
    real_fit = dyt.fit_dyt_

    def fit(module: DyT, x: torch.Tensor, y: torch.Tensor) -> float:
        residual = real_fit(module, x, y)
        out = module(x)
        bos = torch.zeros(len(x), dtype=torch.bool)
        bos[::length] = True

        def rel(rows: torch.Tensor) -> float:
            return float((out[rows] - y[rows]).norm() / y[rows].norm())

        rms = x.pow(2).mean(-1).sqrt()
        lines.append(f"{residual:9.3f}  {rel(bos):6.3f}  {rel(~bos):6.3f}  {float(rms[bos].mean()):9.1f}  "
                     f"{float(rms[~bos].median()):8.2f}  {float(module.alpha):.3g}")
        return residual

    dyt.fit_dyt_ = fit
    try:
        dyt.retrofit_dyt_(model, batches)
    finally:
        dyt.fit_dyt_ = real_fit
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--distill", choices=("none", "dyt", "all"), default="none")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with torch.no_grad():
        loaded = load_model(ModelSpec(args.model, dtype="fp32", device="cpu"), progress=False)
        batches = calibration_batches(loaded.tokenizer, calibration_text(), n=2, length=128, device="cpu")
        moved = logit_drift(loaded.model, batches, lambda: all_at_once_(loaded.model, batches))
        print(f"all at once: logits moved {moved:.1%}")
        loaded = load_model(ModelSpec(args.model, dtype="fp32", device="cpu"), progress=False)
        model, tokenizer = loaded.model, loaded.tokenizer
        teacher = copy.deepcopy(model)
        names = list(dyt.norm_inputs_and_outputs(model, batches))
        table = sequential_with_table(model, batches)
        print(f"sequential: logits moved {logit_gap(model, teacher, batches):.1%}")
    print(f"{'norm':42} residual     BOS   other   RMS BOS  RMS other  alpha")
    for name, line in zip(names, table, strict=True):
        print(f"{name:42} {line}")
    if args.distill == "none":
        return
    trainable = ([p for m in model.modules() if isinstance(m, DyT) for p in m.parameters()]
                 if args.distill == "dyt" else list(model.parameters()))
    tokens = tuning_tokens(tokenizer, (), progress=False, needed_tokens=TUNE400_TRAIN.tokens)
    started = time.perf_counter()
    log = distill_(model, teacher, trainable, tokens, TUNE400_TRAIN, bos_token_id(tokenizer),
                   DistillConfig(steps=args.steps, lr=args.lr, log_every=args.log_every),
                   drift=lambda: logit_gap(model, teacher, batches))
    print(f"distilling {sum(p.numel() for p in trainable)} parameters, lr {args.lr:g}, "
          f"{time.perf_counter() - started:.0f} s for {args.steps} steps")
    for entry in log:
        print(f"step {entry['step']:4d}  KL {entry['kl']:.2f} nats/token  logits moved {entry['logit_drift']:.1%}")


if __name__ == "__main__":
    main()
