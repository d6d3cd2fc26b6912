"""Plugin discovery and validation, and the per-generator view of the hooks the engine calls."""
from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from typing import Any

import pluggy

from . import hookspecs
from .errors import UserError

GENERATOR_GROUP = "cao2.generators"
PLUGIN_GROUP = "cao2.plugins"   # cross-cutting plugins (tracing, timing, hook wrappers)


@dataclass
class PluginInfo:
    name: str
    kind: str          # "generator" or "plugin"
    version: str
    hooks: list[str]


class Host:
    """A pluggy manager with the cao2 hookspecs, filled from the entry points (or explicit modules).

    A generator that fails to import or to validate is set aside in ``broken``: it is an error only when it is
    asked for, so one broken install does not stop the others. A broken cross-cutting plugin is an error at once,
    since it would wrap every generator's hooks.
    """

    def __init__(self, load_entry_points: bool = True):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.generators: dict[str, Any] = {}
        self.versions: dict[str, str] = {}
        self.broken: dict[str, str] = {}
        if load_entry_points:
            for ep in importlib.metadata.entry_points(group=GENERATOR_GROUP):
                try:
                    self.register(_load(ep), ep.name, kind="generator", version=_dist_version(ep))
                except UserError as exc:
                    self.broken[ep.name] = str(exc)
            for ep in importlib.metadata.entry_points(group=PLUGIN_GROUP):
                self.register(_load(ep), ep.name, kind="plugin", version=_dist_version(ep))

    def register(self, plugin: Any, name: str, kind: str = "generator", version: str = "unknown") -> None:
        """Register a plugin; hookimpls whose names or arguments do not match the specs are refused."""
        if self.pm.has_plugin(name):
            raise UserError(f"two plugins are named {name!r}; uninstall one of them")
        try:
            self.pm.register(plugin, name=name)
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            if self.pm.has_plugin(name):
                self.pm.unregister(name=name)
            raise UserError(f"plugin {name!r} does not match the cao2 hookspecs: {exc}") from None
        if kind == "generator":
            missing = [h for h in hookspecs.REQUIRED_HOOKS if not _implements(self.pm, plugin, h)]
            if missing:
                self.pm.unregister(name=name)
                raise UserError(f"generator plugin {name!r} lacks required hooks: {', '.join(missing)}")
            self.generators[name] = plugin
        self.versions[name] = version

    def generator(self, name: str) -> "Generator":
        if name in self.broken:
            raise UserError(self.broken[name])
        if name not in self.generators:
            known = ", ".join(sorted(self.generators)) or "none"
            raise UserError(f"unknown generator {name!r}; installed generators: {known}")
        return Generator(self, name)

    def describe(self) -> list[PluginInfo]:
        out = []
        for name, plugin in self.pm.list_name_plugin():
            hooks = sorted(c.name for c in self.pm.get_hookcallers(plugin) or [])
            kind = "generator" if name in self.generators else "plugin"
            out.append(PluginInfo(name, kind, self.versions.get(name, "unknown"), hooks))
        return sorted(out, key=lambda p: (p.kind, p.name))


class Generator:
    """The hooks of one generator plugin, plus every cross-cutting plugin, called by keyword."""

    def __init__(self, host: Host, name: str):
        self.name = name
        others = [p for n, p in host.generators.items() if n != name]
        self._plugin = host.generators[name]
        self._pm = host.pm
        self._callers = {h: host.pm.subset_hook_caller(h, remove_plugins=others)
                         for h in hookspecs.REQUIRED_HOOKS + hookspecs.OPTIONAL_HOOKS}

    def implements(self, hook: str) -> bool:
        return _implements(self._pm, self._plugin, hook)

    def __getattr__(self, op: str):
        caller = self.__dict__["_callers"].get(f"cao2_{op}")
        if caller is None:
            raise AttributeError(op)
        return caller


def _implements(pm: pluggy.PluginManager, plugin: Any, hook: str) -> bool:
    return any(impl.plugin is plugin for impl in getattr(pm.hook, hook).get_hookimpls())


def _load(ep: importlib.metadata.EntryPoint) -> Any:
    try:
        return ep.load()
    except Exception as exc:
        raise UserError(f"plugin {ep.name!r} ({ep.value}) failed to import: {type(exc).__name__}: {exc}; "
                        "reinstall or uninstall it") from None


def _dist_version(ep: importlib.metadata.EntryPoint) -> str:
    return ep.dist.version if ep.dist is not None else "unknown"
