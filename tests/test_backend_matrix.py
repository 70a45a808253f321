"""The README's backend matrix (between ``<!-- backend-matrix -->`` markers) is well-formed and true to the suite:
every cell has one of the five kinds, every test it names exists (pytest's own collection), every GPU cell names a
section of ``benchmarks/RESULTS.md``."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["CPU", "DDP (gloo)", "DeepSpeed ZeRO-1", "DeepSpeed ZeRO-2", "DeepSpeed ZeRO-3", "FSDP2",
           "`torch.compile`d model", "`bf16-mixed`"]  # fmt: skip
KINDS = ("CI", "GPU", "refused", "n/a", "untested")
_NODE = re.compile(r"`(tests/[\w/]+\.py::[^`]+)`")


def _matrix() -> tuple[list[str], list[list[str]]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"<!-- backend-matrix -->\n(.*?)<!-- /backend-matrix -->", text, re.S)
    assert match, "README.md has no <!-- backend-matrix --> table"
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in match.group(1).strip().splitlines()]
    header, rule, *body = rows
    assert all(set(c) <= {"-"} for c in rule)
    return header, body


def _kind(cell: str) -> str:
    return next((k for k in KINDS if cell == k or cell.startswith((k + " ", k + ":"))), "")


def _problem(cell: str, sections: set[str]) -> str | None:
    """What is wrong with one cell, or ``None``."""
    kind = _kind(cell)
    if not kind:
        return f"starts with none of {KINDS}"
    if kind == "CI":
        return None if _NODE.match(cell[3:]) else "a CI cell names its test, in backquotes, right after `CI`"
    if kind == "GPU":
        name = re.fullmatch(r'GPU "(.+)"', cell)
        return None if name and name.group(1) in sections else 'a GPU cell names a RESULTS.md section: GPU "..."'
    return None if re.match(rf"{re.escape(kind)}: \S", cell) else f"`{kind}: <reason>`"


def _sections() -> set[str]:
    return set(re.findall(r"^#{2,3} (.+)$", (ROOT / "benchmarks/RESULTS.md").read_text(encoding="utf-8"), re.M))


def test_every_cell_has_one_kind_and_says_what_it_needs():
    header, body = _matrix()
    assert header[1:] == COLUMNS
    assert len(body) >= 10
    sections = _sections()
    problems = [
        f"{row[0]} / {column}: {cell!r}: {problem}"
        for row in body
        for column, cell in zip(COLUMNS, row[1:], strict=True)
        if (problem := _problem(cell, sections))
    ]
    assert all(len(row) == len(header) for row in body)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "cell",
    ["tested in CI", "CI tests/x.py::test_y", 'GPU "No such section"', "GPU somewhere", "refused", "untested:"],
)
def test_the_format_check_finds_a_bad_cell(cell):
    assert _problem(cell, _sections()) is not None
    assert _problem('GPU "ImageNet recipes (not run)"', _sections()) is None  # and passes a good one


def test_every_named_test_exists():
    _, body = _matrix()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Backends: what runs where") :]
    section = section[: section.index("\n## ", 3)]
    named = sorted(
        {node for node in _NODE.findall(section)} | {n for row in body for c in row for n in _NODE.findall(c)}
    )
    files = sorted({node.split("::")[0] for node in named})
    for f in files:
        assert (ROOT / f).is_file(), f"{f} does not exist"
    # pytest's own collection of just those files: parametrized ids included, nothing imported into this process.
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    ).stdout  # fmt: skip
    collected = {line.strip() for line in out.splitlines() if "::" in line}
    missing = [node for node in named if node not in collected]
    assert not missing, f"the README's backend matrix names tests that do not exist: {missing}"
