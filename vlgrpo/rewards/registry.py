"""The reward registry: reward name -> factory ``factory(ctx: RewardContext) -> reward fn``.

A reward function is ``fn(prompts, completions, **columns) -> list[float | None]``. A factory builds one
from a :class:`RewardContext` (the ``rewards`` config section, the project root, the manifest's folder, the
pixel budget, ...), so a reward that needs configuration - a word window, a box convention, a model folder -
reads it there instead of every caller passing it. Two decorators fill the registry:

- :func:`register_factory` registers a factory (every built-in is one);
- :func:`register` registers a plain reward function, for rewards that need no configuration (the usual
  plugin); it is wrapped in a factory that returns the function itself.

Plugin files are imported by :func:`load_plugins`. This module imports only :mod:`.foreign` of the package.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import re
import sys
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from vlgrpo.config import RewardsConfig
from vlgrpo.rewards import foreign

if TYPE_CHECKING:
    from vlgrpo.config import Config

RewardFn = Callable[..., list]
DEFAULT_PIXELS = (3136, 12544)        # DataConfig's min_pixels / max_pixels


class RewardError(RuntimeError):
    """A reward failed or returned a bad value; the message names the reward and the item id."""


class PluginError(ImportError):
    """A reward plugin file could not be imported; the message names the file."""


@dataclasses.dataclass(frozen=True)
class RewardContext:
    """What a reward factory may build its reward from.

    ``rewards``: the ``rewards`` config section; ``root``: the project root (``clip_model``, ``models`` and
    plugin files are relative to it); ``manifest_dir``: the folder the ``images`` column is relative to (the
    manifest's; default ``root``); ``pixels``: (data.min_pixels, data.max_pixels), the budget the policy's
    images are fitted into; ``max_completion_length``: the answer length limit (``soft_overlong``'s default
    maximum); ``device``: where learned reward models run; ``columns``: the manifest's extra columns
    (``Item.extra`` keys), which rewards may take as parameters besides the standard ones.
    """
    rewards: RewardsConfig = dataclasses.field(default_factory=RewardsConfig)
    root: Path = Path(".")
    manifest_dir: Path | None = None
    pixels: tuple[int, int] = DEFAULT_PIXELS
    max_completion_length: int | None = None
    device: str = "cpu"
    columns: tuple[str, ...] = ()

    @property
    def image_dir(self) -> Path:
        """The folder the ``images`` column is relative to."""
        return Path(self.manifest_dir) if self.manifest_dir is not None else Path(self.root)

    @classmethod
    def from_config(cls, cfg: "Config", root: str | Path, manifest_dir: str | Path, *,
                    max_completion_length: int | None = None, device: str = "cpu",
                    columns: Iterable[str] = ()) -> "RewardContext":
        """The context of a run of ``cfg``: its rewards section and pixel budget; ``max_completion_length``
        defaults to ``train.max_completion_length``; ``columns``: the manifest's extra columns
        (:func:`extra_columns`)."""
        if max_completion_length is None:
            max_completion_length = cfg.train.max_completion_length
        return cls(cfg.rewards, Path(root), Path(manifest_dir), (cfg.data.min_pixels, cfg.data.max_pixels),
                   max_completion_length, device, tuple(columns))


def extra_columns(items: Iterable[Any]) -> tuple[str, ...]:
    """The extra columns (``Item.extra`` keys) of manifest items, in first-seen order."""
    return tuple(dict.fromkeys(k for it in items for k in it.extra))


RewardFactory = Callable[[RewardContext], RewardFn]
REWARDS: dict[str, RewardFactory] = {}
SHADOWED: dict[str, str] = {}      # plugin function names left unregistered (a built-in's name) -> their file
PLUGIN_PREFIX = "vlgrpo_plugin_"
_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


def _origin(obj: Any) -> tuple[str, str]:
    return getattr(obj, "__module__", "?"), getattr(obj, "__qualname__", repr(obj))


def _add(name: str, factory: RewardFactory) -> None:
    old = REWARDS.get(name)
    # A plugin may replace a reward an earlier plugin file registered (another project's run in the same
    # process, e.g. a test run or a long-lived worker); it may never shadow a built-in.
    from_plugins = old is not None and all(_origin(f)[0].startswith(PLUGIN_PREFIX) for f in (old, factory))
    if old is not None and _origin(old) != _origin(factory) and not from_plugins:
        raise ValueError(f"reward {name!r} is already registered by {_origin(old)[0]}.{_origin(old)[1]}")
    REWARDS[name] = factory


def _check_name(name: str) -> None:
    if not name or not _NAME.fullmatch(name):
        raise ValueError(f"reward name {name!r}: use letters, digits, '_', '-' or '.'")


def register_factory(name: str) -> Callable[[RewardFactory], RewardFactory]:
    """Decorator: make ``factory(ctx) -> reward fn`` the builder of reward ``name``.

    The reward it returns should carry ``name`` as its ``__name__``. Registering the same factory again
    (same module and qualified name, e.g. a plugin loaded twice) replaces it; a *different* one under a
    taken name is an error, so two plugins cannot silently shadow each other or a built-in.
    """
    _check_name(name)

    def deco(factory: RewardFactory) -> RewardFactory:
        _add(name, factory)
        return factory

    return deco


def register(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make the plain reward function ``fn(prompts, completions, **columns)`` reward ``name``.

    Same rules as :func:`register_factory` (the function's module and qualified name identify it); the
    function itself is returned unchanged.
    """
    _check_name(name)

    def deco(fn: RewardFn) -> RewardFn:
        @functools.wraps(fn)              # the factory carries the function's origin (and __wrapped__)
        def plain(ctx: RewardContext) -> RewardFn:
            return fn

        _add(name, plain)
        return fn

    return deco


def get_factory(name: str) -> RewardFactory:
    """The factory of reward ``name``; KeyError naming every registered reward when there is none."""
    try:
        return REWARDS[name]
    except KeyError:
        raise KeyError(f"unknown reward {name!r}; registered: {', '.join(sorted(REWARDS))} (more come from "
                       f"rewards.plugins and rewards.models)") from None


def get_reward(name: str, ctx: RewardContext | None = None) -> RewardFn:
    """Reward ``name`` built for ``ctx`` (default: the default configuration under the current folder)."""
    return get_factory(name)(ctx if ctx is not None else RewardContext())


def is_plugin(name: str) -> bool:
    """Was reward ``name`` registered by a plugin file (not a built-in or an imported module)?"""
    return _origin(get_factory(name))[0].startswith(PLUGIN_PREFIX)


def _plain_factory(name: str, fn: RewardFn, module: str) -> RewardFactory:
    def plain(ctx: RewardContext) -> RewardFn:
        return fn

    plain.__module__, plain.__qualname__, plain.__wrapped__ = module, getattr(fn, "__qualname__", name), fn
    return plain


def _orm_factory(name: str, cls: type, module: str) -> RewardFactory:
    def build(ctx: RewardContext) -> RewardFn:
        settings = types.SimpleNamespace(**dataclasses.asdict(ctx.rewards), root=ctx.root,
                                         max_completion_length=ctx.max_completion_length, device=ctx.device)
        return foreign.orm_instance(name, cls, settings)

    build.__module__, build.__qualname__, build.__wrapped__ = module, f"orms[{name!r}]", cls
    return build


def _register_foreign(module: types.ModuleType, orms: list[dict]) -> None:
    """The names a file registers the ms-swift way (``orms[name] = ORM subclass``) and its TRL-style
    functions (by function name) become rewards; a function that a decorator registered already, or whose
    name is a built-in reward, is left alone (recorded in SHADOWED so that using it is an error)."""
    registered = {getattr(f, "__wrapped__", None) for f in REWARDS.values()}
    for table in orms:
        for name, cls in list(table.items()):
            if getattr(cls, "__module__", None) == module.__name__:
                _check_name(name)
                _add(name, _orm_factory(name, cls, module.__name__))
    for name, fn in foreign.trl_functions(module).items():
        if fn in registered:
            continue
        old = REWARDS.get(name)
        if old is not None and not _origin(old)[0].startswith(PLUGIN_PREFIX):
            SHADOWED[name] = str(getattr(module, "__file__", module.__name__))
            continue
        _add(name, _plain_factory(name, fn, module.__name__))


def load_plugins(paths: Iterable[str | Path]) -> list[str]:
    """Import each Python file and return the reward names it added: what it registers with
    :func:`register` / :func:`register_factory`, the ms-swift ORM classes it puts into ``orms`` (``swift.rewards``
    / ``swift.plugin`` are importable while it loads, see :mod:`~vlgrpo.rewards.foreign`) and its TRL-style
    reward functions, by function name."""
    added: list[str] = []
    SHADOWED.clear()                  # what the files of this call leave unregistered
    for p in paths:
        path = Path(p).resolve()
        if not path.is_file():
            raise PluginError(f"reward plugin {p}: file not found")
        before = dict(REWARDS)
        # A stable, path-derived module name: loading the same file twice re-registers, not duplicates.
        mod_name = f"{PLUGIN_PREFIX}{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
        try:
            spec = importlib.util.spec_from_file_location(mod_name, path)
            if spec is None or spec.loader is None:
                raise ImportError("not a Python source file")
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod_name] = module
            with foreign.swift_imports() as orms:
                spec.loader.exec_module(module)
            _register_foreign(module, orms)
        except Exception as e:  # noqa: BLE001 - re-raised with the file named
            sys.modules.pop(mod_name, None)
            REWARDS.clear()
            REWARDS.update(before)  # a half-imported plugin must not leave half its rewards behind
            raise PluginError(f"reward plugin {p}: {type(e).__name__}: {e}") from e
        added += [n for n in REWARDS if REWARDS[n] is not before.get(n)]
    return added
