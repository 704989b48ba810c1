"""Every relative link in README.md and docs/*.md points to a file that exists, and every
`#anchor` to a heading of the target page (GitHub's heading slugs)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"(`+)(.+?)\1", re.S)
LINK = re.compile(r"(?<!\\)\[([^\]]*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
EXTERNAL = ("http://", "https://", "mailto:")


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code spans (links there are not links)."""
    kept, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            kept.append("")
            continue
        kept.append("" if fenced else line)
    return INLINE_CODE.sub(lambda m: " " * len(m.group(0)), "\n".join(kept))


def slug(title: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lowercased, every character that is not a
    letter, digit, underscore, hyphen or space removed, spaces turned into hyphens."""
    title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title)  # a link in a heading: its text
    title = re.sub(r"[`*]", "", title).strip().lower()
    title = re.sub(r"[^\w\- ]", "", title)
    return title.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a page's headings (a repeated slug gets -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    found = set()
    fenced = False
    for line in path.read_text().splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        match = None if fenced else HEADING.match(line)
        if match:
            base = slug(match.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(path: Path) -> list[str]:
    return [m.group(2) for m in LINK.finditer(prose(path.read_text()))]


def broken_links(path: Path) -> list[str]:
    """Each relative link of `path` that does not resolve, with the reason."""
    broken = []
    for target in links(path):
        if target.startswith(EXTERNAL):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{target}: no file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
        elif anchor and dest.suffix != ".md":
            broken.append(f"{target}: an anchor into a file that is not Markdown")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


def test_readme_links_every_docs_page():
    linked = {
        (ROOT / t.partition("#")[0]).resolve()
        for t in links(ROOT / "README.md")
        if not t.startswith(EXTERNAL) and t.partition("#")[0]
    }
    pages = set((ROOT / "docs").glob("*.md"))
    assert pages, "docs/ has no pages"
    assert pages <= linked, sorted(str(p.relative_to(ROOT)) for p in pages - linked)


def test_checker_reports_broken_links(tmp_path):
    """The checker itself: a missing file, a missing anchor and an anchor into a missing
    heading of the same page are reported; good links and links inside code are not."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text(
        "# Other page\n\n## Models over 2 GB: the `.onnx` + `.onnx.data` pair\n\n"
        "## Against update_bn\n\n## Twice\n\n## Twice\n"
    )
    page = tmp_path / "README.md"
    page.write_text(
        "# Title\n\n## The peers' own BatchNorm-fusion tests\n\n"
        "[ok](docs/other.md) [ok](docs/other.md#other-page) "
        "[ok](docs/other.md#models-over-2-gb-the-onnx--onnxdata-pair) "
        "[ok](docs/other.md#against-update_bn) [ok](docs/other.md#twice-1) "
        "[ok](#the-peers-own-batchnorm-fusion-tests) [ok](https://example.com/nowhere)\n"
        "[bad](docs/missing.md) [bad](docs/other.md#no-such-heading) [bad](#nowhere)\n"
        "`[code](docs/missing-in-code.md)`\n\n"
        "```\n[code](docs/missing-in-fence.md)\n```\n"
    )
    assert broken_links(page) == [
        f"docs/missing.md: no file {tmp_path.resolve() / 'docs' / 'missing.md'}",
        "docs/other.md#no-such-heading: no heading with anchor #no-such-heading in other.md",
        "#nowhere: no heading with anchor #nowhere in README.md",
    ]
