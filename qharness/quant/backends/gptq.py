"""GPTQ backend through gptqmodel (the maintained successor of auto-gptq): 4-bit, groups of 128, calibrated.

GPTQ (Frantar et al. 2023) rounds each weight column in turn and spreads the rounding error over the columns not
yet rounded, using the inverse Hessian of the layer's inputs on calibration data. gptqmodel runs it on CPU as well
as CUDA. It works on a model folder, not a module in memory, so we save the model, quantize and save with
gptqmodel, load its result back, and move its quantized Linears into our model by name (the rest of the weights are
untouched by GPTQ). A model quantized in memory by gptqmodel 7.6 gives NaN logits until saved and reloaded.
The scheme is symmetric: on CPU, gptqmodel 7.6's asymmetric (sym=False) result had about 5x the logit error of
plain round-to-nearest on a tiny Llama, while the symmetric one is below it (tests/quant/test_gptq.py).

Two things gptqmodel 7.6 decides for itself unless told (read from its loader):
- the quantization device: `QuantizeConfig.device` left None becomes CUDA whenever CUDA is visible, whatever
  `GPTQModel.load(device=...)` says (that argument is not used for quantization), so we set it to our device;
- the weight layout: it rebuilds the model from the saved folder with the model's own classes, so GPT-2's
  projections are transformers' Conv1D again, whose weights are (in, out). `convert_conv1d_` already turned them
  into nn.Linear (out, in), so we save those transposed back; saved as they are, the square attention `c_proj`
  loaded silently transposed.
On CUDA its kernels compute in fp16 or bf16; an fp32 model is refused (`check`), not cast behind the user's back.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from qharness.core.errors import QHarnessError
from qharness.core.scoped import environment, logger_level
from qharness.quant.backends import BACKENDS, Backend, Capability, QuantContext, recipe
from qharness.quant.schemes import Keep, QuantScheme

if TYPE_CHECKING:
    import torch
    from torch import nn

# scheme -> (where it runs, bits): on CUDA gptqmodel's kernels (marlin, exllama, triton) take fp16 / bf16 only
SCHEMES_HERE = {
    "gptq-int4-g128": ((Capability("cpu"), Capability("cuda", dtypes=("bf16", "fp16"))), 4),
}


def apply_gptq(model: nn.Module, scheme: QuantScheme, targets: dict[str, nn.Linear], keep: Keep,
               context: QuantContext) -> None:
    import torch

    if context.tokenizer is None:
        raise QHarnessError("backend 'gptq' needs the tokenizer in its QuantContext to save the model")
    # gptqmodel assumes many cores, reads its worker count from the environment when imported, and logs at INFO; its
    # model loader takes 2 CPU workers from that count, so fewer than 2 fails inside it ("Virtual pool
    # 'model_loader:cpu' requests 2 workers but parent 'cpu' only has 1": OMP_NUM_THREADS=1, gptqmodel 7.6)
    workers = max(2, torch.get_num_threads())
    with environment(GPTQMODEL_CPU_WORKERS=str(workers)), logger_level("gptqmodel", logging.WARNING):
        _quantize_with_gptqmodel(model, scheme, targets, context)


def _quantize_with_gptqmodel(model: nn.Module, scheme: QuantScheme, targets: dict[str, nn.Linear],
                             context: QuantContext) -> None:
    import torch
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

    from qharness.quant.modules import DtypeBridge, swap_module

    _, bits = recipe(SCHEMES_HERE, "gptq", scheme)
    dtype = next(model.parameters()).dtype
    device = str(context.device)
    calibration = [{"input_ids": ids[0].tolist(), "attention_mask": [1] * ids.shape[1]}
                   for ids in context.calibration_batches(scheme.name)]
    config = QuantizeConfig(bits=bits, group_size=scheme.weights.granularity.size, sym=scheme.weights.symmetric,
                            device=device)
    # gptqmodel prints banners and configs to stdout; keep stdout for our results table
    with tempfile.TemporaryDirectory(prefix="qharness-gptq-") as tmp, contextlib.redirect_stdout(sys.stderr):
        source, quantized_dir = Path(tmp) / "fp", Path(tmp) / "gptq"
        model.save_pretrained(source, state_dict=native_state_dict(model))
        context.tokenizer.save_pretrained(source)
        gptq_model = GPTQModel.load(str(source), config, dtype=dtype)  # the device is config.device
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


def native_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s weights in the layout its own class loads: a Linear that `convert_conv1d_` made from a Conv1D goes
    back to Conv1D's (in, out). Which modules those are comes from the class built on the meta device (no memory,
    no weights), not from names."""
    import torch

    with torch.device("meta"):
        native = type(model)(model.config)
    conv1d = {name for name, module in native.named_modules() if type(module).__name__ == "Conv1D"}
    return {key: value.T.contiguous() if key.endswith(".weight") and key.rpartition(".")[0] in conv1d else value
            for key, value in model.state_dict().items()}


BACKENDS.add("gptq", Backend(
    name="gptq",
    description="GPTQ through gptqmodel: calibrated 4-bit g128 weights (CPU; CUDA in fp16/bf16)",
    apply=apply_gptq,
    capabilities={name: caps for name, (caps, _) in SCHEMES_HERE.items()},
    requires=("gptqmodel",),
    preference=20,
))
