"""The ``Example::`` blocks of docstrings: one parser for the site and the tests.

``docs/hooks.py`` turns each block into a highlighted code block on the site; ``tests/test_docstring_examples.py``
runs each one written as a ``>>>`` doctest and requires every other one to say why it is not run, with a line

    # not run: <the reason, e.g. needs a GPU>

inside the block (shown on the site as a comment of the example). Standard library only: the tests import it
without the docs extra.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

EXAMPLE = re.compile(r"^(?P<indent>[ ]*)(?P<title>Examples?)::[ ]*$")
NOT_RUN = re.compile(r"^#\s*not run:\s*(?P<reason>\S.*)$")


@dataclass(frozen=True)
class ExampleBlock:
    """One ``Example::`` block: the title line's index and indentation, the lines after it up to the block's end
    (index ``end``, exclusive), and its code with the common indentation removed."""

    start: int
    end: int
    indent: int
    title: str
    code: tuple[str, ...]

    @property
    def is_doctest(self) -> bool:
        return bool(self.code) and self.code[0].startswith(">>>")

    @property
    def not_run_reason(self) -> str | None:
        for line in self.code:
            match = NOT_RUN.match(line.strip())
            if match:
                return match["reason"]
        return None


def example_blocks(lines: list[str]) -> list[ExampleBlock]:
    """Every ``Example::`` block in a docstring's lines (the block: the lines indented deeper than its title)."""
    blocks = []
    i = 0
    while i < len(lines):
        match = EXAMPLE.match(lines[i])
        if not match:
            i += 1
            continue
        indent = len(match["indent"])
        j = i + 1
        while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > indent):
            j += 1
        body = lines[i + 1 : j]
        while body and not body[-1].strip():
            body.pop()
            j -= 1
        while body and not body[0].strip():
            body.pop(0)
        width = min((len(b) - len(b.lstrip()) for b in body if b.strip()), default=0)
        blocks.append(ExampleBlock(i, j, indent, match["title"], tuple(b[width:].rstrip() for b in body)))
        i = j
    return blocks
