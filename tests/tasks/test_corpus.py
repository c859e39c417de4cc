import hashlib
import json

from qharness.tasks.corpus import HELDOUT_KJV_BOOKS, Document, is_heldout, training_documents
from qharness.tasks.spec import tasks_dir


def test_split_is_by_document_and_training_never_sees_heldout():
    docs = [Document("kjv", "Ruth", "a"), Document("kjv", "Genesis", "b")]
    docs += [Document("wordnet", f"noun:{i:08d}", "c") for i in range(2000)]
    train = list(training_documents(iter(docs)))
    assert all(not is_heldout(d) for d in train)
    assert Document("kjv", "Genesis", "b") in train and Document("kjv", "Ruth", "a") not in train
    held_wordnet = [d for d in docs if d.source == "wordnet" and is_heldout(d)]
    assert 20 < len(held_wordnet) < 90  # about 5 in 200


def test_shipped_files_match_their_manifest():
    data = tasks_dir() / "data"
    manifest = json.loads((data / "MANIFEST.json").read_text())
    for name, entry in manifest.items():
        assert hashlib.sha256((data / name).read_bytes()).hexdigest() == entry["sha256"]
    kjv = (data / "kjv-heldout.txt").read_text(encoding="utf-8")
    assert all(kjv.count(book + "\n\n") >= 1 for book in HELDOUT_KJV_BOOKS)
    assert (data / "LICENSES.md").is_file()
