"""Quantization: schemes (what: `schemes.py`), the reference arithmetic (`sim.py`) and where in a model it goes
(`apply.py`). Kept import-free so `qharness list quants` does not pay for torch."""
