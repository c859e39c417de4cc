"""The paper's figures from a profile: top-3 magnitudes and the median per layer, and the attention sink."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from qharness.core.figures import pyplot

if TYPE_CHECKING:
    from qharness.activations.profile import Profile


def plot_magnitudes(profile: Profile, path: Path, title: str) -> Path:
    plt = pyplot()
    layers = [entry.layer for entry in profile.layers]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for rank, style in enumerate(("-o", "-s", "-^")):
        values = [abs(entry.top[rank].value) if len(entry.top) > rank else float("nan") for entry in profile.layers]
        ax.plot(layers, values, style, markersize=3, label=f"top {rank + 1}")
    ax.plot(layers, [entry.median for entry in profile.layers], "-", color="grey", label="median")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("|activation| (layer output)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_attention_sink(profile: Profile, path: Path, title: str) -> Path | None:
    shares = [entry.attention_on_first for entry in profile.layers]
    if all(share is None for share in shares):
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.bar([entry.layer for entry in profile.layers], [s or 0.0 for s in shares], color="tab:purple")
    ax.set_ylim(0, 1)
    ax.set_xlabel("layer")
    ax.set_ylabel("attention on position 0")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
