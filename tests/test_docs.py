"""The documentation holds together: every relative link and anchor resolves, the README
stays a short front door whose first two commands are the demo and the test scripts, no
page cites the internal contract, and every docs page opens with a sentence saying what it
answers."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
README_MAX_LINES = 200
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")
CODE_BLOCK = re.compile(r"^(```|~~~)[^\n]*\n(.*?)^\1", re.MULTILINE | re.DOTALL)
# The README's first two code blocks: the demo, then the test command (each must work as
# written on a fresh clone).
FIRST_COMMANDS = ["ops/demo.sh", "ops/test.sh"]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"<[^>]+>", "", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor of a page's headings (a repeated heading gets -1, -2, ... as on GitHub)."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for line in FENCE.sub("", path.read_text()).splitlines():
        heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            base = slug(heading.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[str]:
    """The link targets of a page, outside code blocks and code spans."""
    text = CODE_SPAN.sub("", FENCE.sub("", path.read_text()))
    return LINK.findall(text)


def test_slugs_follow_github() -> None:
    assert slug("Nothing lost: the failure table") == "nothing-lost-the-failure-table"
    assert slug("The provider's answers") == "the-providers-answers"
    assert slug("Celery settings, and why retries do not use countdowns") == (
        "celery-settings-and-why-retries-do-not-use-countdowns"
    )
    assert slug("`POST /_stub/plan` body") == "post-_stubplan-body"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page: Path) -> None:
    broken = []
    for target in links(page):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (page.parent / file_part).resolve() if file_part else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading with that anchor")
    assert not broken, f"{page.name}: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_page_cites_the_internal_contract(page: Path) -> None:
    assert not re.search(r"\bSPEC\b", page.read_text()), page.name


def test_the_readme_is_a_short_front_door() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) < README_MAX_LINES, f"README.md has {len(lines)} lines"


def test_every_docs_page_is_in_the_readme_map() -> None:
    readme = (ROOT / "README.md").read_text()
    for page in (ROOT / "docs").glob("*.md"):
        assert f"(docs/{page.name})" in readme, f"{page.name} is missing from the README's map"


def test_the_link_check_finds_a_broken_link_and_anchor(tmp_path: Path) -> None:
    text = "# Title\n\n[ok](#title) [x](b.md) [y](#nope) `[s](d.md)`\n```\n[z](c.md)\n```\n"
    (tmp_path / "a.md").write_text(text)
    assert links(tmp_path / "a.md") == ["#title", "b.md", "#nope"]
    assert anchors(tmp_path / "a.md") == {"title"}


def code_blocks(text: str) -> list[str]:
    """The contents of a page's fenced code blocks, in order, stripped."""
    return [match.group(2).strip() for match in CODE_BLOCK.finditer(text)]


def git_mode(path: Path) -> str | None:
    """The file mode git records for ``path`` (what a fresh clone gets), or None outside git."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-s", "--", str(path.relative_to(ROOT))],
            cwd=ROOT, capture_output=True, text=True, check=True, timeout=30,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return listed.split()[0] if listed else None


def test_the_readme_opens_with_the_demo_and_the_test_command() -> None:
    blocks = code_blocks((ROOT / "README.md").read_text())
    assert blocks[:2] == FIRST_COMMANDS, f"the README's first code blocks: {blocks[:2]}"
    for command in FIRST_COMMANDS:
        script = ROOT / command
        assert script.is_file(), f"{command}: no such file"
        assert os.access(script, os.X_OK), f"{command} is not executable"
        mode = git_mode(script)
        assert mode in (None, "100755"), f"{command} is committed as {mode}, not executable"


def test_code_blocks_are_read_in_order() -> None:
    text = "# T\n\n```\nops/demo.sh\n```\n\n`x`\n\n~~~sh\nops/test.sh -q\n~~~\n"
    assert code_blocks(text) == ["ops/demo.sh", "ops/test.sh -q"]


def first_line_after_title(text: str) -> str:
    """A page's first non-empty line after its ``# title``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# ")) + 1
    return next((line for line in lines[start:] if line.strip()), "")


def is_prose(line: str) -> bool:
    """Not a code block, a table, a list, a heading or a quote: a sentence."""
    return not re.match(r"\s*(```|~~~|\||[-*+]\s|\d+[.)]\s|#|>)", line)


@pytest.mark.parametrize(
    "page", sorted((ROOT / "docs").glob("*.md")), ids=lambda p: str(p.relative_to(ROOT))
)
def test_every_docs_page_opens_with_what_it_answers(page: Path) -> None:
    line = first_line_after_title(page.read_text())
    assert is_prose(line), f"{page.name} opens with {line!r}, not a sentence"


def test_the_opening_check_tells_prose_from_the_rest() -> None:
    assert is_prose("This page answers: how to run the tests.")
    for line in ("```", "| a | b |", "- item", "* item", "1. step", "## Heading", "> quote"):
        assert not is_prose(line), line
    assert first_line_after_title("# T\n\n\nFirst.\nSecond.\n") == "First."
