"""The types every part of `quant/` shares, with no behaviour of their own: what a backend declares it runs
(`Capability`) and what it is handed besides the model (`QuantContext`).

They live here, below both `backend.py` (selection and checks) and `sim.py` (the reference arithmetic), so that
neither imports the other for a type: sim's `apply_sim` takes a `QuantContext` and backend.py registers sim.
`Backend` itself stays in backend.py: its `check` reads the environment probes (installed packages, compute
capability, build tools) and the registry of the other backends, which are backend.py's business.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qharness.core.errors import QHarnessError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Capability:
    """How a backend runs one scheme on one device type: the limits `check` enforces before quantizing."""

    device: str  # "cpu" or "cuda"
    dtypes: tuple[str, ...] = ()  # model dtypes its kernels compute in, by --dtype name (bf16, fp16); () any
    min_compute: tuple[int, int] | None = None  # CUDA compute capability the kernel needs
    whole_groups: bool = False  # every target's input width must be a multiple of the scheme's weight group size
    width_multiple: int = 1  # every target's input and output widths must be multiples of this
    input_multiple: int = 1  # and its input width of this (a kernel that counts packed bytes along it)
    needs: tuple[str, ...] = ()  # build tools (keys of backend.TOOLS) for an extension compiled at first use
    computes_in: str = ""  # a dtype the kernel casts to whatever the model's (bitsandbytes' int8: fp16); "" the model's
    build_note: str = ""  # what building that extension costs, said before it starts (e.g. "1-3 minutes")
    # a weight shape (out, in) the library misreads, and why: torchao 0.18 takes a per-tensor scale of a 128x128
    # weight for a 128x128 block scale and asserts in the first matmul, after every weight was quantized
    not_shape: tuple[tuple[int, int], str] | None = None


def everywhere(**limits: Any) -> tuple[Capability, ...]:
    """The same limits on CPU and CUDA."""
    return Capability("cpu", **limits), Capability("cuda", **limits)


@dataclass(frozen=True)
class QuantContext:
    """What a backend may need beyond the model: the device, and calibration batches made on demand."""

    device: torch.device
    calibration: Callable[[], list[torch.Tensor]] | None = None
    tokenizer: Any = None  # for backends that work on a saved model folder (gptq)
    # the caller gives the target Linears' fp weights up (it restores them itself, quant/fp_weights.py): a backend
    # may then quantize into their storage instead of beside it (sim does), so a run holds one model, not two
    consume: bool = False

    def calibration_batches(self, scheme_name: str) -> list[torch.Tensor]:
        if self.calibration is None:
            raise QHarnessError(f"scheme '{scheme_name}' needs calibration data; pass calibration batches")
        return self.calibration()
