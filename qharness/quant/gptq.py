"""GPTQ backend through gptqmodel (the maintained successor of auto-gptq): 4-bit, groups of 128, calibrated.

GPTQ (Frantar et al. 2023) rounds each weight column in turn and spreads the rounding error over the columns not
yet rounded, using the inverse Hessian of the layer's inputs on calibration data. gptqmodel runs it on CPU as well
as CUDA. It works on a model folder, not a module in memory, so we save the model, quantize and save with
gptqmodel, load its result back, and move its quantized Linears into our model by name (the rest of the weights are
untouched by GPTQ). A model quantized in memory by gptqmodel 7.6 gives NaN logits until saved and reloaded.
The scheme is symmetric: on CPU, gptqmodel 7.6's asymmetric (sym=False) result had about 5x the logit error of
plain round-to-nearest on a tiny Llama, while the symmetric one is below it (tests/quant/test_gptq.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from qharness.errors import QHarnessError
from qharness.quant.backend import BACKENDS, Backend, QuantContext
from qharness.quant.schemes import Keep, QuantScheme

SCHEMES_HERE = ("gptq-int4-g128",)


def apply_gptq(model: nn.Module, scheme: QuantScheme, targets: dict[str, nn.Linear], keep: Keep,
               context: QuantContext) -> None:
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

    from qharness.quant.apply import swap_module

    if context.tokenizer is None:
        raise QHarnessError("backend 'gptq' needs the tokenizer in its QuantContext to save the model")
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(torch.get_num_threads()))  # it assumes many cores
    logging.getLogger("gptqmodel").setLevel(logging.WARNING)
    dtype = next(model.parameters()).dtype
    device = str(context.device)
    calibration = [{"input_ids": ids[0].tolist(), "attention_mask": [1] * ids.shape[1]}
                   for ids in context.calibration_batches(scheme.name)]
    config = QuantizeConfig(bits=4, group_size=scheme.weights.granularity.size, sym=scheme.weights.symmetric)
    # gptqmodel prints banners and configs to stdout; keep stdout for our results table
    with tempfile.TemporaryDirectory(prefix="qharness-gptq-") as tmp, contextlib.redirect_stdout(sys.stderr):
        source, quantized_dir = Path(tmp) / "fp", Path(tmp) / "gptq"
        model.save_pretrained(source)
        context.tokenizer.save_pretrained(source)
        gptq_model = GPTQModel.load(str(source), config, device=device, dtype=dtype)
        gptq_model.quantize(calibration, batch_size=1)
        gptq_model.save(str(quantized_dir))
        # the fused CPU kernel needs whole groups; the plain torch kernel handles a ragged last group (SmolLM2: 576)
        # (in bf16 only: it refuses fp32, so a bridge casts around it)
        ragged = any(linear.in_features % config.group_size for linear in targets.values())
        kernel_dtype = torch.bfloat16 if ragged and dtype == torch.float32 else dtype
        kernel = BACKEND.GPTQ_TORCH if ragged else BACKEND.AUTO
        quantized = GPTQModel.load(str(quantized_dir), device=device, dtype=kernel_dtype, backend=kernel).model
    for name in targets:
        module = quantized.get_submodule(name).eval()
        swap_module(model, name, module if kernel_dtype == dtype else DtypeBridge(module, kernel_dtype))


class DtypeBridge(nn.Module):
    """Runs a quantized Linear that only computes in `dtype` inside a model of another dtype."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner, self.dtype = inner, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.to(self.dtype)).to(x.dtype)



BACKENDS.add("gptq", Backend(
    name="gptq",
    description="GPTQ through gptqmodel: calibrated 4-bit g128 weights (CPU and CUDA)",
    apply=apply_gptq,
    requires=("gptqmodel",),
    schemes=SCHEMES_HERE,
))
