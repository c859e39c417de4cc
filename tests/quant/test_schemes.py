"""Every registered scheme's definition, pinned: one expected row per name, so a changed format, granularity,
symmetry, grid or calibration fails here by name (a per-channel weight turned per-tensor moves a tiny model's
logits by less than the backend tests' tolerances used to allow, so only a table catches it)."""

from dataclasses import fields

import pytest
import torch

from qharness.quant.schemes import SCHEMES, TensorQuant, get_scheme
from qharness.quant.sim import fake_quantize

# name: (weights, activations, LLM.int8 outlier threshold and rule); a tensor reads
# "<format> <granularity> <sym|asym> [static-<observer>] [unscaled] [half-span] [float-zero]"
EXPECTED = {
    "fp8-e4m3-unscaled": ("fp8_e4m3 tensor sym unscaled", "fp8_e4m3 tensor sym unscaled", None),
    "fp8-e4m3-w8a8-tensor": ("fp8_e4m3 tensor sym", "fp8_e4m3 tensor sym", None),
    "fp8-e4m3-w8a8-token": ("fp8_e4m3 channel sym", "fp8_e4m3 token sym", None),
    "fp8-e4m3-weight": ("fp8_e4m3 channel sym", None, None),
    "fp8-e5m2-unscaled": ("fp8_e5m2 tensor sym unscaled", "fp8_e5m2 tensor sym unscaled", None),
    "fp8-e5m2-w8a8-tensor": ("fp8_e5m2 tensor sym", "fp8_e5m2 tensor sym", None),
    "gptq-int4-g128": ("int4 g128 sym", None, None),
    "int4-w4a4-tensor": ("int4 channel sym", "int4 tensor sym", None),
    "int4-w4a4-tensor-g128": ("int4 g128 sym", "int4 tensor sym", None),
    "int4-w4a4-token": ("int4 channel sym", "int4 token sym", None),
    "int4-w4a4-token-g128": ("int4 g128 sym", "int4 token sym", None),
    "int4-w4a8-token": ("int4 channel sym", "int8 token sym", None),
    "int4-w4a8-token-g128": ("int4 g128 sym", "int8 token sym", None),
    "int4-weight-g128": ("int4 g128 asym", None, None),
    "int4-weight-g128-tinygemm": ("int4 g128 asym float-zero", None, None),
    "int8-w8a8-tensor": ("int8 channel sym", "int8 tensor sym", None),
    "int8-w8a8-tensor-static": ("int8 channel sym", "int8 tensor sym static-minmax", None),
    "int8-w8a8-tensor-static-p9999": ("int8 channel sym", "int8 tensor sym static-p99.99", None),
    "int8-w8a8-token": ("int8 channel sym", "int8 token sym", None),
    "int8-w8a8-token-halfspan": ("int8 channel sym half-span", "int8 token sym half-span", None),
    "int8-weight-channel": ("int8 channel sym", None, None),
    "int8-weight-channel-halfspan": ("int8 channel sym half-span", None, None),
    "llm-int8": ("int8 channel sym", "int8 token sym", (6.0, "column")),
    "llm-int8-bnb": ("int8 channel sym", "int8 token sym", (6.0, "entries")),
    "mxfp4-w4a4": ("fp4_e2m1 b32/e8m0 sym", "fp4_e2m1 b32/e8m0 sym", None),
    "mxfp4-weight": ("fp4_e2m1 b32/e8m0 sym", None, None),
    "mxfp8-w8a8": ("fp8_e4m3 b32/e8m0 sym", "fp8_e4m3 b32/e8m0 sym", None),
    "nf4": ("nf4 g64 sym", None, None),
    "nvfp4-w4a4": ("fp4_e2m1 b16/e4m3 sym", "fp4_e2m1 b16/e4m3 sym", None),
    "nvfp4-weight": ("fp4_e2m1 b16/e4m3 sym", None, None),
}
# the TensorQuant fields `describe` renders: a new field must be added to it and to the table
DESCRIBED = {"format", "granularity", "symmetric", "dynamic", "observer", "percentile", "scaled", "int_scale",
             "zero_point"}


def describe(tq: TensorQuant | None) -> str | None:
    if tq is None:
        return None
    granularity = {"group": lambda g: f"g{g.size}", "block": lambda g: f"b{g.size}/{g.scale}"}.get(
        tq.granularity.kind, lambda g: g.kind)(tq.granularity)
    parts = [tq.format, granularity, "sym" if tq.symmetric else "asym"]
    if not tq.dynamic:
        parts.append("static-" + ("minmax" if tq.observer == "minmax" else f"p{tq.percentile:g}"))
    if not tq.scaled:
        parts.append("unscaled")
    if tq.int_scale != "qmax":
        parts.append(tq.int_scale)
    if tq.zero_point != "int":
        parts.append(f"{tq.zero_point}-zero")
    return " ".join(parts)


def test_the_table_covers_every_registered_scheme_and_every_field():
    assert set(SCHEMES.names()) == set(EXPECTED)
    assert {f.name for f in fields(TensorQuant)} == DESCRIBED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_scheme_definition(name):
    scheme = get_scheme(name)
    assert scheme.name == name
    outliers = None if scheme.outlier_threshold is None else (scheme.outlier_threshold, scheme.outlier_rule)
    assert (describe(scheme.weights), describe(scheme.activations), outliers) == EXPECTED[name]
    assert scheme.description and scheme.reference  # every scheme says what it is and where it comes from


def test_half_span_grid_by_hand():
    """int8 with s = amax / 127.5 and q = round(x * (1 / s)): -1 -> -127.5 -> -128 (ties to even), 0.5 -> 63.75
    -> 64, 1 -> 127.5 -> 128, clamped to 127. With s = amax / 127: -1 -> -127, 0.5 -> 63.5 -> 64, 1 -> 127."""
    x = torch.tensor([[-1.0, 0.5, 1.0]], dtype=torch.float64)
    halfspan = fake_quantize(x, get_scheme("int8-weight-channel-halfspan").weights)
    plain = fake_quantize(x, get_scheme("int8-weight-channel").weights)
    torch.testing.assert_close(halfspan, torch.tensor([[-128 / 127.5, 64 / 127.5, 127 / 127.5]], dtype=torch.float64),
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(plain, torch.tensor([[-1.0, 64 / 127, 1.0]], dtype=torch.float64), rtol=0, atol=1e-12)


def test_half_span_is_for_symmetric_integer_formats_only():
    from qharness.core.errors import ConfigError
    from qharness.quant.schemes import PerChannel

    with pytest.raises(ConfigError, match="int_scale 'half-span' is for symmetric integer formats, not 'fp8_e4m3'"):
        TensorQuant("fp8_e4m3", PerChannel(), int_scale="half-span")
    with pytest.raises(ConfigError, match="not asymmetric 'int4'"):
        TensorQuant("int4", PerChannel(), symmetric=False, int_scale="half-span")
    with pytest.raises(ConfigError, match="unknown int_scale 'x'; valid: qmax, half-span"):
        TensorQuant("int8", PerChannel(), int_scale="x")
