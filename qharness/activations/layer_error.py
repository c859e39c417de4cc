"""Per layer, how far the quantized model's layer output is from the full-precision one, beside that layer's
activation magnitude: where in the stack a scheme loses, and whether it is where the massive activations are.

Both models see the same calibration sequences; hooks reduce each layer's output to a few numbers at once
(relative L2 error, fp max |h|, fp median |h|), so nothing per token is kept across layers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from qharness.activations.scan import layer_hooks
from qharness.models.layers import decoder_layers


def _outputs(model: nn.Module, input_ids: Tensor) -> list[Tensor]:
    outputs: list[Tensor] = []
    with layer_hooks(decoder_layers(model), lambda i, hidden: outputs.append(hidden.detach().float())):
        model(input_ids=input_ids)
    return outputs


def layer_errors(fp_model: nn.Module, quantized_model: nn.Module, batches: list[Tensor]) -> list[dict[str, Any]]:
    """One entry per decoder layer: mean over batches of ||h_q - h_fp|| / ||h_fp||, and the fp max and median |h|."""
    sums: list[dict[str, float]] = []
    with torch.inference_mode():
        for input_ids in batches:
            reference, quantized = _outputs(fp_model, input_ids), _outputs(quantized_model, input_ids)
            for i, (h, q) in enumerate(zip(reference, quantized, strict=True)):
                if len(sums) <= i:
                    sums.append({"rel_error": 0.0, "fp_max": 0.0, "fp_median": 0.0})
                sums[i]["rel_error"] += float((q - h).norm() / h.norm())
                sums[i]["fp_max"] = max(sums[i]["fp_max"], float(h.abs().max()))
                sums[i]["fp_median"] += float(h.abs().median())
    n = len(batches)
    return [{"layer": i, "rel_error": s["rel_error"] / n, "fp_max": s["fp_max"], "fp_median": s["fp_median"] / n}
            for i, s in enumerate(sums)]
