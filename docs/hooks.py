"""Build-time pieces of the documentation site (``mkdocs.yml`` loads this file twice).

* As MkDocs hooks (``hooks:``): the figures of ``benchmarks/figures/`` join the site as ``figures/*.png`` (one copy,
  where the benchmarks write them), ``benchmarks/RESULTS.md`` is the Results page, and the API reference pages
  ``api/*.md`` are written from the package's ``__all__`` lists, so a new public name gets its entry without
  editing a page.
* As a griffe extension (``RstToMarkdown``, listed under mkdocstrings' ``extensions``): the docstrings are written
  for both Sphinx-style readers and this site; the extension turns their reST pieces into Markdown before
  mkdocstrings parses them: an ``Example::`` block becomes a highlighted code block (``pycon`` for ``>>>``
  doctests), and a role (``:class:`~lightning_gd.curvature.HessianOperator```) becomes a link to the documented
  object, or inline code when the target is not on the site (torch, Lightning, a private helper).

Both parts read :func:`public_api`: every name listed in the ``__all__`` of a public module of ``lightning_gd``
(no ``_`` in its dotted path), documented once, in the module that defines it.
"""

from __future__ import annotations

import ast
import functools
import importlib
import pkgutil
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import griffe

sys.path.insert(0, str(Path(__file__).resolve().parent))
from example_blocks import example_blocks  # noqa: E402 - docs/example_blocks.py, shared with tests/test_docstring_examples.py

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ROOT / "benchmarks" / "figures"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def _mathjax_dir() -> Path:
    import mathjax  # the `django-static-mathjax` wheel of the docs extra: MathJax 3.2's files, no Django needed

    return Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"


_MATHJAX = _mathjax_dir()

# The API pages, in navigation order: the subpackage (second component of the dotted path) -> the page's title.
API_PAGES = {
    "lightning_gd": "lightning_gd",
    "callbacks": "Callbacks",
    "strategies": "Strategies",
    "plugins": "Plugins",
    "curvature": "Curvature engine",
    "compression": "Compression engine",
    "dynamics": "Dynamics",
    "adversarial": "Adversarial",
    "optim": "Optimizers and schedules",
    "recipes": "Models, data, recipes",
    "analysis": "lightning-gd analyze",
    "cli": "The lightning-gd command",
    "utils": "Utilities",
}


@dataclass(frozen=True)
class ApiModule:
    """One module's entry in the reference: its dotted path and the public names documented under it."""

    path: str
    names: tuple[str, ...]


def _is_public(dotted: str) -> bool:
    return not any(part.startswith("_") for part in dotted.split("."))


def _definitions(module: Any) -> tuple[set[str], dict[str, tuple[str, str]]]:
    """A module's top-level definitions (def, class, assignment) and its ``from X import a as b`` imports (b -> X, a),
    read from its source."""
    file = getattr(module, "__file__", None)
    if not file:
        return set(), {}
    tree = ast.parse(Path(file).read_text(encoding="utf-8"))
    names: set[str] = set()
    imports: dict[str, tuple[str, str]] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.ImportFrom):
            package = module.__name__ if hasattr(module, "__path__") else module.__name__.rpartition(".")[0]
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            source = f"{base}.{node.module}" if node.level and node.module else (node.module or base)
            for alias in node.names:
                imports[alias.asname or alias.name] = (source, alias.name)
    return names, imports


@functools.cache
def public_api() -> dict[str, tuple[ApiModule, ...]]:
    """Every public name of the package, grouped by API page, each at the module that defines it.

    A name listed in a public module's ``__all__`` is documented in the module that defines it when that module is
    public and lists it too; otherwise (defined in a private module, e.g. ``lightning_gd.cli.LightningGDCLI``) in
    the public module that exports it. Raises ``RuntimeError`` when a name of a package's ``__all__`` would be
    documented nowhere, so the strict build fails instead of leaving it out.
    """
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    root = importlib.import_module("lightning_gd")
    modules = {"lightning_gd": root}
    for info in pkgutil.walk_packages(root.__path__, "lightning_gd."):
        modules[info.name] = importlib.import_module(info.name)
    parsed = {name: _definitions(module) for name, module in modules.items()}
    exports = {
        name: [n for n in getattr(module, "__all__", ()) if not n.startswith("__")]
        for name, module in modules.items()
        if _is_public(name)
    }

    def home(module_name: str, name: str) -> str:
        # Follow ``from X import name`` and the lazy packages' tables (PEP 562) towards the definition; the name is
        # documented at the last public module on the way that lists it in ``__all__``.
        chain = []
        for _ in range(10):
            chain.append((module_name, name))
            names, imports = parsed.get(module_name, (set(), {}))
            module = modules.get(module_name)
            lazy = getattr(module, "_EXPORTS", None) or {}  # {"TopK": ".topk"}
            obj = getattr(module, name, None)
            if name in names:
                break
            if name in imports:
                module_name, name = imports[name]
            elif isinstance(lazy, dict) and name in lazy:
                module_name = f"{module_name}{lazy[name]}" if lazy[name].startswith(".") else lazy[name]
            elif getattr(obj, "__module__", None) in modules and getattr(obj, "__qualname__", None) == name:
                module_name = obj.__module__
            else:
                raise RuntimeError(f"cannot tell where {chain[0][0]}.{chain[0][1]} is defined")
        for where, alias in reversed(chain):
            if _is_public(where) and alias in exports.get(where, ()):
                if alias != chain[0][1]:
                    raise RuntimeError(f"{chain[0][0]}.{chain[0][1]} is {where}.{alias} renamed: document it once")
                return where
        raise AssertionError("unreachable: the first module of the chain exports the name")

    documented: dict[str, list[str]] = {}
    for module_name, names in exports.items():
        for name in names:
            if home(module_name, name) == module_name:
                documented.setdefault(module_name, []).append(name)
    for module_name, names in exports.items():
        for name in names:
            where = home(module_name, name)
            if name not in documented.get(where, ()):
                raise RuntimeError(f"{module_name}.{name} is public but would be documented nowhere")

    pages: dict[str, list[ApiModule]] = {page: [] for page in API_PAGES}
    for module_name in sorted(documented, key=lambda m: (m.count("."), m)):
        parts = module_name.split(".")
        page = parts[1] if len(parts) > 1 else "lightning_gd"
        if page not in pages:
            raise RuntimeError(f"{module_name}: add its subpackage {page!r} to API_PAGES in {__file__}")
        pages[page].append(ApiModule(module_name, tuple(documented[module_name])))
    return {page: tuple(entries) for page, entries in pages.items() if entries}


@functools.cache
def documented_paths() -> dict[str, str]:
    """Public dotted path -> the path it is documented at, for every name and its re-exports.

    ``lightning_gd.curvature.HessianOperator`` and ``lightning_gd.curvature.operator.HessianOperator`` both map to
    the latter; the cross-references of the docstrings resolve through this table.
    """
    table: dict[str, str] = {}
    for entries in public_api().values():
        for entry in entries:
            table[entry.path] = entry.path
            for name in entry.names:
                table[f"{entry.path}.{name}"] = f"{entry.path}.{name}"
    modules = {m: sys.modules[m] for m in list(sys.modules) if m == "lightning_gd" or m.startswith("lightning_gd.")}
    by_object: dict[int, str] = {}
    for path in list(table):
        module_name, _, name = path.rpartition(".")
        if module_name in modules and name:
            by_object.setdefault(id(getattr(modules[module_name], name, None)), path)
    by_object.pop(id(None), None)
    for module_name, module in modules.items():
        for name in getattr(module, "__all__", ()):
            target = by_object.get(id(getattr(module, name, None)))
            if target is not None:
                table.setdefault(f"{module_name}.{name}", target)
        if module_name not in table and _is_public(module_name):
            table[module_name] = module_name  # a module documented only through its members: link to the page
    return table


def api_page_markdown(page: str) -> str:
    """The Markdown of one API page: the subpackage's docstring, then each module with its public names."""
    entries = public_api()[page]
    package = "lightning_gd" if page == "lightning_gd" else f"lightning_gd.{page}"
    lines = [f"# {API_PAGES[page]}", ""]
    if all(entry.path != package for entry in entries):
        lines += [f"::: {package}", "    options:", "      members: false", "      show_root_heading: false", ""]
    for entry in entries:
        lines += [
            f"::: {entry.path}",
            "    options:",
            "      show_root_heading: true",
            "      show_root_full_path: true",
            f"      members: [{', '.join(entry.names)}]",
            "",
        ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# MkDocs hooks


def on_files(files: Any, config: Any) -> Any:
    """Add the benchmark figures and the generated API pages to the site's files."""
    from mkdocs.structure.files import File

    for png in sorted(FIGURES.glob("*.png")):
        files.append(File.generated(config, f"figures/{png.name}", abs_src_path=str(png)))
    for page in public_api():
        files.append(File.generated(config, f"api/{page}.md", content=api_page_markdown(page)))
    # The Results page is benchmarks/RESULTS.md itself (one copy): its figure links, figures/x.png, resolve the same
    # way from the site's root.
    files.append(File.generated(config, "results.md", abs_src_path=str(RESULTS)))
    for path in _mathjax_files():
        relative = path.relative_to(_MATHJAX).as_posix()
        files.append(File.generated(config, f"javascripts/mathjax/{relative}", abs_src_path=str(path)))
    return files


_FIGURE_LINK = re.compile(r"\]\((?:\.\./)+benchmarks/figures/(?P<name>[^)\s]+)\)")
_API_REF = re.compile(r"\]\[(?P<path>lightning_gd(?:\.\w+)+)\]")


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Point the pages' links at what the site serves, so that the same Markdown also reads right on GitHub.

    * ``![..](../../benchmarks/figures/x.png)`` (the file in the repository) -> the site's ``figures/x.png``;
    * ``[`SharpnessTracker`][lightning_gd.callbacks.SharpnessTracker]`` (the import path users write) -> the path
      the reference documents it at (``lightning_gd.callbacks.sharpness_tracker.SharpnessTracker``). A path that is
      not public stays as written, and the strict build fails on it.
    """
    del config, files
    up = "../" * page.file.src_uri.count("/")
    markdown = _FIGURE_LINK.sub(lambda m: f"]({up}figures/{m['name']})", markdown)
    table = documented_paths()
    return _API_REF.sub(lambda m: f"][{_resolve(m['path'], table) or m['path']}]", markdown)


def _mathjax_files() -> list[Path]:
    """MathJax 3's TeX-to-HTML bundle, the TeX extensions it loads on demand and its fonts (1.9 MB, of 23 MB)."""
    return [
        _MATHJAX / "tex-chtml.js",
        *sorted((_MATHJAX / "input" / "tex" / "extensions").rglob("*.js")),
        *sorted((_MATHJAX / "output" / "chtml" / "fonts" / "woff-v2").glob("*.woff")),
    ]


# ---------------------------------------------------------------------------------------------------------------
# griffe extension

_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|obj|exc):`(?P<target>[^`]+)`")


def _example_blocks_to_fences(text: str) -> str:
    """``Example::`` + its indented block -> a bold title and a fenced code block (``pycon`` for doctests)."""
    lines = text.splitlines()
    out: list[str] = []
    done = 0
    for block in example_blocks(lines):
        pad = " " * block.indent
        out += lines[done : block.start]
        out += [f"{pad}**{block.title}**", "", f"{pad}```{'pycon' if block.is_doctest else 'python'}"]
        out += [f"{pad}{c}" if c else "" for c in block.code]
        out += [f"{pad}```", ""]
        done = block.end
    return "\n".join(out + lines[done:])


class RstToMarkdown(griffe.Extension):
    """A griffe extension: the docstrings' reST examples and roles in Markdown (see the module docstring)."""

    def on_package(self, *, pkg: Any, **kwargs: Any) -> None:
        if pkg.path != "lightning_gd":
            return
        table = documented_paths()
        for obj in _walk(pkg):
            if obj.docstring is not None:
                obj.docstring.value = self.convert(obj.docstring.value, obj, table)

    @staticmethod
    def convert(text: str, obj: Any, table: dict[str, str]) -> str:
        text = _example_blocks_to_fences(text)
        return _ROLE.sub(lambda m: _link(m["target"], obj, table), text)


def _walk(obj: Any) -> Any:
    yield obj
    for member in obj.members.values():
        if member.is_alias:
            continue
        yield from _walk(member)


def _link(target: str, obj: Any, table: dict[str, str]) -> str:
    short = target.startswith("~")
    target = target.lstrip("~.").removesuffix("()")
    shown = target.rsplit(".", 1)[-1] if short else target
    # Where a short name may live: the object's class, its module, its package, then the package's public names.
    scopes = []
    scope = obj
    while scope is not None:
        scopes.append(scope.path)
        scope = scope.parent
    candidates = [target] + [f"{s}.{target}" for s in scopes]
    for candidate in candidates:
        resolved = _resolve(candidate, table)
        if resolved:
            return f"[`{shown}`][{resolved}]"
    head, _, rest = target.partition(".")
    matches = {v for k, v in table.items() if k.rsplit(".", 1)[-1] == head}
    if len(matches) == 1:
        resolved = _resolve(".".join(filter(None, [matches.pop(), rest])), table)
        if resolved:
            return f"[`{shown}`][{resolved}]"
    return f"`{shown}`"


def _resolve(path: str, table: dict[str, str]) -> str | None:
    """The documented path of ``path`` (a public name, or a public member of one), or None."""
    if path in table:
        return table[path]
    owner, _, member = path.rpartition(".")
    if owner in table and member and not member.startswith("_"):
        documented_owner = table[owner]
        module_name, _, name = documented_owner.rpartition(".")
        module = sys.modules.get(module_name)
        owner_obj = getattr(module, name, None) if module else None
        # Rendered only if the class itself defines it with a docstring (mkdocstrings' default filters).
        attribute = vars(owner_obj).get(member) if isinstance(owner_obj, type) else None
        routine = isinstance(attribute, (property, classmethod, staticmethod)) or callable(attribute)
        if routine and getattr(attribute, "__doc__", None):
            return f"{documented_owner}.{member}"
    return None
