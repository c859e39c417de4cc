"""The README's Layout is the map a newcomer reads first: it must name every package and every module in the tree,
each under the package that holds it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "qharness"


def layout_blocks() -> dict[str, str]:
    """Top-level package ('core', 'quant', ...) -> the Layout text that describes it (its line and the indented
    lines after it)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    blocks: dict[str, str] = {}
    current = None
    for line in section.splitlines():
        started = re.match(r"^qharness/(\w+)/", line)
        if started:
            current = started.group(1)
            blocks[current] = ""
        elif line and not line.startswith(" "):
            current = None
        if current:
            blocks[current] += line + "\n"
    return blocks


def modules_of(folder: Path) -> list[str]:
    return sorted(path.stem for path in folder.glob("*.py") if path.name != "__init__.py")


def test_the_layout_names_every_package_and_module():
    blocks = layout_blocks()
    missing = []
    for package in sorted(p for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()):
        block = blocks.get(package.name)
        if block is None:
            missing.append(f"qharness/{package.name}/")
            continue
        missing += [f"qharness/{package.name}/{m}.py" for m in modules_of(package) if f"{m}.py" not in block]
        for sub in sorted(p for p in package.iterdir() if (p / "__init__.py").is_file()):
            if f"{sub.name}/" not in block:
                missing.append(f"qharness/{package.name}/{sub.name}/")
            missing += [f"qharness/{package.name}/{sub.name}/{m}.py" for m in modules_of(sub)
                        if not re.search(rf"\b{m}\b", block)]
    missing += [f"qharness/{m}.py" for m in modules_of(PACKAGE) if f"{m}.py" not in "".join(blocks.values())]
    assert not missing, f"README's Layout does not name: {missing}"


def test_the_layout_names_no_module_that_is_gone():
    blocks = layout_blocks()
    stale = [name for name in blocks if not (PACKAGE / name / "__init__.py").is_file()]
    assert not stale, f"README's Layout names packages that do not exist: {stale}"


def test_every_relative_link_of_the_docs_points_at_a_file_that_exists():
    """The findings embed published plots and the README links docs: a renamed figure or file must fail here, not
    show a broken image to a reader. Covers inline links and images, `[text](relative/path)`, resolved from the
    document's folder; web links are skipped, and reference-style links or HTML `src=` are not looked at."""
    for doc in (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))):
        text = doc.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", text):
            if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
                continue
            assert (doc.parent / target).exists(), f"{doc.name} links {target}, which does not exist"
