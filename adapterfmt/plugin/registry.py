"""The plugin manager: built-in plugins, entry-point plugins, blocking, and lookups by name.

Built-in plugins are registered in code. Third-party plugins come from the entry-point group
``adapterfmt``; one that fails to import or implements an unknown hook is reported and skipped, never
taking the CLI down. ``ADAPTERFMT_BLOCK_PLUGINS=name1,name2`` keeps named plugins from loading.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import pluggy

from .._version import __version__
from ..errors import FormatError, PluginError
from . import hookspecs

ENTRY_POINT_GROUP = "adapterfmt"
BLOCK_ENV = "ADAPTERFMT_BLOCK_PLUGINS"
BUILTIN_PLUGINS = {
    "lora": "adapterfmt.plugins.methods.lora",
    "lora_variants": "adapterfmt.plugins.methods.lora_variants",
    "codecs": "adapterfmt.plugins.codecs",
    "patches": "adapterfmt.plugins.methods.patches",
    "sparse_methods": "adapterfmt.plugins.methods.sparse",
    "sparse_blocks": "adapterfmt.plugins.methods.blocks",
    "sparse_ft_format": "adapterfmt.plugins.formats.sparse_ft",
    "vectors": "adapterfmt.plugins.methods.vectors",
    "prompts": "adapterfmt.plugins.methods.prompts",
    "multiplicative": "adapterfmt.plugins.methods.multiplicative",
    "peft_format": "adapterfmt.plugins.formats.peft",
    "mlx_format": "adapterfmt.plugins.formats.mlx",
    "gguf_format": "adapterfmt.plugins.formats.gguf",
    "kohya_format": "adapterfmt.plugins.formats.kohya",
    "torchtune_format": "adapterfmt.plugins.formats.torchtune",
    "diffusers_format": "adapterfmt.plugins.formats.diffusers",
    "token_rows": "adapterfmt.plugins.methods.token_rows",
    "mixture": "adapterfmt.plugins.methods.mixture",
    "svd_lora": "adapterfmt.plugins.methods.svd_lora",
    "structured": "adapterfmt.plugins.methods.structured",
    "prefix": "adapterfmt.plugins.methods.prefix",
    "bottleneck": "adapterfmt.plugins.methods.bottleneck",
    "adapterhub_format": "adapterfmt.plugins.formats.adapterhub",
    "quant": "adapterfmt.plugins.methods.quant",
    "selection": "adapterfmt.plugins.methods.selection",
    "procedures": "adapterfmt.plugins.methods.procedures",
    "density": "adapterfmt.plugins.methods.density",
    "star": "adapterfmt.plugins.methods.star",
}
"""Built-in plugins: the name ``adapter plugins`` shows and ``ADAPTERFMT_BLOCK_PLUGINS`` takes -> module.
They are loaded by module name, like entry points, so this layer imports none of them."""
BUILTIN_KINDS_MODULE = "adapterfmt.deltas"
"""Where the core delta kinds live (a higher layer, looked up by name like the plugins)."""
VERBS = ("train", "apply", "merge", "compress", "port")


@dataclass
class BrokenPlugin:
    name: str
    distribution: str | None
    error: str


@dataclass
class PluginState:
    pm: pluggy.PluginManager
    distributions: dict[str, tuple[str, str]] = field(default_factory=dict)  # plugin name -> (dist, version)
    broken: list[BrokenPlugin] = field(default_factory=list)


def blocked() -> set[str]:
    return {p.strip() for p in os.environ.get(BLOCK_ENV, "").split(",") if p.strip()}


def _register_checked(state: PluginState, plugin: object, name: str) -> bool:
    """Register one plugin; undo and report it when it implements hooks that do not exist."""
    try:
        state.pm.register(plugin, name=name)
        state.pm.check_pending()
    except Exception as e:  # a broken plugin must not take the others down
        if state.pm.is_registered(plugin):
            state.pm.unregister(plugin)
        state.broken.append(BrokenPlugin(name, state.distributions.get(name, (None,))[0], f"{type(e).__name__}: {e}"))
        return False
    return True


@cache
def _third_party() -> PluginState:
    """The manager with the entry-point plugins only: what ``adapter`` needs to add plugin commands, without
    importing the built-ins (which add none, and would make ``adapter --help`` import torch)."""
    pm = pluggy.PluginManager("adapterfmt")
    pm.add_hookspecs(hookspecs)
    state = PluginState(pm)
    skip = blocked()
    for ep in sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        if ep.name in skip or ep.name in BUILTIN_PLUGINS or pm.has_plugin(ep.name):
            continue  # a built-in's name stays the built-in's, even when that built-in is blocked
        dist = (ep.dist.name, ep.dist.version) if ep.dist else ("?", "?")
        state.distributions[ep.name] = dist
        try:
            plugin = ep.load()
        except Exception as e:
            state.broken.append(BrokenPlugin(ep.name, dist[0], f"failed to import: {type(e).__name__}: {e}"))
            warnings.warn(f"adapterfmt plugin {ep.name!r} ({dist[0]}) failed to load: {e}", stacklevel=2)
            continue
        if not _register_checked(state, plugin, ep.name):
            warnings.warn(f"adapterfmt plugin {ep.name!r} ({dist[0]}) was skipped: {state.broken[-1].error}",
                          stacklevel=2)
    return state


@cache
def _state() -> PluginState:
    """Every plugin: the entry-point ones, then the built-ins (lookups put the built-ins first)."""
    state = _third_party()
    skip = blocked()
    for name, modname in BUILTIN_PLUGINS.items():
        if name in skip:
            continue
        state.distributions[name] = ("adapterfmt", __version__)
        _register_checked(state, importlib.import_module(modname), name)
    return state


def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager (built on first use)."""
    return _state().pm


def reset() -> None:
    """Forget loaded plugins so the next lookup rebuilds the manager (tests, or after installing a plugin)."""
    _third_party.cache_clear()
    _state.cache_clear()
    _collect.cache_clear()


@cache
def _core_kinds() -> dict[str, Any]:
    """The core delta kinds by name (no plugin is loaded for them)."""
    return {k.name: k for k in importlib.import_module(BUILTIN_KINDS_MODULE).BUILTIN_KINDS}


@cache
def _collect(hook: str) -> dict[str, Any]:
    """Items from every plugin's ``hook``, by name; built-ins first, a later duplicate is reported and skipped."""
    items: dict[str, Any] = {}
    if hook == "adapterfmt_delta_kinds":
        items.update(_core_kinds())
    state = _state()
    impls = sorted(getattr(state.pm.hook, hook).get_hookimpls(), key=lambda i: i.plugin_name not in BUILTIN_PLUGINS)
    for impl in impls:
        try:
            provided = list(impl.function() or ())
        except Exception as e:
            _report(state, impl.plugin_name, f"failed in {hook}: {type(e).__name__}: {e}")
            continue
        for item in provided:
            if item.name in items:
                _report(state, impl.plugin_name, f"{hook.removeprefix('adapterfmt_')} {item.name!r} is already "
                                                 "provided by another plugin; ignored")
                continue
            items[item.name] = item
    return items


def _report(state: PluginState, plugin: str, error: str) -> None:
    state.broken.append(BrokenPlugin(plugin, state.distributions.get(plugin, (None,))[0], error))
    warnings.warn(f"adapterfmt plugin {plugin!r}: {error}", stacklevel=3)


def methods() -> dict[str, Any]:
    """Installed methods by name."""
    return _collect("adapterfmt_methods")


def delta_kinds() -> dict[str, Any]:
    """Built-in and plugin delta kinds by name."""
    return _collect("adapterfmt_delta_kinds")


def formats() -> dict[str, Any]:
    """Foreign format codecs by name."""
    return _collect("adapterfmt_formats")


def codecs() -> dict[str, Any]:
    """Tensor compression codecs by name."""
    return _collect("adapterfmt_codecs")


def backends() -> dict[str, Any]:
    """Apply backends by name."""
    return _collect("adapterfmt_backends")


def understood_extensions() -> tuple[str, ...]:
    return tuple(sorted({name for names in plugin_manager().hook.adapterfmt_extensions() for name in names or ()}))


def get_method(name: str) -> Any:
    try:
        return methods()[name]
    except KeyError:
        known = ", ".join(sorted(methods())) or "none"
        raise PluginError(f"unknown method {name!r} (installed: {known})") from None


def get_kind(name: str, *, path: object = None) -> Any:
    """The delta kind ``name``: a core kind without loading any plugin (plugins cannot override one), else a
    plugin's."""
    core = _core_kinds()
    if name in core:
        return core[name]
    try:
        return delta_kinds()[name]
    except KeyError:
        raise FormatError(f"unknown delta kind {name!r}: no installed plugin implements it", path=path) from None


def verb(method: str, name: str) -> Callable[..., Any]:
    """The implementation of verb ``name`` for ``method``: a plugin's override, else the method's own."""
    if name not in VERBS:
        raise PluginError(f"unknown verb {name!r} (verbs: {', '.join(VERBS)})")
    override = plugin_manager().hook.adapterfmt_verb(method=method, verb=name)
    return override if override is not None else getattr(get_method(method), name)


def add_plugin_commands(app: Any) -> None:
    """Let each entry-point plugin add CLI commands (built-ins add none and are not imported here); a plugin
    that fails is reported and skipped."""
    state = _third_party()
    for impl in state.pm.hook.adapterfmt_cli.get_hookimpls():
        try:
            impl.function(app=app)
        except Exception as e:
            _report(state, impl.plugin_name, f"failed in adapterfmt_cli: {type(e).__name__}: {e}")


def plugin_info() -> list[dict[str, Any]]:
    """Loaded and broken plugins: name, distribution, version, hooks implemented (for ``adapter plugins``)."""
    state = _state()
    rows = []
    for name, plugin in sorted(state.pm.list_name_plugin(), key=lambda p: p[0]):
        dist, version = state.distributions.get(name, ("?", "?"))
        hooks = sorted(h.name for h in state.pm.get_hookcallers(plugin) or ())
        rows.append({"name": name, "distribution": dist, "version": version, "hooks": hooks, "status": "loaded"})
    for b in state.broken:
        rows.append({"name": b.name, "distribution": b.distribution, "version": None, "hooks": [],
                     "status": "broken", "error": b.error})
    return rows
