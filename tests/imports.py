"""The first-party import graph of the project, read from the source with ``ast`` (nothing is imported).

Used by tests/unit/test_stage_deps.py (which files a dvc.yaml stage's command runs) and
tests/unit/test_layers.py (import cycles and the package layers). Everything takes the project root as an
argument, so the same functions run on the real tree and on small fake trees built by the tests.

Rules:

* modules are the ``.py`` files under the first-party packages (``vlgrpo``, ``tasks``, ``flows``); a
  package is named by its folder (``vlgrpo/data/__init__.py`` is ``vlgrpo.data``);
* every ``import`` statement counts, wherever it is: module level, inside functions, under
  ``if TYPE_CHECKING:``; so does ``importlib.import_module("a.b")`` with a literal name;
* ``import a.b.c`` imports the longest existing prefix of ``a.b.c``; ``from a.b import c`` imports the
  module ``a.b.c`` when it exists, else ``a.b``; relative imports are resolved against the importer;
* importing a submodule is not an import of its package's ``__init__`` in the graph (``closure`` can add
  the packages, which Python does execute, on request).
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import shlex
import tomllib
from pathlib import Path
from typing import Iterable, Iterator, Mapping

PACKAGES = ("vlgrpo", "tasks", "flows")


@dataclasses.dataclass(frozen=True)
class Import:
    """One import statement's target: a first-party module name, or an external top-level name."""
    importer: str
    target: str
    line: int
    first_party: bool


@dataclasses.dataclass(repr=False)
class Graph:
    """Modules (name -> file) and first-party edges (importer -> {imported: first line of the import})."""
    root: Path
    modules: dict[str, Path]
    edges: dict[str, dict[str, int]]
    imports: list[Import]

    def __repr__(self) -> str:
        return f"Graph({self.root}: {len(self.modules)} modules, {sum(map(len, self.edges.values()))} imports)"

    def file(self, module: str) -> str:
        """The module's file, relative to the project root, with forward slashes."""
        return self.modules[module].relative_to(self.root).as_posix()


def find_modules(root: Path, packages: Iterable[str] = PACKAGES) -> dict[str, Path]:
    """Module name -> file for every ``.py`` file under the packages (folders with an ``__init__.py``)."""
    modules: dict[str, Path] = {}
    for pkg in packages:
        base = root / pkg
        if not (base / "__init__.py").is_file():
            continue
        for path in sorted(base.rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if not all((root.joinpath(*parts[:i]) / "__init__.py").is_file() for i in range(1, len(parts))):
                continue                       # a loose folder of scripts, not part of the package
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def _is_package(module: str, modules: Mapping[str, Path]) -> bool:
    return modules[module].name == "__init__.py"


def resolve(name: str, modules: Mapping[str, Path]) -> str | None:
    """The longest prefix of the dotted ``name`` that is a known module (None: none is)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        candidate = ".".join(parts[:i])
        if candidate in modules:
            return candidate
    return None


def _relative_base(importer: str, level: int, modules: Mapping[str, Path]) -> str:
    package = importer if _is_package(importer, modules) else importer.rpartition(".")[0]
    parts = package.split(".")
    if level - 1 >= len(parts):
        raise ValueError(f"{importer}: relative import beyond the top-level package")
    return ".".join(parts[:len(parts) - (level - 1)])


def _targets(node: ast.AST, importer: str, modules: Mapping[str, Path],
             packages: tuple[str, ...]) -> Iterator[tuple[str, bool]]:
    """(target, first_party) for one ast node that imports something; nothing for other nodes."""
    names: list[str] = []
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            prefix = _relative_base(importer, node.level, modules)
            base = f"{prefix}.{base}" if base else prefix
        subs = [f"{base}.{a.name}" for a in node.names if a.name != "*"]
        found = [s for s in subs if s in modules]
        yield from ((s, True) for s in found)
        if len(found) < len(node.names):       # names that are not modules: attributes of the package
            names = [base]
    elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
          and isinstance(node.args[0].value, str)
          and (getattr(node.func, "attr", None) == "import_module"
               or getattr(node.func, "id", None) in ("import_module", "__import__"))):
        names = [node.args[0].value]
    for name in names:
        top = name.split(".")[0]
        if top in packages:
            target = resolve(name, modules)
            if target is not None:
                yield target, True
        elif name:
            yield top, False


def module_imports(module: str, modules: Mapping[str, Path], packages: Iterable[str] = PACKAGES,
                   tree: ast.AST | None = None) -> list[Import]:
    """Every import in the module's file (or in ``tree``, a part of it), first-party and external."""
    if tree is None:
        tree = ast.parse(modules[module].read_text(encoding="utf-8"), filename=str(modules[module]))
    out = []
    for node in ast.walk(tree):
        for target, first_party in _targets(node, module, modules, tuple(packages)):
            out.append(Import(module, target, getattr(node, "lineno", 0), first_party))
    return out


def import_graph(root: Path, packages: Iterable[str] = PACKAGES) -> Graph:
    """The import graph of the packages under ``root``; self-imports (``from . import x`` in x) are dropped."""
    packages = tuple(packages)
    modules = find_modules(root, packages)
    edges: dict[str, dict[str, int]] = {m: {} for m in modules}
    imports: list[Import] = []
    for module in modules:
        for imp in module_imports(module, modules, packages):
            imports.append(imp)
            if imp.first_party and imp.target != module:
                edges[module].setdefault(imp.target, imp.line)
    return Graph(root, modules, edges, imports)


def parents(module: str, modules: Mapping[str, Path]) -> list[str]:
    """The packages above a module that exist (Python runs their ``__init__`` before the module)."""
    parts = module.split(".")
    return [p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in modules]


def closure(graph: Graph, starts: Iterable[str], with_parents: bool = True) -> set[str]:
    """Every module reachable from ``starts`` (included); ``with_parents``: their packages' ``__init__`` too."""
    seen: set[str] = set()
    todo = list(starts)
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(graph.edges.get(m, {}))
        if with_parents:
            todo.extend(parents(m, graph.modules))
    return seen


# ------------------------------------------------------------------------------------------------- cycles


def strongly_connected(edges: Mapping[str, Mapping[str, int]]) -> list[list[str]]:
    """The strongly connected components with a cycle (two or more modules, or one importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:                 # Tarjan's algorithm; the graphs here are a few hundred nodes
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges.get(v, {}):
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(found)


def shortest_cycle(edges: Mapping[str, Mapping[str, int]], start: str) -> list[str]:
    """A shortest path start -> ... -> start (breadth first), or [] when start is on no cycle."""
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges.get(v, {})):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [*reversed(path), start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return []


def cycles(edges: Mapping[str, Mapping[str, int]]) -> list[list[str]]:
    """One shortest cycle per strongly connected component, as a path that ends where it starts."""
    return [shortest_cycle(edges, comp[0]) for comp in strongly_connected(edges)]


def format_cycle(graph: Graph, cycle: list[str], component: list[str] | None = None) -> str:
    """The cycle as a path of module names, then each import on it with its file and line; ``component``:
    also the other modules of its strongly connected component (each is on some cycle with these)."""
    steps = [f"{a} -> {b} ({graph.file(a)}:{graph.edges[a][b]})" for a, b in zip(cycle, cycle[1:])]
    text = " -> ".join(cycle) + "\n      " + "\n      ".join(steps)
    others = sorted(set(component or ()) - set(cycle))
    return text + (f"\n      same tangle: {', '.join(others)}" if others else "")


# ------------------------------------------------------------------------------------------------- layers


def layer_of(module: str, layers: list[list[str]]) -> tuple[int, str] | None:
    """(layer index, entry) of the longest entry that names the module; None when no entry does.

    An entry names a module and everything below it (``vlgrpo.data`` covers ``vlgrpo.data.hf``); an entry
    ending in ``.__init__`` names only that package's own ``__init__`` (``vlgrpo.__init__``: ``vlgrpo``).
    """
    best: tuple[int, int, str] | None = None
    for i, entries in enumerate(layers):
        for entry in entries:
            if entry.endswith(".__init__"):
                hit = module == entry[:-len(".__init__")]
            else:
                hit = module == entry or module.startswith(entry + ".")
            if hit and (best is None or len(entry) > best[1]):
                best = (i, len(entry), entry)
    return None if best is None else (best[0], best[2])


def layer_violations(graph: Graph, layers: list[list[str]], names: list[str] | None = None) -> list[str]:
    """Imports the layers forbid, and modules no layer places, one readable line each.

    A module may import the modules of its own entry (one package: free) and those of earlier layers; an
    import of a later layer, or of another entry of the same layer (siblings), is a violation.
    """
    def label(where: tuple[int, str]) -> str:
        return f"{names[where[0]] if names else f'layer {where[0]}'} [{where[1]}]"

    out = [f"{m} ({graph.file(m)}) is in no layer: add it to the LAYERS table"
           for m in sorted(graph.modules) if layer_of(m, layers) is None]
    for importer in sorted(graph.edges):
        src = layer_of(importer, layers)
        for target, line in sorted(graph.edges[importer].items()):
            dst = layer_of(target, layers)
            if src is None or dst is None or dst[1] == src[1] or dst[0] < src[0]:
                continue
            why = "a later layer" if dst[0] > src[0] else "a sibling in the same layer"
            out.append(f"{importer} -> {target} ({graph.file(importer)}:{line}): {label(src)} imports "
                       f"{label(dst)}, {why}")
    return out


def forbidden_imports(graph: Graph, prefix: str, banned: Iterable[str]) -> list[str]:
    """Imports of the ``banned`` external packages anywhere in the modules under ``prefix``."""
    banned = set(banned)
    return [f"{i.importer} ({graph.file(i.importer)}:{i.line}) imports {i.target}" for i in graph.imports
            if not i.first_party and i.target in banned
            and (i.importer == prefix or i.importer.startswith(prefix + "."))]


# ------------------------------------------------------------------------------------ stage commands


def console_scripts(root: Path) -> dict[str, str]:
    """``[project.scripts]`` of pyproject.toml: command name -> ``module:function``."""
    path = root / "pyproject.toml"
    if not path.is_file():
        return {}
    return dict(tomllib.loads(path.read_text(encoding="utf-8")).get("project", {}).get("scripts", {}))


def _module_level(tree: ast.Module) -> ast.Module:
    """The statements that run when the module is imported (function bodies left out)."""
    class Strip(ast.NodeTransformer):
        def visit_FunctionDef(self, node: ast.AST) -> None:
            return None

        visit_AsyncFunctionDef = visit_FunctionDef

    return Strip().visit(copy.deepcopy(tree))


def _branch_bodies(tree: ast.Module, word: str) -> list[ast.AST]:
    """Bodies of ``if <name> == "<word>":`` (either side) anywhere in the module."""
    found = []
    for node in ast.walk(tree):
        t = getattr(node, "test", None)
        if (isinstance(node, ast.If) and isinstance(t, ast.Compare) and len(t.ops) == 1
                and isinstance(t.ops[0], ast.Eq)):
            sides = [t.left, *t.comparators]
            if any(isinstance(s, ast.Constant) and s.value == word for s in sides):
                found.append(ast.Module(body=node.body, type_ignores=[]))
    return found


def _called_functions(bodies: list[ast.AST], tree: ast.Module) -> list[ast.AST]:
    """The module's own functions that the bodies call, and the ones those call, transitively."""
    defs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    out: list[ast.AST] = []
    todo = list(bodies)
    seen: set[str] = set()
    while todo:
        for node in ast.walk(todo.pop()):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in defs:
                if node.func.id not in seen:
                    seen.add(node.func.id)
                    out.append(defs[node.func.id])
                    todo.append(defs[node.func.id])
    return out


def dispatched_modules(graph: Graph, module: str, argv: list[str]) -> set[str]:
    """What a console-script dispatcher imports to run ``argv``: its module level, plus the branch
    ``if <var> == "<word>":`` of the first argument word that has one (and the module's own functions that
    branch calls). Its other branches do not run, so their imports do not count."""
    tree = ast.parse(graph.modules[module].read_text(encoding="utf-8"))
    for word in (a for a in argv if not a.startswith("-")):
        bodies = _branch_bodies(tree, word)
        if bodies:
            parts = [_module_level(tree), *bodies, *_called_functions(bodies, tree)]
            return {i.target for p in parts for i in module_imports(module, graph.modules, tree=p)
                    if i.first_party} - {module}
    raise LookupError(f"{graph.file(module)} has no `if ... == \"<word>\":` branch for any of {argv}")


def _module_for_file(graph: Graph, token: str) -> str | None:
    path = (graph.root / token).resolve()
    return next((m for m, p in graph.modules.items() if p.resolve() == path), None)


def command_modules(graph: Graph, cmd: str | list[str]) -> set[str]:
    """The first-party modules a dvc.yaml ``cmd`` runs, with everything they import (and their packages).

    Understood: ``python -m pkg.mod`` (also behind launchers such as ``accelerate launch``), ``python
    path/file.py``, and the project's console scripts (pyproject ``[project.scripts]``), whose dispatcher
    counts only the branch for the subcommand. Shell lists (``&&``, ``;``, ``|``) are split; a list ``cmd``
    is several commands. A command that runs no first-party code gives an empty set.
    """
    scripts = console_scripts(graph.root)
    starts: set[str] = set()
    dispatchers: set[str] = set()
    for command in [cmd] if isinstance(cmd, str) else cmd:
        lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words: list[str] = []
        for tok in [*lexer, ";"]:
            if tok and set(tok) <= set("&|;()"):
                starts |= _argv_modules(graph, scripts, words, dispatchers)
                words = []
            else:
                words.append(tok)
    # a dispatcher runs, but only its module level and one branch: its own edges are not followed
    starts |= {p for d in dispatchers for p in parents(d, graph.modules)}
    return closure(graph, starts, with_parents=True) | dispatchers


def _argv_modules(graph: Graph, scripts: Mapping[str, str], argv: list[str], dispatchers: set[str]) -> set[str]:
    while argv and "=" in argv[0] and argv[0].partition("=")[0].isidentifier():   # VAR=value command
        argv = argv[1:]
    if not argv:
        return set()
    if "-m" in argv[:-1]:
        name = argv[argv.index("-m") + 1]
        if name in graph.modules:
            main = f"{name}.__main__"
            return {name, main} if main in graph.modules else {name}
    for tok in argv:
        if tok.endswith(".py") and (m := _module_for_file(graph, tok)):
            return {m}
    if argv[0] in scripts:
        module = scripts[argv[0]].partition(":")[0]
        if module not in graph.modules:
            raise LookupError(f"console script {argv[0]!r} names {module}, which is not a first-party module")
        dispatchers.add(module)
        return dispatched_modules(graph, module, argv[1:])
    return set()


def covered(file: str, deps: Iterable[str]) -> bool:
    """Whether a dependency path is the file or a folder above it."""
    for dep in deps:
        d = dep.strip().removeprefix("./").rstrip("/")
        if file == d or file.startswith(d + "/"):
            return True
    return False


def dep_paths(stage: Mapping) -> list[str]:
    """A dvc.yaml stage's ``deps`` as paths (entries may be plain strings or one-key mappings)."""
    out = []
    for d in stage.get("deps", []) or []:
        out.extend(d if isinstance(d, Mapping) else [d])
    return [str(d) for d in out]


def missing_stage_deps(graph: Graph, stage: Mapping) -> list[str]:
    """The files a stage's command runs that none of its deps covers, sorted."""
    files = {graph.file(m) for m in command_modules(graph, stage.get("cmd", ""))}
    deps = dep_paths(stage)
    return sorted(f for f in files if not covered(f, deps))


def suggested_deps(graph: Graph, files: Iterable[str]) -> list[str]:
    """``files`` as dvc.yaml dep paths, sorted: a package folder stands for its files when all of them
    (a ``__main__.py`` aside) are listed."""
    files = set(files)
    by_folder: dict[str, set[str]] = {}
    for path in graph.modules.values():
        if path.name == "__main__.py":         # a script run by hand (python -m), not imported
            continue
        rel = path.relative_to(graph.root).as_posix()
        parts = rel.split("/")
        for i in range(1, len(parts)):
            by_folder.setdefault("/".join(parts[:i]), set()).add(rel)
    out: set[str] = set()
    for f in files:
        folders = [d for d in sorted(by_folder, key=len) if f.startswith(d + "/") and by_folder[d] <= files]
        out.add(folders[0] if folders else f)
    return sorted(out)
