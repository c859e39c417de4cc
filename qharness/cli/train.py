"""`qharness train`: a model from scratch, a recipe file, a named zoo/tune model, or continued training of any
model with a mitigation (`--from`)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from qharness.cli import values
from qharness.core.errors import QHarnessError

EXAMPLES = """examples:
  qharness train --arch llama --mitigation none --out runs/llama-base       # 4,000 steps, about 7 min on 2 cores
  qharness train --arch gpt2 --mitigation tvr+dyt --budget 10 --out runs/g  # rerun the same line to continue
  qharness train --model zoo:llama-kv_bias                                  # train one zoo model into the cache
  qharness run --model runs/llama-base --quant int8                         # the result is a model folder
  qharness train --from smollm2-135m --data hf:HuggingFaceFW/fineweb-edu:sample-10BT --out runs/s  # online
  qharness train --recipe recipes/gpt2-124m-sun2024.yaml --dry-run          # a published setting's cost (6NT)
  qharness train --recipe recipes/llama-60m-gu2024.yaml --data builtin --steps 200 --out runs/gu
"""


HELP = "train a small model with or without a mitigation"


def main(args: argparse.Namespace) -> int:
    from qharness.data.results import check_writable_dir
    from qharness.models import mitigations
    from qharness.training.recipe_file import check_trainable, format_estimate
    from qharness.training.run import train_model

    if args.mitigation is not None and not args.mitigation.strip():  # read as 'none', it trained the control
        raise QHarnessError(f"--mitigation {args.mitigation!r} names no mitigation; give none for the control, or "
                            "mitigations joined by '+' (kv_bias, tvr, dyt, ...; `qharness train --help`)")
    if args.model:
        ignored = _unread(args, ("model", "budget", "quiet"))
        if ignored:
            raise QHarnessError(f"train --model {args.model} trains it by its own recipe into the cache and reads only "
                                f"--budget and --quiet; drop {ignored} (to choose settings: train --from MODEL or "
                                "from scratch, with --out FOLDER)")
        return _train_named(args.model, args.budget, progress=not args.quiet)
    if args.from_model:
        ignored = _unread(args, ("from_model", "out", "mitigation", "data", *PENALTY_FLAGS, "budget", "quiet",
                                 *TRAIN_FLAGS))
        if ignored:
            raise QHarnessError(f"train --from does not read {ignored}: settings of training from scratch that "
                                f"continued training would ignore; drop {ignored}")
        return _train_from(args)
    scratch = _scratch_recipe(args)
    mitigations.check_from_scratch(scratch.mitigation)  # a dry run of a model that cannot be trained prices nothing
    if args.dry_run:
        print(format_estimate(scratch))
        return 0
    if args.out is None:
        raise QHarnessError("qharness train needs --out FOLDER (or --model zoo:<arch>-<mitigation>, or --dry-run)")
    check_trainable(scratch)
    check_writable_dir(args.out, "--out")
    recipe = scratch.recipe()
    _note_processes(scratch, args.quiet)
    result = train_model(recipe, args.out, progress=not args.quiet, budget_minutes=args.budget)
    return _report_training(result, args, recipe.train.steps,
                            f"trained {recipe.arch.arch} + {recipe.mitigation}: {result.step} steps")


def _report_training(result: Any, args: argparse.Namespace, steps: int, done: str) -> int:
    """The line a training into --out ends with: where a budget stopped it, or what was trained and where it is."""
    if not result.finished:
        print(f"stopped by the {args.budget}-minute budget at step {result.step} of {steps} "
              f"(checkpoint in {args.out}); run the same command again to continue")
    else:
        print(f"{done}, final loss {result.loss:.3f} -> {args.out / 'model'}  (use it as --model "
              f"{shlex.quote(str(args.out / 'model'))})")
    return 0


ARCH_FLAGS = ("arch", "d_model", "layers", "heads")


def _scratch_recipe(args: argparse.Namespace) -> Any:
    """The from-scratch recipe: --recipe FILE (default: the zoo's settings) with every flag the user gave put in."""
    from qharness.training.recipe_file import RecipeFile, load_recipe_file, with_overrides

    base = load_recipe_file(args.recipe) if args.recipe else RecipeFile(name="command line")
    return with_overrides(base, _given(args, ARCH_FLAGS), _given(args, TRAIN_FLAGS), args.mitigation,
                          " ".join(args.data) if args.data else None)


def _unread(args: argparse.Namespace, reads: tuple[str, ...]) -> str:
    """The flags given that a way of training does not read, as typed ('' for none): each would be dropped in
    silence (--dry-run with --from trained; --steps with --model trained the zoo's 4,000 steps)."""
    given = [name for name, value in vars(args).items()
             if name not in (*reads, "command") and value is not None and value is not False]
    return ", ".join("--from" if name == "from_model" else f"--{name.replace('_', '-')}" for name in given)


def _given(args: argparse.Namespace, flags: tuple[str, ...]) -> dict[str, Any]:
    """The flags among `flags` the user gave (those left at None keep the recipe's value)."""
    return {flag: getattr(args, flag) for flag in flags if getattr(args, flag) is not None}


def _note_processes(scratch: Any, quiet: bool) -> None:
    """Say so when this run's data-parallel processes differ from the recipe's: its steps see other batches."""
    from qharness.training.loop import process_state

    world = process_state().num_processes
    if world != scratch.processes and not quiet:
        t = scratch.train
        print(f"note: recipe {scratch.name} ran on {scratch.processes} processes and this run has {world}, so a step "
              f"sees {t.batch_size * t.grad_accum * world} sequences, not {scratch.sequences_per_step} (--grad-accum "
              "or accelerate launch --num_processes matches it)", file=sys.stderr)


def _train_named(name: str, budget: float | None, progress: bool) -> int:
    """`train --model NAME`: train a model that is trained here on first use (a zoo name) into the cache."""
    from qharness.models.sources import classify
    from qharness.training.ensure import TRAINERS, ensure

    if classify(name) not in TRAINERS:
        raise QHarnessError(f"'{name}' is not a model qharness trains; --model takes a zoo or tune name "
                            "(zoo:llama-base, tune:smollm2-135m-none, ...; `qharness list models`), or continue "
                            f"training it with --from {name} --out FOLDER")
    path = ensure(name, progress=progress, budget_minutes=budget)
    if path is None:
        print(f"{name}: stopped by the {budget}-minute budget with a checkpoint; "
              "run the same command again to continue")
    else:
        print(f"{name}: trained -> {path}")
    return 0


PENALTY_FLAGS = ("penalty_threshold", "penalty_strength", "penalty_power")  # --penalty-NAME -> the setting NAME
TRAIN_FLAGS = ("steps", "batch_size", "context", "lr", "weight_decay", "warmup", "min_lr_ratio", "grad_clip", "seed",
               "precision", "grad_accum")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from qharness.data.recipe import TUNE_TRAIN, ArchConfig, TrainConfig

    arch, scratch = ArchConfig(), TrainConfig()
    parser.add_argument("--model", default=None,
                        help="a zoo or tune name (zoo:llama-base, tune:smollm2-135m-none): train it into the cache")
    parser.add_argument("--from", dest="from_model", default=None, metavar="MODEL",
                        help="continue training this model (any --model name) instead of starting from scratch")
    parser.add_argument("--recipe", type=Path, default=None, metavar="FILE",
                        help="from scratch: a recipe file (recipes/*.yaml); the flags below override its values")
    parser.add_argument("--dry-run", action="store_true",
                        help="from scratch: print parameters, tokens, 6NT FLOPs and GPU-hours, and train nothing")
    parser.add_argument("--arch", default=None,
                        help=f"llama (GLU) or gpt2 (non-GLU), from scratch (default {arch.arch})")
    parser.add_argument("--mitigation", default=None,
                        help="none, or mitigations joined by '+': kv_bias, tvr, dyt, gated_attention, "
                             "clipped_softmax, outlier_penalty, lp_penalty, lp_input_penalty (e.g. tvr+kv_bias; "
                             "`qharness list "
                             "mitigations`); with --from each is added to "
                             "the trained model as README 'Continued training' says")
    parser.add_argument("--data", nargs="+", default=None, metavar="PATH",
                        help="with --from: text files, folders, .jsonl ('text'), .parquet ('text') or a hub dataset "
                             "streamed as far as training needs, hf:DATASET[:CONFIG[:SPLIT[:FIELD]]] (online) "
                             "(default: the built-in training text; text overlapping the evaluation text is dropped); "
                             "from scratch: builtin, to train a recipe of a hub dataset on the built-in text")
    parser.add_argument("--penalty-threshold", type=float, default=None,
                        help="outlier_penalty: |h| above this is penalized; lp_penalty: the |h| that costs 1 "
                             "(default 64 for both); lp_input_penalty: the |x| of a Linear's input that costs 1 "
                             "(default 8)")
    parser.add_argument("--penalty-strength", type=float, default=None,
                        help="the loss penalty's weight against the next-token loss (default 1.0)")
    parser.add_argument("--penalty-power", type=float, default=None,
                        help="lp_penalty, lp_input_penalty: the power p of (|h| / threshold)^p (default 4; "
                             "try 8)")
    parser.add_argument("--budget", type=values.minutes, default=None, metavar="MINUTES",
                        help="stop after this many minutes with a checkpoint; rerun to continue")
    parser.add_argument("--out", type=Path, default=None, help="folder for the checkpoint, log and model")
    for flag in TRAIN_FLAGS:
        kind = type(getattr(scratch, flag))
        parser.add_argument(f"--{flag.replace('_', '-')}", type=kind, default=None,
                            help=f"default {getattr(scratch, flag)} from scratch, {getattr(TUNE_TRAIN, flag)} "
                                 "with --from")
    parser.add_argument("--d-model", type=int, default=None, help=f"default {arch.d_model}")
    parser.add_argument("--layers", type=int, default=None, help=f"default {arch.layers}")
    parser.add_argument("--heads", type=int, default=None, help=f"default {arch.heads}")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def train_config(args: argparse.Namespace, defaults: Any) -> Any:
    """`defaults` (a TrainConfig) with every train flag the user gave put in."""
    from dataclasses import replace

    return replace(defaults, **_given(args, TRAIN_FLAGS))


def _train_from(args: argparse.Namespace) -> int:
    """`train --from MODEL --mitigation M --out DIR`: continued training into a folder of your own."""
    from dataclasses import replace

    from qharness.data.results import check_writable_dir
    from qharness.models.sources.tune import recipe_for
    from qharness.training.continued import check_recipe, continue_training
    from qharness.training.ensure import ensure

    if args.out is None:
        raise QHarnessError(f"qharness train --from needs --out FOLDER (or --model tune:{args.from_model}-"
                            f"{args.mitigation or 'none'} to train into the cache)")
    recipe = recipe_for(f"tune:{args.from_model}-{args.mitigation or 'none'}")  # checks the base and the mitigation
    penalty = {flag.removeprefix("penalty_"): getattr(args, flag) for flag in PENALTY_FLAGS
               if getattr(args, flag) is not None}
    recipe = replace(recipe, train=train_config(args, recipe.train), penalty=tuple(sorted(penalty.items())),
                     data=tuple(args.data or ()))
    check_recipe(recipe)  # before a zoo base trains for minutes, or any model loads
    check_writable_dir(args.out, "--out")
    ensure(recipe.base, progress=not args.quiet)
    result = continue_training(recipe, args.out, progress=not args.quiet, budget_minutes=args.budget)
    return _report_training(result, args, recipe.train.steps,
                            f"trained {recipe.base} + {recipe.mitigation} for {result.step} more steps")
