"""Plugin discovery and isolation, and the per-generator view of the hooks the engine calls, checked.

Generators are found through the ``cao2.generators`` entry points and imported only when one is used or listed,
so ``--help`` and other generators never pay for (or break on) a plugin's import. A plugin that fails to import
(with any exception, ``SystemExit`` included), does not match the hookspecs, or registers a name another
distribution also registers is set aside with its reason: an error only when it is asked for, listed as BROKEN by
``cao2 plugins``. A clash with a built-in name keeps the built-in.
"""
from __future__ import annotations

import difflib
import importlib.metadata
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import pluggy
import torch

from . import contract, hookspecs
from .contract import PluginError
from ..errors import UserError

GENERATOR_GROUP = "cao2.generators"
PLUGIN_GROUP = "cao2.plugins"   # cross-cutting plugins (tracing, timing, hook wrappers)
BUILTIN_DISTRIBUTION = "cao2"
# errors that are not a plugin's fault: the engine handles them (the batch-size probe catches OOM)
PASS_THROUGH = (UserError, KeyboardInterrupt, MemoryError, torch.cuda.OutOfMemoryError)


@dataclass
class PluginInfo:
    name: str
    kind: str          # "generator" or "plugin"
    version: str
    hooks: list[str]
    distribution: str | None = None
    options: dict = field(default_factory=dict)


class Host:
    """A pluggy manager with the cao2 hookspecs, filled from the entry points (or explicit modules)."""

    def __init__(self, load_entry_points: bool = True):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.generators: dict[str, Any] = {}            # imported and validated
        self.pending: dict[str, importlib.metadata.EntryPoint] = {}   # found, not imported yet
        self.dists: dict[str, tuple[str | None, str]] = {}           # name -> (distribution, version)
        self.broken: dict[str, str] = {}
        self._cross_cutting = list(importlib.metadata.entry_points(group=PLUGIN_GROUP)) if load_entry_points else []
        if load_entry_points:
            self._discover(importlib.metadata.entry_points(group=GENERATOR_GROUP))

    def _discover(self, entry_points) -> None:
        by_name = defaultdict(dict)
        for ep in entry_points:
            by_name[ep.name][(_dist_name(ep), ep.value)] = ep      # one install may list an entry point twice
        for name, found in by_name.items():
            eps = list(found.values())
            if len(eps) > 1:
                clash = " and ".join(f"{_dist_label(ep)} ({ep.value})" for ep in eps)
                reason = (f"generator name {name!r} is registered by {clash}; uninstall one of them or rename the "
                          "third-party entry point")
                builtin = [ep for ep in eps if _dist_name(ep) == BUILTIN_DISTRIBUTION]
                for ep in eps:
                    if ep not in builtin or len(builtin) > 1:
                        self.broken[f"{name} ({_dist_label(ep)})"] = reason
                if len(builtin) != 1:
                    self.broken[name] = reason
                    continue
                eps = builtin
            self.pending[name] = eps[0]
            self.dists[name] = (_dist_name(eps[0]), _dist_version(eps[0]))

    def register(self, plugin: Any, name: str, kind: str = "generator", version: str = "unknown",
                 distribution: str | None = None) -> None:
        """Register a plugin; hookimpls whose names or arguments do not match the specs are refused."""
        if self.pm.has_plugin(name):
            raise UserError(f"two plugins are named {name!r}; uninstall one of them")
        try:
            self.pm.register(plugin, name=name)
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            if self.pm.has_plugin(name):
                self.pm.unregister(name=name)
            raise UserError(f"plugin {name!r} does not match the cao2 hookspecs: {_validation_hint(exc)}") from None
        if kind == "generator":
            missing = [h for h in hookspecs.REQUIRED_HOOKS if not _implements(self.pm, plugin, h)]
            if missing:
                self.pm.unregister(name=name)
                raise UserError(f"generator plugin {name!r} lacks required hooks: {', '.join(missing)}"
                                f"{_missing_hint(plugin, missing)}")
            self.generators[name] = plugin
        self.dists.setdefault(name, (distribution, version))

    def generator(self, name: str) -> "Generator":
        self.load_cross_cutting()
        if name in self.pending:
            self._import(name)
        if name in self.broken:
            raise UserError(self.broken[name])
        if name not in self.generators:
            known = ", ".join(sorted(set(self.generators) | set(self.pending))) or "none"
            raise UserError(f"unknown generator {name!r}; installed generators: {known}")
        return Generator(self, name)

    def load_cross_cutting(self) -> None:
        """Import the cross-cutting plugins once; a broken one is reported on stderr and skipped."""
        eps, self._cross_cutting = self._cross_cutting, []
        for ep in eps:
            try:
                self.register(_load(ep), ep.name, kind="plugin", version=_dist_version(ep),
                              distribution=_dist_name(ep))
            except UserError as exc:
                self.broken[ep.name] = str(exc)
                print(f"cao2: warning: cross-cutting plugin {ep.name!r} is skipped: {exc}", file=sys.stderr)

    def load_all(self) -> None:
        self.load_cross_cutting()
        for name in list(self.pending):
            self._import(name)

    def _import(self, name: str) -> None:
        ep = self.pending.pop(name)
        try:
            self.register(_load(ep), name, kind="generator", version=_dist_version(ep), distribution=_dist_name(ep))
        except UserError as exc:
            self.broken[name] = str(exc)

    def active_plugins(self) -> dict[str, str]:
        """The cross-cutting plugins registered now: {name: "distribution version"}, for the manifest."""
        return {n: " ".join(str(x) for x in self.dists[n] if x)
                for n, _ in self.pm.list_name_plugin() if n not in self.generators}

    def describe(self) -> list[PluginInfo]:
        self.load_all()
        out = []
        for name, plugin in self.pm.list_name_plugin():
            hooks = sorted(c.name for c in self.pm.get_hookcallers(plugin) or [])
            kind = "generator" if name in self.generators else "plugin"
            options = Generator(self, name).declared_options() if kind == "generator" else {}
            out.append(PluginInfo(name, kind, self.dists[name][1], hooks,
                                  self.dists.get(name, (None, ""))[0], options))
        return sorted(out, key=lambda p: (p.kind, p.name))


class Generator:
    """The hooks of one generator plugin, plus every cross-cutting plugin, called by keyword and checked.

    ``gen.sample(handle=..., ...)`` calls ``cao2_sample``; what it returns is checked against the contract
    (``cao2core.generators.contract``), and an exception raised inside becomes a one-line ``PluginError`` naming the plugin
    and the hook (its ``__cause__`` keeps the traceback for ``--debug``).
    """

    def __init__(self, host: Host, name: str):
        self.name = name
        self.distribution, self.version = host.dists[name]
        self.label = f"{name} ({self.distribution or 'not installed'} {self.version})"
        self.wrapped_by = [n for n, _ in host.pm.list_name_plugin() if n not in host.generators]
        others = [p for n, p in host.generators.items() if n != name]
        self._plugin = host.generators[name]
        self._pm = host.pm
        self._callers = {h: host.pm.subset_hook_caller(h, remove_plugins=others)
                         for h in hookspecs.REQUIRED_HOOKS + hookspecs.OPTIONAL_HOOKS}
        self.spec: hookspecs.LatentSpec | None = None      # set by the first checked latent_spec call

    def implements(self, hook: str) -> bool:
        return _implements(self._pm, self._plugin, hook)

    def declared_options(self) -> dict:
        """``{key: GenOption}`` from the optional ``cao2_options`` hook ({} without it)."""
        return self.options() if self.implements("cao2_options") else {}

    def label_spaces(self) -> dict:
        """``{name: [(id, name), ...]}`` from the optional ``cao2_label_spaces`` hook ({} without it)."""
        if not self.implements("cao2_label_spaces"):
            return {}
        return self._call("cao2_label_spaces", self._callers["cao2_label_spaces"], {})

    def parse_options(self, options: dict) -> dict:
        """Load options with every ``--gen-opt`` value parsed through the generator's declared ``GenOption``;
        unknown keys and unparsable values are one-line errors naming the key. Without declarations: as given."""
        declared = self.declared_options()
        if not declared:
            return options
        out = dict(options)
        for key, text in options.items():
            if key in hookspecs.GENERIC_OPTIONS:
                continue
            if key not in declared:
                raise UserError(f"unknown --gen-opt {key} for {self.name}; known: {', '.join(sorted(declared))} "
                                f"(`cao2 plugins --verbose` explains them)")
            opt = declared[key]
            if opt.choices is not None and str(text) not in opt.choices:
                raise UserError(f"--gen-opt {key}={text}: {self.name} takes one of {', '.join(opt.choices)}")
            try:
                out[key] = opt.parse(text) if isinstance(text, str) else text
            except (ValueError, TypeError) as exc:
                raise UserError(f"--gen-opt {key}={text}: {self.name} cannot read it ({exc}); {opt.help}") from None
        return out

    def __getattr__(self, op: str):
        caller = self.__dict__["_callers"].get(f"cao2_{op}")
        if caller is None:
            raise AttributeError(op)
        return lambda **kwargs: self._call(f"cao2_{op}", caller, kwargs)

    def _call(self, hook: str, caller, kwargs: dict):
        if hook == "cao2_sample":
            kwargs.setdefault("progress", None)         # optional for callers that draw no bar
        try:
            result = caller(**kwargs)
        except PASS_THROUGH:
            raise
        except Exception as exc:
            where = f" (or a cross-cutting plugin wrapping it: {', '.join(self.wrapped_by)})" if self.wrapped_by else ""
            raise PluginError(f"generator plugin {self.label}: {hook}{where} raised {type(exc).__name__}: "
                              f"{_first_line(exc)}; report it to the plugin's authors (--debug shows the "
                              "traceback)") from exc
        problem = contract.check(hook, result, kwargs, self.spec)
        if problem:
            raise PluginError(f"generator plugin {self.label}: {hook} {problem}; the plugin breaks the cao2 "
                              "contract (docs/plugins.md)")
        if hook == "cao2_latent_spec":
            self.spec = result
        return result


def _implements(pm: pluggy.PluginManager, plugin: Any, hook: str) -> bool:
    return any(impl.plugin is plugin for impl in getattr(pm.hook, hook).get_hookimpls())


def _load(ep: importlib.metadata.EntryPoint) -> Any:
    try:
        return ep.load()
    except KeyboardInterrupt:
        raise
    except BaseException as exc:        # SystemExit at import time included: it must not end cao2
        raise UserError(f"plugin {ep.name!r} ({ep.value}, {_dist_label(ep)}) failed to import: "
                        f"{type(exc).__name__}: {_first_line(exc)}; reinstall or uninstall it") from None


def _validation_hint(exc: pluggy.PluginValidationError) -> str:
    text = " ".join(str(exc).split())
    names = [n for n in dir(hookspecs) if n.startswith("cao2_")]
    for word in text.replace("'", " ").split():
        if word.startswith("cao2_") and word not in names:
            close = difflib.get_close_matches(word, names, n=1)
            if close:
                return f"{text} (did you mean {close[0]}?)"
    if "argument" in text.lower():
        for name in names:
            if name in text:
                spec = getattr(hookspecs, name)
                args = spec.__code__.co_varnames[:spec.__code__.co_argcount]
                return f"{text} ({name} may take: {', '.join(args)})"
    return text


def _missing_hint(plugin: Any, missing: list[str]) -> str:
    bare = [h for h in missing if callable(getattr(plugin, h, None))]
    if bare:
        return (f" ({', '.join(bare)} is defined but not marked: decorate it with "
                "@hookimpl from cao2core.generators.hookspecs)")
    near = [f"{h} (found {c[0]})" for h in missing
            if (c := difflib.get_close_matches(h, [n for n in dir(plugin) if n.startswith("cao2")], n=1))]
    return f" (misspelled? {'; '.join(near)})" if near else ""


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[0] if lines else "")[:200]


def _dist_name(ep: importlib.metadata.EntryPoint) -> str | None:
    return ep.dist.metadata["Name"] if ep.dist is not None else None


def _dist_version(ep: importlib.metadata.EntryPoint) -> str:
    return ep.dist.version if ep.dist is not None else "unknown"


def _dist_label(ep: importlib.metadata.EntryPoint) -> str:
    return f"{_dist_name(ep) or 'unknown distribution'} {_dist_version(ep) if ep.dist is not None else ''}".strip()
