"""Where a per-tensor activation scale meets its outliers: the range of every Linear's input inside the decoder
layers, by kind (q/k/v, o, gate/up, down), on one window of held-out KJV.

    python benchmarks/linear_input_range.py [MODEL ...] [--tokens 1024]

For each kind: the largest |x| over all layers (and its layer), the largest on tokens other than the first (BOS),
and the median of the per-layer median |x|. A per-tensor INT8 step is the tensor's max / 127; what it rounds to zero
is what the median shows. This is what lp_input_penalty's threshold was chosen from (its docstring has the numbers).
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from qharness.models.layers import decoder_layers
from qharness.models.sources import ModelSpec, load_model
from qharness.tasks.spec import get_task, load_task_text


def input_ranges(name: str, tokens: int) -> dict[str, list[tuple[float, float, float, int]]]:
    """kind -> one (max |x|, max |x| past the first token, median |x|, layer) per Linear of that kind."""
    loaded = load_model(ModelSpec(name=name, device="cpu", dtype="fp32"), progress=False)
    model, tokenizer = loaded.model, loaded.tokenizer
    text = load_task_text(get_task("kjv-heldout"))
    ids = tokenizer(text)["input_ids"][: tokens - 1]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    ranges: dict[str, list[tuple[float, float, float, int]]] = defaultdict(list)

    def observe(kind: str, layer: int):
        def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].abs()[0]
            ranges[kind].append((x.max().item(), x[1:].max().item(), x.median().item(), layer))
        return hook

    handles = [linear.register_forward_pre_hook(observe(path.rsplit(".", 1)[-1], index))
               for index, layer in enumerate(decoder_layers(model))
               for path, linear in layer.named_modules() if isinstance(linear, torch.nn.Linear)]
    with torch.no_grad():
        model(torch.tensor([ids]))
    for handle in handles:
        handle.remove()
    return ranges


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=["smollm2-135m"])
    parser.add_argument("--tokens", type=int, default=1024)
    args = parser.parse_args()
    print("| model | Linear | max abs (layer) | max abs past BOS | median of layer medians |")
    print("|---|---|---|---|---|")
    for name in args.models:
        for kind, values in input_ranges(name, args.tokens).items():
            top = max(values)
            median = sorted(v[2] for v in values)[len(values) // 2]
            print(f"| {name} | {kind} | {top[0]:.1f} ({top[3]}) | {max(v[1] for v in values):.1f} | {median:.3f} |")


if __name__ == "__main__":
    main()
