"""The repository stands on its own: a clone has what its code, docs and charts cite. No file
points outside the checkout (a folder beside the checkout, a machine's absolute path, a design
page the clone does not hold), and every relative link in a Markdown file names a file or
folder that exists."""

import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".py", ".md", ".sh", ".toml", ".yaml", ".yml", ".txt", ".proto", ".tpl", ""}
# What a clone cannot resolve: the sibling folder beside the checkout, this machine's absolute
# paths, and the design page's old name (now docs/design.md). Spelled in pieces, so that this
# file does not cite them itself.
SIBLING, MACHINE, OLD_DESIGN = "../" + "shared", "/" + "work/", "DESIGN" + ".md"
OUTSIDE = re.compile(rf"{re.escape(SIBLING)}\b|{re.escape(MACHINE)}"
                     rf"|(?<![\w/]){re.escape(OLD_DESIGN)}")
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)\s]*)?\)")


def tracked_files() -> list[pathlib.Path]:
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    return [ROOT / n for n in names if n and (ROOT / n).is_file()]


def text_files() -> list[pathlib.Path]:
    return [p for p in tracked_files() if p.suffix in TEXT_SUFFIXES
            and p.stat().st_size < 2_000_000]


def test_nothing_cites_a_file_outside_the_repository():
    found = []
    for path in text_files():
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        found += [f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
                  for n, line in enumerate(text.splitlines(), 1) if OUTSIDE.search(line)]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("pattern", [f"see {SIBLING}/peers/x.sh", f"{MACHINE}main/.venv",
                                     f"{OLD_DESIGN} §2"])
def test_the_pattern_catches_outside_citations(pattern):
    assert OUTSIDE.search(pattern)
    assert not OUTSIDE.search("docs/design.md §2")


def test_markdown_links_resolve():
    broken = []
    for path in tracked_files():
        if path.suffix != ".md":
            continue
        for target, _ in LINK.findall(path.read_text()):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            if not (path.parent / target).exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert not broken, "\n".join(broken)
