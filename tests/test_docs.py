"""The docs' relative links lead somewhere: each file exists, and each
``#anchor`` into a Markdown file names one of its headings (GitHub's rule:
lower case, punctuation dropped, spaces to hyphens, ``-1``, ``-2`` for
repeats). The notebook and the backends page link into each other by dated
headings, which are easy to rename and forget."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_CODE = re.compile(r"```.*?```", re.S)


def _slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    counts: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#+ (.*)$", _CODE.sub("", page.read_text()), re.M):
        slug = _slug(heading)
        n = counts.get(slug, -1) + 1
        counts[slug] = n
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_slug_follows_github():
    assert _slug("The floor of a loop of XLA dots (2026-11-27, 11:42-11:46 UTC)") == (
        "the-floor-of-a-loop-of-xla-dots-2026-11-27-1142-1146-utc")
    assert _slug("How `tiled` works (and why)") == "how-tiled-works-and-why"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    broken = []
    for link in re.findall(r"\]\(([^)\s]+)\)", _CODE.sub("", page.read_text())):
        if re.match(r"[a-z]+:", link):  # http(s), mailto
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{link}: no such file")
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            broken.append(f"{link}: no such heading in {target.name}")
    assert not broken, broken
