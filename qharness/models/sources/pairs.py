"""`pair:<alias>` (`pair:osp-1.4b-adam`, `pair:osp-1.4b-muon`): public checkpoints trained at scale with and without
a massive-activation mitigation, for users online. An alias is a hub id plus what the hub id alone does not say:
the mitigation it was trained with and the family it shares with its baseline (mitigation "none"), so `qharness
compare` sets each mitigated model against its own baseline as it does the zoo's.

Every hub id below was read off the authors' own published page, named in `source` (the OSP README at the commit in
its URL; the gated-attention model card, which the paper and its GitHub README link to). A pair whose weights need
the authors' modeling code is listed with `needs_remote_code` and refused when named: qharness never sets
`trust_remote_code` (loading.py).

Left out, unconfirmed: the softpick models (arXiv 2504.20966; its README points only at the account
https://huggingface.co/zaydzuhri, not at model ids), and the 15B-A2B MoE of the gated-attention paper (the model card
lists three variants, baseline, gate_headwise and gate_elementwise, which the GitHub demo loads as 1B_<variant>; no
MoE checkpoint is named). Add a pair: one `PublishedModel` in `PAIRS`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from qharness.core.errors import ModelLoadError, UnknownName
from qharness.models.sources import SOURCES, Source

PREFIX = "pair:"
OSP_README = ("https://github.com/dmis-lab/Outlier-Safe-Pre-Training/blob/4c2c367370f76c245e25ec1e0c4ade9ba808db82/"
              "README.md")
GATED_CARD = "https://huggingface.co/QwQZh/gated_attention (linked from arXiv 2505.06708 and its GitHub README)"
GATED_CODE = ("its README's models are Qwen3 with gating flags read by the repository's own modeling_qwen3.py "
              "(https://github.com/qiuzh20/gated_attention demo loads them with trust_remote_code=True)")


@dataclass(frozen=True)
class PublishedModel:
    alias: str  # the part after "pair:"
    hub_id: str  # "org/name" on the Hugging Face hub
    family: str  # models trained with one recipe except the mitigation; the "none" member is the baseline
    mitigation: str  # "none" for the baseline; otherwise the paper's changes joined by '+'
    description: str
    source: str  # the published page the hub id was read from
    needs_remote_code: str = ""  # why it cannot load without the authors' code ("" = plain transformers)


def _osp(alias: str, repo: str, mitigation: str, tokens: str, what: str) -> PublishedModel:
    return PublishedModel(alias, f"dmis-lab/{repo}", f"{PREFIX}osp-1.4b{tokens}", mitigation,
                          f"OSP 1.4B Llama, {what} (arXiv 2506.19697)", OSP_README)


def _gated(variant: str, mitigation: str) -> PublishedModel:
    return PublishedModel(f"gated-1b-{variant}", "QwQZh/gated_attention", f"{PREFIX}gated-1b", mitigation,
                          f"gated attention 1B Qwen3, variant '{variant}' (arXiv 2505.06708)", GATED_CARD, GATED_CODE)


PAIRS: tuple[PublishedModel, ...] = (
    # Outlier-Safe Pre-Training: 1T tokens of smollm-corpus; "architecturally identical to a standard transformer at
    # inference time" (its README: the embedding projections are merged into the embedding and head).
    _osp("osp-1.4b-adam", "OSP-1.4B-1T-Adam", "none", "", "1T tokens, Adam (the baseline)"),
    _osp("osp-1.4b-muon", "OSP-1.4B-1T-Muon-SSNorm-EmbProj", "muon+ssnorm+embproj", "",
         "1T tokens, Muon + single-scale RMSNorm + embedding projection"),
    # The paper's 100B-token ablations: each part of OSP on its own.
    _osp("osp-1.4b-100b-adam", "OSP-1.4B-100B-Adam", "none", "-100b", "100B tokens, Adam (the baseline)"),
    _osp("osp-1.4b-100b-muon-only", "OSP-1.4B-100B-Muon-Only", "muon_only", "-100b",
         "100B tokens, Muon on every parameter, embeddings included"),
    _osp("osp-1.4b-100b-muon", "OSP-1.4B-100B-Muon", "muon", "-100b", "100B tokens, Muon (Adam on embeddings)"),
    _osp("osp-1.4b-100b-muon-ssnorm", "OSP-1.4B-100B-Muon-SSNorm", "muon+ssnorm", "-100b",
         "100B tokens, Muon + single-scale RMSNorm"),
    _osp("osp-1.4b-100b-muon-embproj", "OSP-1.4B-100B-Muon-EmbProj", "muon+embproj", "-100b",
         "100B tokens, Muon + embedding projection"),
    _osp("osp-1.4b-100b-muon-ssnorm-embproj", "OSP-1.4B-100B-Muon-SSNorm-EmbProj", "muon+ssnorm+embproj", "-100b",
         "100B tokens, full OSP"),
    # Gated attention (Qwen team): one hub repository holding the three 1B variants.
    _gated("baseline", "none"),
    _gated("headwise", "gated_attention_headwise"),
    _gated("elementwise", "gated_attention_elementwise"),
)
BY_NAME: dict[str, PublishedModel] = {PREFIX + p.alias: p for p in PAIRS}


def published(name: str) -> PublishedModel:
    """The entry of `pair:<alias>`; an unknown alias raises with close names and every known one."""
    if name in BY_NAME:
        return BY_NAME[name]
    close = difflib.get_close_matches(name, BY_NAME, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise UnknownName(f"unknown published pair '{name}'; {hint}known: {', '.join(BY_NAME)}")


def check_loadable(entry: PublishedModel) -> None:
    if entry.needs_remote_code:
        raise ModelLoadError(f"{PREFIX}{entry.alias} ({entry.hub_id}) needs the authors' model code: "
                             f"{entry.needs_remote_code}; qharness never runs hub code (no trust_remote_code)")


def matches(name: str) -> bool:
    """A pair: name resolves without loading anything; one that needs remote code is refused here, before a run or
    sweep starts any work."""
    if not name.startswith(PREFIX):
        return False
    check_loadable(published(name))
    return True


def read(name: str, dtype: Any) -> tuple[Any, Any, str]:
    from qharness.models.loading import load_pretrained

    entry = published(name)
    check_loadable(entry)
    return (*load_pretrained(entry.hub_id, dtype), f"hub:{entry.hub_id} ({name})")


def describe_name(name: str) -> dict[str, str]:
    entry = published(name)
    return {"mitigation": entry.mitigation, "family": entry.family}


SOURCES.add("pairs", Source(
    name="pairs",
    form="a published pair (pair:osp-1.4b-adam, pair:osp-1.4b-muon, ...)",
    order=15,
    matches=matches,
    read=read,
    names=lambda: list(BY_NAME),
    family=lambda name: published(name).family,
    describe_name=describe_name,
))
