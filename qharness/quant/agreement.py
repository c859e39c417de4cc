"""Does a library kernel compute the scheme it is named for? Its distance from `sim`, set against two yardsticks
measured on the same model and inputs: the model dtype's own rounding, and the quantization's own effect.

    distance   = |kernel - sim| / |sim|              the kernel against the reference arithmetic, same dtype
    dtype_gap  = |model in dtype - model in fp32|    what rounding in the dtype alone moves (0 in fp32); for a
                                                     kernel that casts to a coarser dtype (bitsandbytes' int8
                                                     computes in fp16), that dtype's gap if larger
    effect     = |sim - unquantized| / |unquantized| what the scheme itself moves

each |.| the Frobenius norm of the logits over every position (a relative RMS: the max over positions, which the
old tests used, is one token's worst rounding and swings with the seed). A kernel agrees when distance <=
4 x dtype_gap + FLOAT_ORDER, and the check discriminates when distance <= effect / 4, so a kernel that skipped the
quantization, or computed another scheme, fails. Why 4x: kernels whose arithmetic equals sim's in fp32 (distance
0 there: torchao's fp8 weight-only, quanto's int8 and fp8 weight-only) were 2.0-3.7x the gap from sim in bf16 on
CPU (benchmarks/kernel_agreement.py --device cpu, random Llamas of width 128 and 1024): two computations rounded
in bf16 at different places. Where a scheme's effect is under 4x that tolerance (8-bit weight-only in bf16 on these
random models), bf16 cannot tell the kernel from the unquantized model, and only its fp32 case discriminates.
Schemes that quantize activations are measured layer by layer (`level` "layer"): each quantized Linear gets the
input its sim twin saw in sim's forward pass, and the three distances are those of its output (the largest distance
and gap over the layers, the smallest effect). At model level a float-rounding difference flips an activation code,
and later layers amplify it: on an H200, torchao's int8 W8A8, which equals sim layer by layer to 1e-6 on CPU, was 40%
of the scheme's effect away at the logits, fp8 W8A8 46%, quanto's static int8 3-8%.
Used by the CUDA tests (tests/quant/test_cuda_agreement.py) and by benchmarks/kernel_agreement.py, which prints
the table.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

# fp32 GEMMs of the same operands in another summation order (a library's dequantize-then-matmul against sim's):
# measured up to 1.4e-4 on these models (torchao's int4 g128 at width 1024, CPU); 5e-4 is still 20x below any
# 8-bit scheme's effect on them (1e-2 and up)
FLOAT_ORDER = 5e-4
GAP_FACTOR = 4


@dataclass(frozen=True)
class Agreement:
    backend: str
    scheme: str
    dtype: str
    hidden: int
    level: str  # "logits" or "layer"
    dtype_gap: float
    effect: float
    distance: float

    @property
    def tolerance(self) -> float:
        return GAP_FACTOR * self.dtype_gap + FLOAT_ORDER

    @property
    def agrees(self) -> bool:
        return self.distance <= self.tolerance

    @property
    def can_discriminate(self) -> bool:
        """Whether the scheme moves the logits well past the dtype's own noise on this model."""
        return self.effect >= 4 * self.tolerance

    @property
    def discriminates(self) -> bool:
        return self.distance <= self.effect / 4

    @property
    def ok(self) -> bool:
        return self.agrees and (self.discriminates or not self.can_discriminate)

    def line(self) -> str:
        verdict = ("DIFFERS" if not self.agrees else "TOO CLOSE TO THE EFFECT" if not self.ok
                   else "ok" if self.can_discriminate else f"ok (effect within {self.dtype} noise)")
        return (f"{self.backend:8} {self.scheme:28} {self.dtype:5} {self.hidden:5} {self.level:6}  "
                f"gap {self.dtype_gap:9.2e}  effect {self.effect:9.2e}  distance {self.distance:9.2e}  "
                f"tol {self.tolerance:9.2e}  {verdict}")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def linear_inputs(model: nn.Module, names: list[str], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input each named module sees in one forward pass of `model` over `ids`."""
    import torch

    modules = dict(model.named_modules())
    seen: dict[str, torch.Tensor] = {}
    handles = [modules[name].register_forward_pre_hook(
        lambda module, args, name=name: seen.setdefault(name, args[0].detach().clone())) for name in names]
    try:
        with torch.inference_mode():
            model(ids)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _layer_distances(reference: nn.Module, plain: nn.Module, simulated: nn.Module, kernel: nn.Module,
                     names: list[str], ids: torch.Tensor,
                     held_to: nn.Module | None = None) -> tuple[float, float, float]:
    """(largest gap, smallest effect, largest distance) over the named Linears, each fed sim's input to it.
    `held_to`: the sim model the kernel is measured against where it is not `simulated` (sim in the dtype the kernel
    computes in), fed the same input in its own dtype."""
    import torch

    inputs = linear_inputs(simulated, names, ids)
    modules = [dict(m.named_modules()) for m in (reference, plain, simulated, kernel, held_to or simulated)]
    gaps, effects, distances = [], [], []
    with torch.inference_mode():
        for name, x in inputs.items():
            ref, fp, sim, ker, twin = (m[name] for m in modules)
            sim_out = sim(x)
            gaps.append(relative_error(fp(x), ref(x.float())))
            effects.append(relative_error(sim_out, fp(x)))
            target = sim_out if held_to is None else twin(x.to(twin.weight.dtype))
            distances.append(relative_error(ker(x), target))
    return max(gaps), min(effects), max(distances)


def _layer_gap(reference: nn.Module, model: nn.Module, names: list[str], ids: torch.Tensor) -> float:
    """The largest distance over the named Linears between `model` (in its dtype) and the fp32 reference, each fed
    the input it sees in `model`'s own forward pass: that dtype's rounding alone."""
    import torch

    inputs = linear_inputs(model, names, ids)
    ref_modules, modules = dict(reference.named_modules()), dict(model.named_modules())
    with torch.inference_mode():
        return max(relative_error(modules[name](x), ref_modules[name](x.float())) for name, x in inputs.items())


def measure_agreement(build: Callable[[], nn.Module], scheme_name: str, backend: str, dtype: torch.dtype,
                      device: torch.device, ids: torch.Tensor) -> Agreement:
    """Build the model four times (fp32 reference; in `dtype` unquantized, quantized by sim, quantized by `backend`)
    and measure the three distances on `ids`, which also serve as calibration data for static schemes: on the
    logits for weight-only schemes, layer by layer for schemes that quantize activations."""
    import torch

    from qharness.models.sources import dtype_name, resolve_dtype
    from qharness.quant.apply import quantize_, target_linears
    from qharness.quant.backends import QuantContext, capability_on
    from qharness.quant.schemes import get_scheme

    scheme = get_scheme(scheme_name)
    context = QuantContext(device, calibration=lambda: [ids])

    def logits(model: nn.Module) -> torch.Tensor:
        with torch.inference_mode():
            return model(ids).logits.float()

    reference = build().to(device)
    plain = build().to(device, dtype)
    names = list(target_linears(plain))
    simulated, kernel = copy.deepcopy(plain), copy.deepcopy(plain)
    quantize_(simulated, scheme, backend="sim", context=context)
    chosen = quantize_(kernel, scheme, backend=backend, context=context)
    assert chosen == backend, (chosen, backend)
    cap = capability_on(backend, scheme, device)
    coarser = (build().to(device, resolve_dtype(cap.computes_in, device))
               if cap is not None and cap.computes_in else None)
    if scheme.activations is not None:
        level = "layer"
        # a kernel that casts its activations to a coarser dtype (bitsandbytes' int8: fp16) rounds their scaled
        # values in it before it takes codes, so codes near a half step differ from fp32 sim's: it is held to sim
        # run in that dtype, and to that dtype's gap
        twin = None
        if coarser is not None:
            twin = copy.deepcopy(coarser)
            quantize_(twin, scheme, backend="sim", context=context)
        gap, effect, distance = _layer_distances(reference, plain, simulated, kernel, names, ids, twin)
        if coarser is not None:
            gap = max(gap, _layer_gap(reference, coarser, names, ids))
    else:
        level = "logits"
        ref_logits, plain_logits, sim_logits = logits(reference), logits(plain), logits(simulated)
        gap = relative_error(plain_logits, ref_logits)
        if coarser is not None:
            gap = max(gap, relative_error(logits(coarser), ref_logits))
        effect, distance = relative_error(sim_logits, plain_logits), relative_error(logits(kernel), sim_logits)
    return Agreement(backend=backend, scheme=scheme_name, dtype=dtype_name(dtype),
                     hidden=int(plain.config.hidden_size), level=level, dtype_gap=gap, effect=effect,
                     distance=distance)


# the dtypes a case runs in where a capability names none: what GPUs run (bf16) and the exact reference (fp32)
DEFAULT_DTYPES = ("bf16", "fp32")
# a method, not an arithmetic: GPTQ's calibrated rounding has no sim twin (tests/quant/test_gptq.py checks it)
NOT_ARITHMETIC = ("sim", "gptq")


@dataclass(frozen=True)
class Case:
    backend: str
    scheme: str
    dtype: str
    needs_build: bool  # the kernel compiles at first use (minutes)


def kernel_cases(device_type: str = "cuda") -> list[Case]:
    """Every (backend, scheme, dtype) that a library backend declares on `device_type`: read from the capability
    tables, so a new table entry is checked without a new test."""
    from qharness.quant.backends import load_backends

    cases = []
    for entry in load_backends():
        if entry.name in NOT_ARITHMETIC:
            continue
        for scheme, caps in entry.obj.capabilities.items():
            for cap in caps:
                if cap.device == device_type:
                    dtypes = cap.dtypes or DEFAULT_DTYPES
                    cases += [Case(entry.name, scheme, dtype, bool(cap.needs)) for dtype in dtypes]
    return cases


def llama_builder(hidden: int, layers: int = 2, vocab: int = 512, seed: int = 0) -> Callable[[], nn.Module]:
    """A random Llama of this width whose every Linear suits every kernel (input and output widths multiples of 128,
    heads of 64): hidden 128 has the 128x128 matrices a kernel may misread, 1024 is a realistic width."""

    def build() -> nn.Module:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4 // 128 * 128,
                             num_hidden_layers=layers, num_attention_heads=hidden // 64,
                             num_key_value_heads=max(1, hidden // 128), max_position_embeddings=256)
        return LlamaForCausalLM(config).eval()

    return build
