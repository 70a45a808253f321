"""Every ``Example::`` of the package's docstrings runs as a doctest, or says why it is not run.

A block written with ``>>>`` prompts runs here with :mod:`doctest`, in its module's namespace. Any other block must
carry a line ``# not run: <reason>`` (a GPU, a DDP process group, a dataset on disk, minutes of training, a
template with names to fill in). A docstring example that stops working, or a new one that neither runs nor says
why, fails this test. The blocks are found by ``docs/example_blocks.py``, the parser the documentation site uses.
"""

from __future__ import annotations

import ast
import doctest
import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lightning_gd"

_spec = importlib.util.spec_from_file_location("_example_blocks", ROOT / "docs" / "example_blocks.py")
_blocks = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _blocks  # its dataclass looks its module up there
_spec.loader.exec_module(_blocks)


@dataclass(frozen=True)
class Example:
    """One block: its module, where it is (``lightning_gd/x.py:LINE``), its code."""

    module: str
    where: str
    lineno: int
    block: object  # example_blocks.ExampleBlock


def _docstrings(tree: ast.Module):
    """(first line, text) of every docstring in a module: the module's, its classes' and functions' (nested too)."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                if isinstance(first.value.value, str):
                    yield first.lineno, first.value.value


def _examples() -> list[Example]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(ROOT)
        module = ".".join(relative.with_suffix("").parts).removesuffix(".__init__")
        for lineno, text in _docstrings(ast.parse(path.read_text(encoding="utf-8"))):
            for block in _blocks.example_blocks(text.splitlines()):
                line = lineno + block.start
                found.append(Example(module, f"{relative}:{line}", line, block))
    return found


EXAMPLES = _examples()


def test_examples_are_found():
    # The parser finds the blocks (a broken parser would make every other test here vacuous).
    assert len(EXAMPLES) >= 80, len(EXAMPLES)
    assert sum(e.block.is_doctest for e in EXAMPLES) >= 60


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.where for e in EXAMPLES])
def test_docstring_example(example: Example):
    block = example.block
    reason = block.not_run_reason
    if reason is not None:
        # Not run: the reason is on the page for the reader; a prompt would suggest the block runs.
        assert not any(line.startswith(">>>") for line in block.code), (
            f"{example.where}: a '# not run:' example is plain code, without '>>>' prompts"
        )
        return
    assert block.is_doctest, (
        f"{example.where}: write the example as a '>>>' doctest (it then runs in the tests), or add a line"
        " '# not run: <reason>' inside the block"
    )
    globs = dict(vars(importlib.import_module(example.module)))
    test = doctest.DocTestParser().get_doctest(
        "\n".join(block.code), globs, example.where, str(ROOT / example.where.split(":")[0]), example.lineno
    )
    report: list[str] = []
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    result = runner.run(test, out=report.append)
    assert result.failed == 0, "".join(report)
