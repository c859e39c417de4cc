"""`qharness list`: the registries. Imports no torch (tests/test_imports.py checks it)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from typing import Any

EXAMPLES = """examples:
  qharness list            # everything
  qharness list quants
  qharness list kv
  qharness list mitigations
  qharness list tasks
"""


HELP = "list built-in models, quantization schemes and tasks"


def main(args: argparse.Namespace) -> int:
    from qharness.models.shipped import BUILTIN_MODELS
    from qharness.quant.backends import backends_for
    from qharness.quant.schemes import SCHEMES
    from qharness.tasks.spec import all_tasks

    if args.what in ("all", "models"):
        print("models (also: a local HF folder, a .gguf file, or a hub id):")
        for entry in BUILTIN_MODELS:
            print(f"  {entry.name:24} {entry.obj.description}")
        from qharness.models.sources import zoo

        print("  zoo (trained here on first use, about 7 min each; `qharness train --model NAME`):")
        for name in zoo.GRID:
            print(f"  {name:24} {'trained' if zoo.is_trained(name) else 'not trained yet'}")
        print("  tune:<model>-<mitigation>  a model trained further here with a mitigation, on first use (about 3 min "
              "for smollm2-135m): tune:smollm2-135m-none (the control), tune:smollm2-135m-outlier_penalty")
        from qharness.models.sources.pairs import PAIRS, PREFIX

        print("  published pairs (hub checkpoints with and without a mitigation, online; family: mitigation):")
        for pair in PAIRS:
            refused = "  [needs remote code: refused]" if pair.needs_remote_code else ""
            print(f"  {PREFIX + pair.alias:38} {pair.hub_id}  {pair.family}: {pair.mitigation}{refused}")
    if args.what in ("all", "quants"):
        print("quants:")
        for entry in SCHEMES:
            aliases = SCHEMES.aliases_of(entry.name)
            also = f" (alias: {', '.join(aliases)})" if aliases else ""
            scheme = entry.obj
            print(f"  {entry.name:30} {scheme.description}{also} [{', '.join(backends_for(scheme))}]")
    if args.what in ("all", "kv"):
        from qharness.quant.kv import KEEP_FIRST, KV_SETTINGS

        print(f"kv (run --kv NAME; append +{KEEP_FIRST} to keep the first token's keys and values exact):")
        for entry in KV_SETTINGS:
            print(f"  {entry.name:30} {entry.obj().description}")
    if args.what in ("all", "backends"):
        from qharness.quant.backends import load_backends

        _list_plugins("backends:", load_backends(), lambda backend: f"; {'/'.join(backend.devices)}")
    if args.what in ("all", "transforms"):
        from qharness.quant.transforms import load_transforms

        _list_plugins("transforms (--transform NAME[:ARG], applied before quantizing; the fp logits are kept):",
                      load_transforms())
    if args.what in ("all", "mitigations"):
        _list_mitigations()
    if args.what in ("all", "tasks"):
        print("tasks:")
        for task in all_tasks():
            print(f"  {task.name:24} [{task.kind}] {task.description}")
    return 0


def _list_plugins(title: str, entries: Iterable[Any], where: Callable[[Any], str] = lambda plugin: "") -> None:
    """A registry of optional plugins (backends, transforms): each with its description and, when it needs packages,
    which (and `where`, e.g. a backend's devices)."""
    print(title)
    for entry in entries:
        plugin = entry.obj
        needs = f" (needs {', '.join(plugin.requires)}{where(plugin)})" if plugin.requires else ""
        print(f"  {entry.name:24} {plugin.description}{needs}")


def _list_mitigations() -> None:
    from qharness.models.mitigations import load_mitigations

    print("mitigations (train --mitigation A+B; loss-side ones take --penalty-NAME settings, one per recipe):")
    for entry in load_mitigations():
        mitigation = entry.obj
        settings = f" [--penalty-{', --penalty-'.join(mitigation.settings)}]" if mitigation.settings else ""
        print(f"  {entry.name:24} {mitigation.description}{settings}")
        print(f"  {'':24} {mitigation.reference}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", nargs="?", default="all",
                        choices=("all", "models", "quants", "kv", "backends", "transforms", "mitigations", "tasks"))
