"""The documentation: the site builds with every link and anchor checked, and the README stays a short entry into it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 300
# [text](target) and ![alt](target), the target up to a space or the closing parenthesis
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def nav_pages() -> list[str]:
    """Every page of mkdocs.yml's nav, as a path under docs/."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    pages: list[str] = []

    def walk(node) -> None:
        if isinstance(node, str):
            pages.append(node)
        elif isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            for value in node.values():
                walk(value)

    walk(config["nav"])
    return pages


def slug(heading: str) -> str:
    """The anchor Python-Markdown's toc extension gives a heading (its default slugify)."""
    text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(page: Path) -> set[str]:
    text, fence = [], False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
        elif not fence and line.startswith("#"):
            text.append(slug(line.lstrip("#").strip()))
    return set(text)


def committed(paths: list[str]) -> set[str] | None:
    """Which of these repository paths git tracks; None outside a git checkout."""
    if shutil.which("git") is None:
        return None
    done = subprocess.run(["git", "ls-files", "--", *paths], cwd=ROOT, capture_output=True, text=True)
    return set(done.stdout.split()) if done.returncode == 0 else None


def test_the_site_builds_strict_with_every_link_checked(tmp_path):
    pytest.importorskip(
        "mkdocs", reason="mkdocs is not installed (it comes with the dev extra: pip install -e '.[dev]')"
    )
    site = tmp_path / "site"
    # not -q: with -q, mkdocs 1.6 hides the warnings that --strict counts and exits 0 over a broken link
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    warnings = [line for line in (done.stdout + done.stderr).splitlines() if "WARNING" in line or "Error" in line]
    assert done.returncode == 0, "\n".join(warnings) or done.stderr[-2000:]
    for page in nav_pages():
        built = site / ("index.html" if page == "index.md" else page.removesuffix(".md") + "/index.html")
        assert built.is_file(), f"{page} is in the nav but was not built"


def test_the_readme_is_short_and_every_docs_link_in_it_is_a_page_of_the_nav():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= README_MAX_LINES, "README.md: move details into docs/ (the site)"
    pages = nav_pages()
    missing = [p for p in pages if not (ROOT / "docs" / p).is_file()]
    assert not missing, f"mkdocs.yml's nav names pages that do not exist: {missing}"
    targets = [t for t in LINK.findall(readme) if t.startswith("docs/")]
    assert len(targets) >= 10  # a guide per stage at least
    broken = []
    for target in targets:
        path, _, anchor = target.partition("#")
        inside = path.removeprefix("docs/")
        if path.endswith(".md"):
            if inside not in pages:
                broken.append(f"{target}: not a page of mkdocs.yml's nav")
            elif anchor and anchor not in anchors(ROOT / path):
                broken.append(f"{target}: {path} has no heading with that anchor")
        elif not (ROOT / path).is_file():
            broken.append(f"{target}: no such file")
    assert not broken, "\n".join(broken)


def test_the_docs_show_only_committed_files():
    """Screenshots that tests write into docs/ are not committed: no page may show one (the site would lack it)."""
    sources = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    local = set()
    for source in sources:
        for target in LINK.findall(source.read_text(encoding="utf-8")):
            path = target.partition("#")[0]
            if path and "://" not in path and not path.startswith("mailto:") and not path.endswith(".md"):
                local.add((source.parent / path).resolve().relative_to(ROOT).as_posix())
    assert local, "no images or files linked: the test reads nothing"
    tracked = committed(sorted(local))
    if tracked is None:
        pytest.skip("not a git checkout: cannot tell committed files from generated ones")
    assert sorted(local - tracked) == []
