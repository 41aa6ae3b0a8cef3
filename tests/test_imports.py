"""The dependency arrow, checked: train/ and eval/ import the library, never the reverse,
eval/ does not import train/, and the library's own modules import each other without a
cycle (DESIGN "Layout").

The graph is read statically with `ast` from every ``.py`` file, imports inside functions
included (many are lazy, to keep ``autoperi --help`` fast), so no test process imports
anything heavy. The command line finds the train/ and eval/ plugins by name
(`autoperi_jax.cli.PLUGINS`, a string, not an import statement), the one sanctioned way
for the library to reach them.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("autoperi_jax", "train", "eval")
#: package -> packages it must not import
FORBIDDEN = {"autoperi_jax": {"train", "eval"}, "eval": {"train"}}


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its file.

    ``from package import name`` counts as an import of ``package.name`` when that is a
    module of the tree, else of ``package``; relative imports are resolved. The implicit
    import of a module's parent packages is not an edge (else every package that imports
    its own submodules would be a cycle).
    """
    files = {p: _module_name(p, root) for pkg in PACKAGES for p in (root / pkg).rglob("*.py")}
    modules = set(files.values())
    graph: dict[str, set[str]] = {}
    for path, name in files.items():
        base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                parent = node.module or ""
                if node.level:
                    up = base[: len(base) - node.level + 1]
                    parent = ".".join([*up, *([node.module] if node.module else [])])
                targets = [
                    f"{parent}.{a.name}" if f"{parent}.{a.name}" in modules else parent
                    for a in node.names
                ]
            else:
                continue
            edges.update(t for t in targets if t.split(".")[0] in PACKAGES and t != name)
        graph[name] = edges
    return graph


def wrong_arrows(graph: dict[str, set[str]]) -> list[str]:
    """``"importer -> imported"`` for every import that `FORBIDDEN` rules out."""
    return sorted(
        f"{m} -> {t}"
        for m, targets in graph.items()
        for t in targets
        if t.split(".")[0] in FORBIDDEN.get(m.split(".")[0], ())
    )


def cycles(graph: dict[str, set[str]], package: str = "autoperi_jax") -> list[list[str]]:
    """The import cycles among ``package``'s modules: one path per strongly connected
    component of more than one module (Tarjan), e.g. ``[a, b, a]``."""
    nodes = sorted(m for m in graph if m.split(".")[0] == package)
    succ = {
        m: sorted(t for t in graph[m] if t in graph and t.split(".")[0] == package) for m in nodes
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in succ[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append([*sorted(component), min(component)])

    for v in nodes:
        if v not in index:
            visit(v)
    return found


def test_library_imports_neither_train_nor_eval_and_eval_not_train():
    assert wrong_arrows(import_graph(ROOT)) == []


def test_no_import_cycle_inside_the_library():
    assert cycles(import_graph(ROOT)) == []


def test_the_graph_sees_the_known_edges():
    """A truth the checks rest on: real edges of each kind are found (top-level, lazy,
    relative, ``from package import module``)."""
    g = import_graph(ROOT)
    assert "autoperi_jax.lattice" in g["autoperi_jax.graph"]  # top of the file
    assert "autoperi_jax.distributed" in g["autoperi_jax.cli"]  # inside a function
    assert "autoperi_jax.physics.smact_tables" in g["autoperi_jax.physics.composition"]
    assert "eval.bench" in g["train.bench"]  # train may import eval


def test_the_checks_catch_a_wrong_arrow_and_a_cycle(tmp_path):
    """A small tree with each kind of bad import, lazy and relative ones included."""
    files = {
        "autoperi_jax/__init__.py": "",
        "autoperi_jax/a.py": "from . import b\n",
        "autoperi_jax/b.py": "def f():\n    from autoperi_jax.a import x\n",  # a <-> b
        "autoperi_jax/c.py": "def g():\n    import train.cli\n",
        "autoperi_jax/sub/__init__.py": "from .d import y\n",
        "autoperi_jax/sub/d.py": "from ..a import z\n",  # no cycle: parents are no edge
        "eval/__init__.py": "",
        "eval/m.py": "from train import trainer\n",
        "train/__init__.py": "",
        "train/cli.py": "import autoperi_jax.a\nimport eval.m\n",  # both allowed
        "train/trainer.py": "",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    g = import_graph(tmp_path)
    assert wrong_arrows(g) == ["autoperi_jax.c -> train.cli", "eval.m -> train.trainer"]
    assert cycles(g) == [["autoperi_jax.a", "autoperi_jax.b", "autoperi_jax.a"]]
