"""Training text streamed from a Hugging Face hub dataset (`--data hf:...`, for users online), read only as far as
the training needs.

    hf:DATASET[:CONFIG[:SPLIT[:FIELD]]]       split defaults to train, field to text
    hf:HuggingFaceFW/fineweb-edu:sample-10BT
    hf:Salesforce/wikitext:wikitext-103-raw-v1:train
    hf:allenai/c4:en
    hf:bigcode/the-stack-smol::train:content  (an empty part keeps its default)

Hub ids hold no ':', so the parts are unambiguous. The dataset is opened with `streaming=True` and rows are read
until the documents kept hold the tokens asked for; nothing else is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from qharness.core.errors import DataError, first_line
from qharness.training.heldout import check_hub_split

PREFIX = "hf:"
FORM = ("write hf:DATASET[:CONFIG[:SPLIT[:FIELD]]], e.g. hf:HuggingFaceFW/fineweb-edu:sample-10BT or "
        "hf:Salesforce/wikitext:wikitext-103-raw-v1:train")


@dataclass(frozen=True)
class HubText:
    path: str  # dataset id on the hub, "org/name" (or a canonical "name")
    config: str | None  # the dataset's config (name=), None for its default
    split: str  # a split ("train"); streaming takes no slices, and the documents needed are read from its start
    field: str  # the column that holds the text

    @property
    def label(self) -> str:
        return f"{PREFIX}{self.path}:{self.config or ''}:{self.split}:{self.field}"


def is_hub_text(item: str) -> bool:
    return item.startswith(PREFIX)


def parse(item: str) -> HubText:
    """`hf:org/name:config:split:field` -> HubText; checks the form and that no evaluation split is asked for."""
    parts = item.removeprefix(PREFIX).split(":")
    if not parts[0] or len(parts) > 4 or parts[0].count("/") > 1:
        raise DataError(f"--data {item}: {FORM}")
    path, config, split, field = (*parts, "", "", "")[:4]
    spec = HubText(path, config or None, split or "train", field or "text")
    check_hub_split(spec.path, spec.split, f"--data {item}")
    return spec


def stream_documents(spec: HubText, needed_tokens: int, count_tokens: Callable[[str], int],
                     keep: Callable[[str], bool] = lambda text: True) -> list[str]:
    """Documents of `spec`, in the dataset's order, until those kept hold `needed_tokens` (or the split ends)."""
    try:
        import datasets
    except ImportError as exc:
        raise DataError(f"--data {spec.label} streams a hub dataset and needs `datasets`: "
                        "pip install -c constraints.txt datasets") from exc
    documents: list[str] = []
    tokens = 0
    try:
        rows = datasets.load_dataset(spec.path, spec.config, split=spec.split, streaming=True)
        for row in rows:
            if spec.field not in row:
                raise DataError(f"--data {spec.label}: its rows have no '{spec.field}' field (they have "
                                f"{sorted(row)}); name the text field as the fourth part")
            text = row[spec.field]
            if not isinstance(text, str) or not text.strip() or not keep(text):
                continue
            documents.append(text)
            tokens += count_tokens(text)
            if tokens >= needed_tokens:
                break
    except DataError:
        raise
    except Exception as exc:  # offline, unknown dataset or config, a network error mid-stream
        raise DataError(f"--data {spec.label}: cannot stream it from the hub ({first_line(exc, 160)}); it needs the "
                        "internet, or give local files") from exc
    return documents
