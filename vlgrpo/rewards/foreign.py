"""Reward files written for other frameworks: ms-swift ORM plugins and TRL reward functions.

- **ms-swift** (``from swift.rewards import ORM, AsyncORM, orms`` in 4.x, ``from swift.plugin import ...`` in
  3.x): while a plugin file is imported, and only then, those modules are provided by a small stand-in
  when ms-swift is not installed (it cannot be installed beside vlgrpo: it pins older trl / peft /
  transformers). Every class the file puts into ``orms`` becomes a reward of that name; it is instantiated
  once per set-up and called as ms-swift calls it, ``orm(completions, **columns)``. With ms-swift installed
  its own classes and ``orms`` are used instead.
- **TRL**: every public function of a plugin file that takes ``completions`` (or ``**kwargs``) is a reward
  under its function name, sync or ``async``, called by keyword like TRL's GRPOTrainer calls it.

This module imports nothing else of the package.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import sys
import types
from typing import Any, Callable, Iterator


class ORM:
    """Stand-in for ms-swift's ``ORM`` base class: subclasses implement ``__call__(self, completions, **kwargs)``
    returning one float per completion."""

    def __init__(self, args: Any = None, **kwargs: Any):
        self.args = args

    def __call__(self, completions: list, **kwargs: Any) -> list:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(self, completions, **kwargs)")


class AsyncORM(ORM):
    """Stand-in for ms-swift's ``AsyncORM``: ``async def __call__(self, completions, **kwargs)``."""

    async def __call__(self, completions: list, **kwargs: Any) -> list:   # type: ignore[override]
        raise NotImplementedError(f"{type(self).__name__} must implement async __call__(self, completions, ...)")


SWIFT_MODULES = ("swift.rewards", "swift.plugin")


def _swift_installed() -> bool:
    mod = sys.modules.get("swift")
    if mod is not None:
        return not getattr(mod, "__vlgrpo_stand_in__", False)
    try:
        return importlib.util.find_spec("swift") is not None
    except (ImportError, ValueError):
        return False


@contextlib.contextmanager
def swift_imports() -> Iterator[list[dict]]:
    """While a plugin file is imported: ``swift.rewards`` / ``swift.plugin`` importable. Yields the ``orms``
    registries to read afterwards (ms-swift's own when installed, else a fresh stand-in one)."""
    if _swift_installed():
        found = []
        for name in SWIFT_MODULES:
            with contextlib.suppress(ImportError):
                found.append(importlib.import_module(name).orms)
        yield found
        return
    orms: dict[str, type] = {}
    top = types.ModuleType("swift")
    top.__path__ = []                     # a package, so that "swift.rewards" resolves
    top.__vlgrpo_stand_in__ = True
    stand_ins = {"swift": top}
    for name in SWIFT_MODULES:
        mod = types.ModuleType(name)
        mod.ORM, mod.AsyncORM, mod.orms = ORM, AsyncORM, orms
        stand_ins[name] = mod
        setattr(top, name.split(".")[1], mod)
    saved = {k: sys.modules.get(k) for k in stand_ins}
    sys.modules.update(stand_ins)
    try:
        yield [orms]
    finally:
        for k, old in saved.items():
            if old is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = old


def is_orm(obj: Any) -> bool:
    """Is ``obj`` an ms-swift ORM instance (stand-in or installed ms-swift's)?"""
    if isinstance(obj, ORM):
        return True
    for name in SWIFT_MODULES:
        mod = sys.modules.get(name)
        base = getattr(mod, "ORM", None) if mod is not None else None
        if isinstance(base, type) and isinstance(obj, base):
            return True
    return False


def orm_instance(name: str, cls: type, settings: Any) -> Any:
    """``cls`` instantiated as ms-swift does: each ``__init__`` parameter it can fill by name (``args``: the
    run's settings; others from their attributes), the rest left to their defaults."""
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return cls()
    kwargs: dict[str, Any] = {}
    for p in list(params.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.name == "args":
            kwargs["args"] = settings
        elif hasattr(settings, p.name):
            kwargs[p.name] = getattr(settings, p.name)
        elif p.default is p.empty:
            raise TypeError(f"ms-swift reward {name!r}: {cls.__qualname__}.__init__ needs {p.name!r}, which "
                            f"vlgrpo cannot provide (give it a default)")
    return cls(**kwargs)


def trl_functions(module: types.ModuleType) -> dict[str, Callable]:
    """The TRL-style reward functions a plugin module defines: public, defined in it (not imported), taking
    ``completions`` or ``**kwargs``."""
    out = {}
    for name, obj in vars(module).items():
        if name.startswith("_") or not inspect.isfunction(obj) or obj.__module__ != module.__name__:
            continue
        params = inspect.signature(obj).parameters.values()
        if any(p.name == "completions" or p.kind is p.VAR_KEYWORD for p in params):
            out[name] = obj
    return out
