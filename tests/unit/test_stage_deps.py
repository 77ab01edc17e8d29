"""Every file of first-party code a dvc.yaml stage runs is one of its `deps` (or under a folder that is).

What a stage runs is read from the source, not listed by hand: its `cmd` gives the first modules (the
`vlgrpo <stage>` console script's branch for that stage, `python -m ...`, a `.py` path), and the import
closure over vlgrpo/, tasks/ and flows/ gives the rest: imports inside functions and under TYPE_CHECKING
count, and so do the packages' `__init__` files, which Python runs first (tests/imports.py). A file missing
from the deps would let `dvc repro` skip a stage whose code changed.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests import imports

REPO = Path(__file__).resolve().parents[2]
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def stage_problem(graph: imports.Graph, name: str, stage: dict) -> str | None:
    """None when the stage's deps cover its code; else what is missing and the dvc.yaml lines to add."""
    missing = imports.missing_stage_deps(graph, stage)
    if not missing:
        return None
    add = imports.suggested_deps(graph, missing)
    return (f"dvc.yaml stage {name!r} (cmd: {stage['cmd']}) runs files none of its deps covers:\n  "
            + "\n  ".join(missing)
            + f"\nadd under stages: {name}: deps: (keep the list sorted)\n"
            + "\n".join(f"      - {d}" for d in add))


@pytest.fixture(scope="module")
def graph() -> imports.Graph:
    return imports.import_graph(REPO)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_cover_the_code_it_runs(graph, name):
    stage = STAGES[name]
    ran = imports.command_modules(graph, stage["cmd"])
    assert ran, f"stage {name!r}: cmd {stage['cmd']!r} runs no first-party module that could be found"
    problem = stage_problem(graph, name, stage)
    assert problem is None, problem


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")


FAKE = {
    "pyproject.toml": '[project.scripts]\ntool = "flows.cli:main"\n',
    "vlgrpo/__init__.py": "",
    "vlgrpo/core.py": "def f():\n    from vlgrpo import helper\n",
    "vlgrpo/helper.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from vlgrpo.types import T\n",
    "vlgrpo/types.py": "T = int\n",
    "vlgrpo/other.py": "",
    "vlgrpo/sub/__init__.py": "",
    "vlgrpo/sub/a.py": "from . import b\n",
    "vlgrpo/sub/b.py": "",
    "tasks/__init__.py": "",
    "tasks/run.py": "import vlgrpo.core\n",
    "flows/__init__.py": "",
    "flows/one.py": "from tasks.run import x\n",
    "flows/two.py": "import vlgrpo.other\nimport vlgrpo.sub.a\n",
    "flows/cli.py": ("import sys\n\ndef main():\n    cmd = sys.argv[1]\n"
                     "    if cmd == 'one':\n        from flows.one import go\n"
                     "    if cmd == 'two':\n        return two()\n\n"
                     "def two():\n    import flows.two\n"),
}


def test_the_closure_follows_function_level_type_checking_and_relative_imports(tmp_path):
    _write(tmp_path, FAKE)
    g = imports.import_graph(tmp_path)
    one = {g.file(m) for m in imports.command_modules(g, "tool one")}
    assert one == {"flows/__init__.py", "flows/cli.py", "flows/one.py", "tasks/__init__.py", "tasks/run.py",
                   "vlgrpo/__init__.py", "vlgrpo/core.py", "vlgrpo/helper.py", "vlgrpo/types.py"}
    two = {g.file(m) for m in imports.command_modules(g, "tool --verbose two")}
    assert two == {"flows/__init__.py", "flows/cli.py", "flows/two.py", "vlgrpo/__init__.py",
                   "vlgrpo/other.py", "vlgrpo/sub/__init__.py", "vlgrpo/sub/a.py", "vlgrpo/sub/b.py"}
    as_module = {g.file(m) for m in imports.command_modules(g, "FOO=1 python -m tasks.run && true")}
    assert as_module == {"tasks/__init__.py", "tasks/run.py", "vlgrpo/__init__.py", "vlgrpo/core.py",
                         "vlgrpo/helper.py", "vlgrpo/types.py"}


def test_a_stage_missing_a_dep_fails_and_names_the_lines_to_add(tmp_path):
    _write(tmp_path, FAKE)
    g = imports.import_graph(tmp_path)
    stage = {"cmd": "tool two", "deps": ["flows", "vlgrpo/__init__.py", "vlgrpo/other.py"]}
    problem = stage_problem(g, "two", stage)
    assert problem is not None
    assert "vlgrpo/sub/a.py" in problem and "'two'" in problem
    assert problem.splitlines()[-1] == "      - vlgrpo/sub"          # the whole package folder is needed
    stage["deps"].append("vlgrpo/sub")
    assert stage_problem(g, "two", stage) is None
