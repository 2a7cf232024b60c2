"""The fenced code blocks of README.md and docs/*.md, each with the marker comment above it, and the shell commands
of a block (continuation lines joined, comments dropped). ``tests/test_doc_commands.py`` runs the blocks marked
``<!-- run -->`` and checks that every other shell or Python block says why it is not run.

Markers, on the line right above the opening fence:

- ``<!-- run -->``: a test runs every command of the block (small overrides appended, on files it makes);
- ``<!-- not-run: REASON -->``: not runnable in the tests, and why (a GPU, a cluster, a dataset, a download);
- ``<!-- train-command -->`` / ``<!-- test-command -->``: the README's two commands (``.ci/run`` runs the second).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHELL = {"bash", "sh", "shell", "console"}
MARKER = re.compile(r"^<!--\s*(run|not-run|train-command|test-command)\s*(?::\s*(.*?))?\s*-->\s*$")
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")


@dataclass(frozen=True)
class Block:
    """A fenced block: ``path`` relative to the repository, ``line`` of its opening fence (1-based), its
    ``language``, ``text``, and the ``marker`` (``run``, ``not-run``, ...) and ``reason`` above it (or None)."""

    path: str
    line: int
    language: str
    text: str
    marker: str | None
    reason: str | None

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def documents() -> list[Path]:
    """README.md and every docs/*.md."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of ``path`` (an indented fence in a list item included)."""
    lines = path.read_text().splitlines()
    found, index = [], 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        indent, language = opening.groups()
        end = index + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        text = "\n".join(line[len(indent) :] if line.startswith(indent) else line for line in lines[index + 1 : end])
        above = MARKER.match(lines[index - 1].strip()) if index > 0 else None
        found.append(
            Block(
                path=str(path.relative_to(ROOT)),
                line=index + 1,
                language=language.lower(),
                text=text,
                marker=above.group(1) if above else None,
                reason=(above.group(2) or None) if above else None,
            )
        )
        index = end + 1
    return found


def checked(block: Block) -> bool:
    """Whether the block is code the rule covers: a shell or Python block."""
    return block.language in SHELL or block.language == "python"


def commands(block: Block) -> list[str]:
    """The shell commands of ``block``: backslash continuations joined, blank and comment lines dropped, a
    trailing ``# comment`` removed (outside quotes)."""
    joined, current = [], ""
    for line in block.text.splitlines():
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        joined.append(current + line)
        current = ""
    result = []
    for line in joined:
        line = _without_comment(line).strip()
        if line:
            result.append(line)
    return result


def _without_comment(line: str) -> str:
    quote = None
    for position, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (position == 0 or line[position - 1].isspace()):
            return line[:position]
    return line
