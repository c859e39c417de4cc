"""Figures go to files: matplotlib with its file-only backend, loaded when the first figure is drawn (so commands
that draw nothing never import it)."""

from __future__ import annotations

from typing import Any


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend: no display is needed or opened."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
