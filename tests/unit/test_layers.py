"""The import structure of vlgrpo/, tasks/ and flows/: no cycles, imports only downwards, a pure core.

The graph is read from the source (tests/imports.py): every import counts, inside functions and under
TYPE_CHECKING too; ``from a.b import c`` is an import of the module a.b.c when it exists (else of a.b); a
submodule's import does not count as one of its package's ``__init__``.

* no cycle: each one is printed as a path of module names, with the file and line of every import on it;
* layers: a module may import its own LAYERS entry (one package: free, but acyclic) and earlier layers
  only; an import of a later layer, or of a sibling entry in the same layer, is printed as importer ->
  imported with both layers; a module that no entry places fails too, so a new package must be placed;
* the core (vlgrpo/) never imports prefect, mlflow or dvc, anywhere in a file.

To change the layout, edit LAYERS: one (name, entries) pair per layer, lowest first. An entry names a
module and everything below it; ``pkg.__init__`` names only the package's own ``__init__``.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests import imports

LAYERS: list[tuple[str, list[str]]] = [
    ("L0 foundation", ["vlgrpo.io", "vlgrpo.offline", "vlgrpo.__init__"]),
    ("L1 config", ["vlgrpo.config"]),
    ("L2 data", ["vlgrpo.data"]),
    ("L3 model", ["vlgrpo.model"]),
    ("L4 algorithms and rewards", ["vlgrpo.algo", "vlgrpo.rewards"]),
    ("L5 evaluation", ["vlgrpo.eval"]),
    ("L6 training", ["vlgrpo.train"]),
    ("L7 tasks", ["tasks"]),
    ("L8 flows", ["flows"]),
]
CORE_BANS = ("prefect", "mlflow", "dvc")
REPO = Path(__file__).resolve().parents[2]


def cycle_report(graph: imports.Graph) -> list[str]:
    return [imports.format_cycle(graph, imports.shortest_cycle(graph.edges, comp[0]), comp)
            for comp in imports.strongly_connected(graph.edges)]


def layer_report(graph: imports.Graph, layers=LAYERS) -> list[str]:
    return imports.layer_violations(graph, [e for _, e in layers], [n for n, _ in layers])


@pytest.fixture(scope="module")
def graph() -> imports.Graph:
    g = imports.import_graph(REPO)
    assert len(g.modules) > 30 and sum(map(len, g.edges.values())) > 50, "the scan found too little code"
    return g


def test_no_import_cycles(graph):
    found = cycle_report(graph)
    assert not found, f"{len(found)} import cycle(s):\n  " + "\n  ".join(found)


def test_imports_follow_the_layers(graph):
    found = layer_report(graph)
    assert not found, f"{len(found)} import(s) against the LAYERS table of {__file__}:\n  " + "\n  ".join(found)


def test_the_core_never_imports_prefect_mlflow_or_dvc(graph):
    found = imports.forbidden_imports(graph, "vlgrpo", CORE_BANS)
    assert not found, "the core (vlgrpo/) must not use the orchestration tools:\n  " + "\n  ".join(found)


# ------------------------------------------------------ the checker itself, on trees built for the purpose

FAKE_LAYERS = [("base", ["pkg.io", "pkg.__init__"]), ("mid", ["pkg.left", "pkg.right"]), ("top", ["app"])]


def _tree(root: Path, files: dict[str, str]) -> imports.Graph:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    return imports.import_graph(root, packages=("pkg", "app"))


CLEAN = {
    "pkg/__init__.py": "",
    "pkg/io.py": "import json\n",
    "pkg/left/__init__.py": "",
    "pkg/left/a.py": "from pkg.left import b\nfrom pkg import io\n",
    "pkg/left/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.io import X\n",
    "pkg/right.py": "import pkg.io\n",
    "app/__init__.py": "",
    "app/main.py": "def run():\n    from pkg.left.a import go\n    import pkg.right\n",
}


def test_the_graph_reads_every_kind_of_import(tmp_path):
    g = _tree(tmp_path, CLEAN)
    assert g.edges["pkg.left.a"] == {"pkg.left.b": 1, "pkg.io": 2}      # `from pkg import io`: the module
    assert g.edges["pkg.left.b"] == {"pkg.io": 3}                        # under TYPE_CHECKING
    assert g.edges["app.main"] == {"pkg.left.a": 2, "pkg.right": 3}      # in a function; no package __init__
    assert cycle_report(g) == [] and layer_report(g, FAKE_LAYERS) == []


def test_a_planted_cycle_fails_and_prints_its_path(tmp_path):
    g = _tree(tmp_path, {**CLEAN, "pkg/left/b.py": "def f():\n    from . import a\n"})
    found = cycle_report(g)
    assert len(found) == 1, found
    assert found[0].splitlines()[0] == "pkg.left.a -> pkg.left.b -> pkg.left.a"
    assert "pkg/left/b.py:2" in found[0]


def test_upward_sibling_and_unplaced_imports_fail(tmp_path):
    g = _tree(tmp_path, {**CLEAN, "pkg/io.py": "import pkg.right\n", "pkg/right.py": "from pkg.left import a\n",
                         "pkg/extra.py": ""})
    found = layer_report(g, FAKE_LAYERS)
    assert found == [
        "pkg.extra (pkg/extra.py) is in no layer: add it to the LAYERS table",
        "pkg.io -> pkg.right (pkg/io.py:1): base [pkg.io] imports mid [pkg.right], a later layer",
        "pkg.right -> pkg.left.a (pkg/right.py:1): mid [pkg.right] imports mid [pkg.left], a sibling in the "
        "same layer",
    ]


def test_a_banned_import_anywhere_in_the_core_fails(tmp_path):
    g = _tree(tmp_path, {**CLEAN, "pkg/right.py": "def log():\n    import mlflow.tracking\n",
                         "app/main.py": "import mlflow\n"})
    assert imports.forbidden_imports(g, "pkg", CORE_BANS) == ["pkg.right (pkg/right.py:2) imports mlflow"]


def test_planted_faults_in_a_copy_of_the_real_tree_are_found(tmp_path, graph):
    for pkg in imports.PACKAGES:
        shutil.copytree(REPO / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    with open(tmp_path / "vlgrpo" / "io.py", "a", encoding="utf-8") as f:      # io (L0) -> config (L1)
        f.write("\n\ndef _planted():\n    from vlgrpo import config\n")
    with open(tmp_path / "vlgrpo" / "config.py", "a", encoding="utf-8") as f:  # and back: a cycle
        f.write("\nimport vlgrpo.io\n")
    copy = imports.import_graph(tmp_path)
    new_cycles = [c for c in cycle_report(copy) if "vlgrpo.io" in c.splitlines()[0]]
    assert new_cycles and "vlgrpo.config" in new_cycles[0].splitlines()[0], cycle_report(copy)
    new_layer = set(layer_report(copy)) - set(layer_report(graph))
    assert [v for v in new_layer if v.startswith("vlgrpo.io -> vlgrpo.config ")], new_layer
