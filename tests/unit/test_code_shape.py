"""The core stays readable: no function in vlgrpo/ over 80 lines or with more than 7 parameters (the
project's rule is ~80 / ~6; self and cls do not count)."""
import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "vlgrpo"


def _functions():
    for path in sorted(CORE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                params = [*a.posonlyargs, *a.args, *a.kwonlyargs]
                n = len(params) + bool(a.vararg) + bool(a.kwarg) - bool(params and params[0].arg in ("self", "cls"))
                yield f"{path.relative_to(CORE.parent)}:{node.lineno} {node.name}", node.end_lineno - node.lineno + 1, n


def test_no_long_function_and_no_long_parameter_list_in_the_core():
    found = list(_functions())
    assert len(found) > 100, "the scan found too few functions to mean anything"
    too_long = [(f, n) for f, n, _ in found if n > 80]
    too_many = [(f, p) for f, _, p in found if p > 7]
    assert not too_long, f"functions over 80 lines: {too_long}"
    assert not too_many, f"functions with more than 7 parameters: {too_many}"
