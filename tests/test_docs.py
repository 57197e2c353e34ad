"""The documentation stays walkable: README.md short, every relative link in README.md and
docs/*.md pointing at a file (and heading) that exists, every path a page names in backticks
(``src/fedmm/...``, ``tests/...``, ``scripts/...``, ``benchmarks/...``) existing, and every docs
page in MkDocs' nav (mkdocs.yml) and in the README's "Documentation" list.  Light: reads text
only (the MkDocs build itself, when mkdocs is installed, is one subprocess of a second)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
MAX_README_LINES = 260
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")  # [text](target), not ![image](...)
CODE = re.compile(r"```.*?```", re.S)  # links inside fenced blocks are not links
PATH = re.compile(r"`((?:src/fedmm|tests|scripts|benchmarks)/[A-Za-z0-9_./-]*[A-Za-z0-9_/])`")


def slugs(text: str) -> set[str]:
    """The anchors of a page's headings, as GitHub and MkDocs (Python-Markdown's ``toc``) make
    them: lower case, punctuation dropped, spaces to hyphens (GitHub keeps runs of hyphens,
    Python-Markdown collapses them; both are accepted)."""
    out = set()
    for line in CODE.sub("", text).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m[1]).replace("`", "").lower()
        title = re.sub(r"[^\w\s-]", "", title).strip()
        out |= {re.sub(r"\s", "-", title), re.sub(r"[-\s]+", "-", title)}
    return out


def links(path: Path) -> list[str]:
    return LINK.findall(CODE.sub("", path.read_text()))


@pytest.mark.parametrize("path", [README, *PAGES], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_point_at_files_and_headings_that_exist(path: Path):
    broken = []
    for target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(ROOT)}")
        elif anchor and dest.suffix == ".md" and anchor not in slugs(dest.read_text()):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    assert not broken, f"{path.name} has broken links:\n" + "\n".join(broken)


@pytest.mark.parametrize("path", [README, *PAGES], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_paths_named_in_the_docs_exist(path: Path):
    missing = sorted({p for p in PATH.findall(path.read_text()) if not (ROOT / p).exists()})
    assert not missing, (f"{path.name} names paths that do not exist (moved or split? update the "
                         f"page): {missing}")  # fmt: skip


def test_the_readme_stays_short():
    n = len(README.read_text().splitlines())
    assert n <= MAX_README_LINES, (f"README.md has {n} lines (at most {MAX_README_LINES}): put "
                                   "the detail in a docs/ page and link it")  # fmt: skip


def test_every_docs_page_is_in_the_nav_and_in_the_readme():
    nav = set(re.findall(r"^\s*-\s*[^:\n]+:\s*(\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(),
                         re.M))  # fmt: skip
    readme = {t.partition("#")[0] for t in links(README)}
    pages = {p.name for p in PAGES}
    assert pages <= nav, f"add to mkdocs.yml's nav: {sorted(pages - nav)}"
    assert nav <= pages, f"mkdocs.yml's nav names missing pages: {sorted(nav - pages)}"
    unlinked = sorted(p for p in pages if f"docs/{p}" not in readme)
    assert not unlinked, f"add to README.md's Documentation list: {unlinked}"


def test_the_checks_above_can_fail(tmp_path: Path):
    """The link and anchor checks catch what they claim to (a guard against a regex that
    matches nothing)."""
    (tmp_path / "a.md").write_text("# A page\n\n## Some `code` here: yes\n\nsee [b](b.md), "
                                   "[x](#some-code-here-yes), [y](#nope)\n")  # fmt: skip
    assert links(tmp_path / "a.md") == ["b.md", "#some-code-here-yes", "#nope"]
    assert "some-code-here-yes" in slugs((tmp_path / "a.md").read_text())
    assert "nope" not in slugs((tmp_path / "a.md").read_text())
    assert PATH.findall("`src/fedmm/engine.py` and `tests/x_y.py`.") == [
        "src/fedmm/engine.py", "tests/x_y.py"]  # fmt: skip


@pytest.mark.skipif(shutil.which("mkdocs", path=str(Path(sys.executable).parent)) is None,
                    reason="mkdocs is not installed (make docs installs it)")  # fmt: skip
def test_mkdocs_builds_strictly(tmp_path: Path):
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    out = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
