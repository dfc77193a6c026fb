"""The layers' import rules, read from the source with `ast`, so imports inside functions count too.

The runtime runs on robots without torch, so it never reaches the exporter or the trainer; the
exporter reads stored steps and datasets, never the training loop. Importing a module runs the
packages above it, so those are followed as well, except the root package: `ciss/__init__.py` only
re-exports `ciss.Run` (ciss.api, the trainer and exporter as Python, importing them when its methods
are called) and CissError, and every module would otherwise reach everything through it.
"""

from __future__ import annotations

import ast
from collections import deque
from functools import cache
from pathlib import Path


CISS = Path(__file__).resolve().parents[1] / "ciss"

# Edges the rules allow, each with its reason; test_allowed_edges_exist keeps the list honest. None
# today: the torch reference the runtime once built is handed to it by the command line instead.
ALLOWED: dict[tuple[str, str], str] = {}


def module_files() -> dict[str, Path]:
    files = {}
    for path in CISS.rglob("*.py"):
        parts = path.relative_to(CISS.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


@cache
def imports() -> dict[str, frozenset[str]]:
    """ciss module -> the ciss modules it names in an import statement, wherever it stands."""
    files = module_files()
    found = {}
    for name, path in files.items():
        named = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                named.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                assert not node.level, f"{path}:{node.lineno}: a relative import, which this graph does not read"
                named.add(node.module)
                named.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in files)
        found[name] = frozenset(m for m in named if m.startswith("ciss.") and m in files)
    return found


def _packages(module: str) -> list[str]:
    """`module` and the packages above it that importing it runs, short of the root package."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(2, len(parts) + 1)]


@cache
def graph() -> dict[str, frozenset[str]]:
    """ciss module -> the ciss modules importing it runs (less the allowed edges)."""
    return {name: frozenset(p for m in named if (name, m) not in ALLOWED for p in _packages(m) if p != name)
            for name, named in imports().items()}


def chains(start: str) -> dict[str, list[str]]:
    """Every module `start` reaches, with one import chain that gets there."""
    found = {start: [start]}
    queue = deque([start])
    while queue:
        module = queue.popleft()
        for target in sorted(graph()[module]):
            if target not in found:
                found[target] = found[module] + [target]
                queue.append(target)
    return found


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def violations(layer: str, forbidden: tuple[str, ...]) -> list[str]:
    """One import chain per import that crosses from `layer` (or what it reaches) into `forbidden`."""
    crossings: dict[tuple[str, str], list[str]] = {}
    for module in sorted(graph()):
        if _within(module, layer):
            for chain in chains(module).values():
                cut = next((i for i, m in enumerate(chain) if any(_within(m, f) for f in forbidden)), None)
                if cut is None:
                    continue
                crossing = (chain[cut - 1], chain[cut])
                if crossing not in crossings or cut + 1 < len(crossings[crossing]):
                    crossings[crossing] = chain[:cut + 1]
    return sorted(" -> ".join(chain) for chain in crossings.values())


def test_the_graph_sees_lazy_imports_and_packages():
    assert "ciss.runtime.ros" in graph()["ciss.runtime.sources"]  # imported inside open_source()
    assert "ciss.runtime" in graph()["ciss.runtime.model"]        # the package above ciss.runtime.backends
    assert {"ciss.runtime.segmenter", "ciss.runtime.model"} <= set(chains("ciss.runtime.pipeline"))


def test_the_runtime_reaches_neither_the_exporter_nor_the_trainer():
    found = violations("ciss.runtime", ("ciss.export", "ciss.trainer"))
    assert not found, "the runtime imports the exporter or the trainer:\n" + "\n".join(found)


def test_the_exporter_does_not_reach_the_training_loop():
    loop = ("ciss.trainer.step", "ciss.trainer.optim")
    assert set(loop) <= set(graph()), "the training loop moved: name its modules here"
    found = violations("ciss.export", loop)
    assert not found, "the exporter imports the training loop:\n" + "\n".join(found)


def test_allowed_edges_exist():
    for importer, imported in ALLOWED:
        assert imported in imports()[importer], f"{importer} no longer imports {imported}: drop it from ALLOWED"
