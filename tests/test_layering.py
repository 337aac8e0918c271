"""The dependence rules of ARCHITECTURE.md ("Layout and dependence"), read from the code: every module under
engine/, quant/ and tokenizer/ is parsed (ast) and each import, relative ones resolved, is checked against them.

- quant and tokenizer import nothing from engine, nor from each other;
- sources (engine/sources/) import no backend;
- no backend (a folder, or before issue 15 a module, under engine/backends/) imports another, and the protocols in
  engine/backends/__init__.py import none, so that loading one backend never loads the other;
- the model code (engine/ outside server/ and cli/) imports neither server nor cli, except the one import inside a
  function that ARCHITECTURE.md names: LLM.create_chat_completion shapes its answers with engine/server/responses.py.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
ROOMS = ("engine", "quant", "tokenizer")
BACKENDS = "mixlocal.engine.backends"

# (importing module, imported module): imports inside a function body that ARCHITECTURE.md documents
LAZY_ALLOWED = {("mixlocal.engine.llm", "mixlocal.engine.server.responses")}


def _module_name(path: Path) -> tuple[str, bool]:
    """Dotted name of a source file under the mixlocal namespace, and whether it is a package's __init__."""
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    is_pkg = parts[-1] == "__init__"
    return "mixlocal." + ".".join(parts[:-1] if is_pkg else parts), is_pkg


def _known_modules() -> set[str]:
    return {_module_name(p)[0] for room in ROOMS for p in (REPO_ROOT / room).rglob("*.py")}


def _imports(path: Path, known: set[str]) -> list[tuple[str, bool, int]]:
    """(imported module, inside a function, line) for every import in the file. `from X import y` counts as an
    import of X, and of X.y when that is a module of ours."""
    name, is_pkg = _module_name(path)
    package = name if is_pkg else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            lazy = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, in_function, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[:len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module
                found.append((target, in_function, child.lineno))
                found.extend((f"{target}.{a.name}", in_function, child.lineno) for a in child.names
                             if f"{target}.{a.name}" in known)
            visit(child, lazy)

    visit(tree, False)
    return found


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _backend_of(module: str) -> str | None:
    """The backend a module belongs to: the first name under engine.backends (numba, mlx, ...); None outside."""
    if not module.startswith(BACKENDS + "."):
        return None
    return module[len(BACKENDS) + 1:].split(".")[0]


def _rule_breaks(module: str, target: str, lazy: bool) -> list[str]:
    out = []
    room = module.split(".")[1]
    if room in ("quant", "tokenizer"):
        for other in ("engine", "quant", "tokenizer"):
            if other != room and _within(target, f"mixlocal.{other}"):
                out.append(f"{room} imports {other}")
        if target == "mixlocal":  # `from mixlocal import engine` is caught as mixlocal.engine; the front door itself
            out.append(f"{room} imports the mixlocal front door, which loads engine")
    if room != "engine":
        return out
    if _within(module, "mixlocal.engine.sources") and _backend_of(target) is not None:
        out.append("a source imports a backend")
    mine, theirs = _backend_of(module), _backend_of(target)
    if theirs is not None and mine is not None and mine != theirs:
        out.append(f"backend {mine} imports backend {theirs}")
    if module == BACKENDS and theirs is not None:
        out.append(f"the backend protocols import backend {theirs}")
    model_code = not (_within(module, "mixlocal.engine.server") or _within(module, "mixlocal.engine.cli"))
    on_top = _within(target, "mixlocal.engine.server") or _within(target, "mixlocal.engine.cli")
    if model_code and on_top and not (lazy and (module, target) in LAZY_ALLOWED):
        out.append("model code imports server/cli")
    return out


def _violations() -> list[str]:
    known = _known_modules()
    out = []
    for room in ROOMS:
        for path in sorted((REPO_ROOT / room).rglob("*.py")):
            module = _module_name(path)[0]
            for target, lazy, line in _imports(path, known):
                for why in _rule_breaks(module, target, lazy):
                    out.append(f"{path.relative_to(REPO_ROOT)}:{line}: {why} ({target})")
    return out


def test_the_import_graph_follows_the_dependence_rules():
    assert _violations() == []


def test_the_checker_sees_the_imports_it_checks():
    """The parse finds the imports that are there (a checker that sees none passes everything)."""
    known = _known_modules()
    loader = {t for t, _, _ in _imports(REPO_ROOT / "engine" / "loader.py", known)}
    assert "mixlocal.tokenizer" in loader and "mixlocal.engine.errors" in loader
    llm = {(t, lazy) for t, lazy, _ in _imports(REPO_ROOT / "engine" / "llm.py", known)}
    assert ("mixlocal.engine.server.responses", True) in llm  # the documented lazy import, seen as lazy


@pytest.mark.parametrize("module, target, lazy, broken", [
    ("mixlocal.quant.formats", "mixlocal.engine.config", False, True),
    ("mixlocal.tokenizer.chat", "mixlocal.quant", False, True),
    ("mixlocal.quant.kernels.generic", "mixlocal.quant.formats", False, False),
    ("mixlocal.engine.sources.mlx", "mixlocal.engine.backends.mlx.backend", True, True),
    ("mixlocal.engine.sources.mlx", "mixlocal.engine.backends", False, False),
    ("mixlocal.engine.backends.mlx.backend", "mixlocal.engine.backends.numba.backend", False, True),
    ("mixlocal.engine.backends.mlx", "mixlocal.engine.backends.numba_cpu", False, True),
    ("mixlocal.engine.backends.numba.backend", "mixlocal.engine.backends.numba.ops", False, False),
    ("mixlocal.engine.backends.numba.backend", "mixlocal.engine.backends", False, False),
    ("mixlocal.engine.backends", "mixlocal.engine.backends.numba", True, True),
    ("mixlocal.engine.llm", "mixlocal.engine.server.responses", True, False),
    ("mixlocal.engine.llm", "mixlocal.engine.server.responses", False, True),
    ("mixlocal.engine.loader", "mixlocal.engine.cli.common", True, True),
    ("mixlocal.engine.cli.main", "mixlocal.engine.loader", False, False),
])
def test_each_rule_catches_what_it_names(module, target, lazy, broken):
    assert bool(_rule_breaks(module, target, lazy)) == broken
