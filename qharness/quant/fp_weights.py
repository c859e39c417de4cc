"""One model in memory for a whole run: the fp weights of the quantized Linears kept on disk, each scheme applied to
the model itself, and the fp Linears put back afterwards.

Today's alternative, a deep copy of the fp model per scheme, holds two models at once (the fp one and the copy,
3.1x the weights on an H200 with sim's float copies and the transform). Here the target Linears' weights are written
once to safetensors files beside the run (one per tensor), a backend swaps or
rewrites those Linears in place (sim quantizes into their own storage, `QuantContext.consume`), and `restore_`
swaps the original Linear objects back (with any hooks they carry) and reloads their weights from the file one
tensor at a time. Biases, norms, embeddings and the head are never touched by a backend, so they stay as they are.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from qharness.quant.modules import swap_module

if TYPE_CHECKING:
    from torch import nn


class FpWeights:
    """The fp weights of `targets` (name -> Linear of `model`), kept on disk until `close`."""

    def __init__(self, model: nn.Module, targets: dict[str, nn.Linear], folder: Path | None = None) -> None:
        from safetensors.torch import save_file

        self.model, self.originals = model, dict(targets)
        # weights accelerate offloaded (on `meta`; --device-map) stay in its weights map, which no backend writes:
        # their Linears are only swapped back
        held = {name: linear for name, linear in targets.items() if linear.weight.device.type != "meta"}
        self.placement = {name: (linear.weight.device, linear.weight.dtype, linear.weight.requires_grad)
                          for name, linear in held.items()}
        self._dir = tempfile.TemporaryDirectory(prefix="qharness-fp-", dir=folder)
        self.files = {name: Path(self._dir.name) / f"{i}.safetensors" for i, name in enumerate(held)}
        # a file per tensor: save_file turns every tensor it is given into bytes before writing, so one file for all
        # would hold a second copy of the weights in host memory for a moment
        for name, linear in held.items():
            save_file({"weight": linear.weight.detach().cpu().contiguous()}, self.files[name])
        self._own_host_tensors_(held)

    def _own_host_tensors_(self, held: dict[str, nn.Linear]) -> None:
        """On the CPU, transformers' loader leaves every tensor a view of one copy-on-write mapping of the checkpoint
        file. Quantizing a weight in place dirties private pages of it that stay resident as long as any tensor of
        the file lives (the embeddings do), after the weight itself is restored: 400 MB, 0.78x the weights, on
        SmolLM2 (measured, RssAnon). So the targets are read back from the files just written (each its own
        mapping, freed with its tensor, paged in as used) and the other host tensors copied (the embeddings: a
        moment before any forward), and the checkpoint's mapping is released whole."""
        from safetensors.torch import load_file
        from torch import nn

        ours = set()
        for name, linear in held.items():
            if linear.weight.device.type == "cpu":
                weight = load_file(self.files[name])["weight"]
                linear.weight = nn.Parameter(weight.to(linear.weight.dtype), requires_grad=linear.weight.requires_grad)
                ours.add(id(linear.weight))
        for param in self.model.parameters():
            if param.device.type == "cpu" and id(param) not in ours:
                param.data = param.data.clone()
        for module in self.model.modules():
            for key, buffer in module._buffers.items():
                if buffer is not None and buffer.device.type == "cpu":
                    module._buffers[key] = buffer.clone()

    def release_(self) -> None:
        """After a backend swapped new modules in: drop the originals' weights (their storage may still live in the
        new module, as sim's in-place one does; a library's own module has its own)."""
        import torch
        from torch import nn

        for name, linear in self.originals.items():
            if name in self.files and self.model.get_submodule(name) is not linear:
                linear.weight = nn.Parameter(torch.empty(0, dtype=linear.weight.dtype, device=linear.weight.device),
                                             requires_grad=False)

    def restore_(self) -> None:
        """The fp model again: every original Linear back in its place with its fp weight from the file."""
        from safetensors.torch import load_file
        from torch import nn

        for name, linear in self.originals.items():
            swap_module(self.model, name, linear)
            if name not in self.files:
                continue
            device, dtype, grad = self.placement[name]
            weight = load_file(self.files[name])["weight"]
            linear.weight = nn.Parameter(weight.to(device=device, dtype=dtype), requires_grad=grad)

    def close(self) -> None:
        self._dir.cleanup()

