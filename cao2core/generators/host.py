"""Plugin discovery and isolation, and the per-generator view of the hooks the engine calls, checked.

Generators are found through the ``cao2.generators`` entry points and imported only when one is used or listed,
so ``--help`` and other generators never pay for (or break on) a plugin's import. A plugin that fails to import
(with any exception, ``SystemExit`` included), does not match the hookspecs, or registers a name another
distribution also registers is set aside with its reason: an error only when it is asked for, listed as BROKEN by
``cao2 plugins``. A clash with a built-in name keeps the built-in. A plugin written for another major version of
the contract (``hookspecs.CONTRACT``) is set aside the same way, with the version it needs; within the major version
each plugin receives only what the version it states defines.
"""
from __future__ import annotations

import difflib
import importlib.metadata
import re
import sys
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import pluggy
import torch

from . import contract, hookspecs
from .contract import PluginError
from .hookspecs import Corrupted, GenOption, Handle, LatentSpec, Prediction, SampleOutput
from ..errors import UserError

GENERATOR_GROUP = "cao2.generators"
PLUGIN_GROUP = "cao2.plugins"   # cross-cutting plugins (tracing, timing, hook wrappers)
BUILTIN_DISTRIBUTION = "cao2"
# errors that are not a plugin's fault and already say what to do
PASS_THROUGH = (UserError, KeyboardInterrupt)
# running out of memory inside a hook is the batch's size, not the plugin's fault (torch.OutOfMemoryError is the
# CUDA one under its newer name)
OUT_OF_MEMORY = (MemoryError, torch.cuda.OutOfMemoryError)
# the flags whose values shape what cao2_sample returns: a non-finite sample at a value the user set names it
SAMPLING_FLAGS = ("guidance", "sample_steps", "sampler")


@dataclass
class PluginInfo:
    name: str
    kind: str          # "generator" or "plugin"
    version: str
    hooks: list[str]
    distribution: str | None = None
    options: dict = field(default_factory=dict)
    contract: tuple[int, int] = hookspecs.FIRST_CONTRACT     # the contract version the plugin was written for


class Host:
    """A pluggy manager with the cao2 hookspecs, filled from the entry points (or explicit modules)."""

    def __init__(self, load_entry_points: bool = True):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.generators: dict[str, Any] = {}            # imported and validated
        self.pending: dict[str, importlib.metadata.EntryPoint] = {}   # found, not imported yet
        self.dists: dict[str, tuple[str | None, str]] = {}           # name -> (distribution, version)
        self.contracts: dict[str, tuple[int, int]] = {}              # name -> the contract version it states
        self.broken: dict[str, str] = {}
        self.broken_cross_cutting: set[str] = set()   # which of ``broken`` are cross-cutting plugins
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
        """Register a plugin; one written for another major contract version, or whose hookimpls' names or
        arguments do not match the specs, is refused."""
        if self.pm.has_plugin(name):
            raise UserError(f"two plugins are named {name!r}; uninstall one of them")
        stated = _stated_contract(plugin, name, f"{distribution or 'not installed'} {version}")
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
        self.contracts[name] = stated
        for what in _deprecated_parts(self.pm, plugin):
            _warn_deprecated(f"{kind} plugin {name!r} ({distribution or 'not installed'} {version})", what)

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
                self.broken_cross_cutting.add(ep.name)
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
        """What `cao2 plugins` lists; a generator whose listing hook (``cao2_options``) fails is moved to
        ``broken`` with its one-line reason, and the others are still listed."""
        self.load_all()
        out = []
        for name, plugin in self.pm.list_name_plugin():
            hooks = sorted(c.name for c in self.pm.get_hookcallers(plugin) or [])
            kind = "generator" if name in self.generators else "plugin"
            try:
                options = Generator(self, name).options() if kind == "generator" else {}
            except UserError as exc:
                self.broken[name] = str(exc)
                continue
            out.append(PluginInfo(name, kind, self.dists[name][1], hooks, self.dists[name][0], options,
                                  self.contracts[name]))
        return sorted(out, key=lambda p: (p.kind, p.name))


class Generator:
    """One generator plugin's hooks, plus every cross-cutting plugin's wrappers: one typed method per hook.

    Each method calls its hook by keyword on this plugin only, checks what comes back against the contract
    (``cao2core.generators.contract``), and turns an exception raised inside into a one-line ``PluginError`` naming the
    plugin and the hook (its ``__cause__`` keeps the traceback for ``--debug``). The plugin receives what its
    contract version defines: pluggy passes an implementation only the arguments it names, and ``load`` leaves out
    the generic options of later versions.
    """

    def __init__(self, host: Host, name: str):
        self.name = name
        self.distribution, self.version = host.dists[name]
        self.contract = host.contracts[name]
        self.label = f"{name} ({self.distribution or 'not installed'} {self.version})"
        self.wrapped_by = [n for n, _ in host.pm.list_name_plugin() if n not in host.generators]
        others = [p for n, p in host.generators.items() if n != name]
        self._plugin = host.generators[name]
        self._pm = host.pm
        self._callers = {h: host.pm.subset_hook_caller(h, remove_plugins=others)
                         for h in hookspecs.REQUIRED_HOOKS + hookspecs.OPTIONAL_HOOKS}
        self.spec: LatentSpec | None = None      # set by the first checked latent_spec call
        self.sampling: dict[str, Any] = {}       # the sampling flags the user set, from the last load

    def implements(self, hook: str) -> bool:
        return _implements(self._pm, self._plugin, hook)

    # the hooks, as the engine calls them

    def load(self, *, options: dict, device: torch.device) -> Handle:
        """``cao2_load`` with ``received_options(options)``; a ``--gen-opt`` key the plugin does not declare is refused
        first. A ``UserError`` that calls a generic option cao2 passed an unknown option or a ``--gen-opt`` is the
        plugin's fault, not the user's: a ``PluginError`` names the plugin."""
        received = self.received_options(options)
        self._refuse_unknown(received, self.options())
        self.sampling = {k: received[k] for k in SAMPLING_FLAGS if received.get(k) is not None}
        try:
            return self._call("cao2_load", options=received, device=device)
        except PluginError:
            raise
        except UserError as exc:
            key = _refused_key(str(exc), [k for k in hookspecs.generic_options(self.contract) if k in received])
            if key is None:
                raise
            raise PluginError(
                f"generator plugin {self.label}, written for contract {_dotted(self.contract)}: cao2_load refused "
                f"{key!r}, which cao2 passes from its own flags to every plugin of that contract (not a --gen-opt "
                f"you typed): the plugin's fault; report it to its authors (it said: {_first_line(exc)})") from exc

    def latent_spec(self, *, handle: Handle) -> LatentSpec:
        self.spec = self._call("cao2_latent_spec", handle=handle)
        return self.spec

    def describe(self, *, handle: Handle) -> dict:
        return self._call("cao2_describe", handle=handle)

    def sample(self, *, handle: Handle, labels: torch.Tensor, generators: list[torch.Generator],
               snapshot_steps: list[int], progress: Callable[[], None] | None = None) -> SampleOutput:
        """``cao2_sample``, its samples checked to be finite: a NaN or Inf sample stops the run here, blamed on the
        sampling flags the user set (``--guidance 1e30``), else on the plugin, before selection decodes it or CLO
        is blamed for it."""
        out = self._call("cao2_sample", handle=handle, labels=labels, generators=generators,
                         snapshot_steps=snapshot_steps, progress=progress)
        bad = contract.non_finite_samples(out)
        if bad:
            shown = sorted(set(labels[bad].tolist()))
            what = (f"non-finite samples from generator plugin {self.label} cao2_sample (NaN or Inf in {len(bad)} of "
                    f"{len(labels)} samples, of generator label{'s' * (len(shown) > 1)} "
                    f"{', '.join(map(str, shown[:5]))}{', ...' if len(shown) > 5 else ''})")
            if self.sampling:
                flags = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in self.sampling.items())
                advice = "lower --guidance" if "guidance" in self.sampling else f"change {flags}"
                raise UserError(f"{what} at {flags}: {advice} (at ordinary values, report it to the plugin's "
                                "authors)")
            raise PluginError(f"{what} at the plugin's own sampling settings; report it to the plugin's authors")
        return out

    def decode(self, *, handle: Handle, latents: torch.Tensor) -> torch.Tensor:
        return self._call("cao2_decode", handle=handle, latents=latents)

    def encode(self, *, handle: Handle, pixels: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        if not self.implements("cao2_encode"):
            raise UserError(f"generator {self.label} has no cao2_encode hook: it cannot encode images")
        return self._call("cao2_encode", handle=handle, pixels=pixels, generators=generators)

    def condition(self, *, handle: Handle, labels: torch.Tensor, kinds: list[str]) -> Any:
        return self._call("cao2_condition", handle=handle, labels=labels, kinds=kinds)

    def corrupt(self, *, handle: Handle, latents: torch.Tensor, levels: torch.Tensor, noise: torch.Tensor,
                generators: list[torch.Generator], level_max: int) -> Corrupted:
        return self._call("cao2_corrupt", handle=handle, latents=latents, levels=levels, noise=noise,
                          generators=generators, level_max=level_max)

    def predict(self, *, handle: Handle, corrupted: Corrupted, condition: Any) -> Prediction:
        return self._call("cao2_predict", handle=handle, corrupted=corrupted, condition=condition)

    def options(self) -> dict[str, GenOption]:
        """``{key: GenOption}`` from the optional ``cao2_options`` hook ({} without it)."""
        return self._call("cao2_options") if self.implements("cao2_options") else {}

    def label_spaces(self) -> dict[str, list[tuple[str, str]]]:
        """``{name: [(id, name), ...]}`` from the optional ``cao2_label_spaces`` hook ({} without it)."""
        return self._call("cao2_label_spaces") if self.implements("cao2_label_spaces") else {}

    # around the hooks

    def parse_options(self, options: dict) -> dict:
        """Load options with every ``--gen-opt`` value parsed through the generator's declared ``GenOption``;
        unknown keys and unparsable values are one-line errors naming the key. Without declarations: as given."""
        declared = self.options()
        if not declared:
            return options
        self._refuse_unknown(options, declared)
        out = dict(options)
        generic = hookspecs.generic_options()
        for key, text in options.items():
            if key in generic:
                continue
            opt = declared[key]
            if opt.choices is not None and str(text) not in opt.choices:
                raise UserError(f"--gen-opt {key}={text}: {self.name} takes one of {', '.join(opt.choices)}")
            try:
                out[key] = opt.parse(text) if isinstance(text, str) else text
            except ValueError as exc:         # the contract's word for bad text (GenOption.parse)
                raise UserError(f"--gen-opt {key}={text}: {self.name} cannot read it ({exc}); {opt.help}") from None
            except PASS_THROUGH:
                raise
            except Exception as exc:          # anything else is the parser's own bug, whatever the text
                raise PluginError(f"generator plugin {self.label}: the parser of --gen-opt {key} raised "
                                  f"{type(exc).__name__} on the value {text!r}: {_first_line(exc)}; report it to "
                                  "the plugin's authors (--debug shows the traceback)") from exc
        return out

    def _refuse_unknown(self, options: dict, declared: dict[str, GenOption]) -> None:
        """Refuse a ``--gen-opt`` key the generator does not declare (nothing to check without declarations)."""
        generic = hookspecs.generic_options()
        unknown = sorted(k for k in options if k not in generic and k not in declared)
        if unknown and declared:
            raise UserError(f"unknown --gen-opt {unknown[0]} for {self.name}; known: {', '.join(sorted(declared))} "
                            f"(`cao2 plugins --verbose` explains them)")

    def received_options(self, options: dict) -> dict:
        """What ``cao2_load`` receives of ``options``: the generic options of the plugin's contract version and the
        ``--gen-opt`` pairs. A generic option a later version added is left out (the plugin cannot know it), and
        refused unless it is None or neutral (``hookspecs.NEUTRAL_VALUES``): the plugin could not honour it."""
        every, own = hookspecs.generic_options(), hookspecs.generic_options(self.contract)
        for key in [k for k in every if k not in own and options.get(k) is not None]:
            if options[key] != hookspecs.NEUTRAL_VALUES.get(key):
                added = _dotted(next(v for v, keys in hookspecs.GENERIC_OPTIONS_BY_VERSION.items() if key in keys))
                raise UserError(f"--{key.replace('_', '-')} {options[key]}: generator {self.label} is written for "
                                f"contract {_dotted(self.contract)}, which has no {key} (contract {added} added it); "
                                f"leave the flag out, or ask the plugin's authors for a release of contract {added}")
        received = {k: v for k, v in options.items() if k in own or k not in every}
        if any(f"options[{k}]" in hookspecs.DEPRECATED for k in received):
            return _WarningOptions(received, f"generator plugin {self.label}")
        return received

    def _call(self, hook: str, **kwargs):
        try:
            result = self._callers[hook](**kwargs)
        except PASS_THROUGH:
            raise
        except OUT_OF_MEMORY as exc:
            raise UserError(f"out of memory in {self.label} {hook}: lower --batch-size (--debug shows the "
                            "traceback)") from exc
        except SystemExit as exc:         # a plugin must not end cao2, least of all with its own exit code
            raise PluginError(f"generator plugin {self.label}: {hook} called sys.exit({exc.code!r}); a plugin must "
                              "raise instead: report it to the plugin's authors (--debug shows the traceback)"
                              ) from exc
        except Exception as exc:
            where = f" (or a cross-cutting plugin wrapping it: {', '.join(self.wrapped_by)})" if self.wrapped_by else ""
            raise PluginError(f"generator plugin {self.label}: {hook}{where} raised {type(exc).__name__}: "
                              f"{_first_line(exc)}; report it to the plugin's authors (--debug shows the "
                              "traceback)") from exc
        problem = contract.check(hook, result, kwargs, self.spec)
        if problem:
            raise PluginError(f"generator plugin {self.label}: {hook} {problem}; the plugin breaks the cao2 "
                              "contract (docs/plugins.md)")
        return result


class _WarningOptions(dict):
    """Load options that warn when the plugin reads a deprecated key (``hookspecs.DEPRECATED``, ``options[KEY]``)."""

    def __init__(self, items: dict, plugin: str):
        super().__init__(items)
        self._plugin = plugin

    def __getitem__(self, key):
        self._warn(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self._warn(key)
        return super().get(key, default)

    def _warn(self, key) -> None:
        if f"options[{key}]" in hookspecs.DEPRECATED:
            _warn_deprecated(self._plugin, f"options[{key}]", stacklevel=4)


def _stated_contract(plugin: Any, name: str, source: str) -> tuple[int, int]:
    """The contract version ``plugin`` states (``hookspecs.CONTRACT_ATTRIBUTE``; none: the first); a malformed
    statement or another major version than this cao2 speaks is a ``UserError`` saying what to upgrade."""
    stated = getattr(plugin, hookspecs.CONTRACT_ATTRIBUTE, None)
    try:
        version = (hookspecs.FIRST_CONTRACT if stated is None
                   else tuple(int(part) for part in (stated.split(".") if isinstance(stated, str) else stated)))
    except (TypeError, ValueError):
        version = ()
    if len(version) != 2 or min(version) < 0:
        raise UserError(f"plugin {name!r} ({source}) states {hookspecs.CONTRACT_ATTRIBUTE} = {stated!r}; it should "
                        f"be (MAJOR, MINOR), e.g. {hookspecs.CONTRACT}")
    speaks = hookspecs.CONTRACT[0]
    if version[0] != speaks:
        upgrade = ("upgrade cao2" if version[0] > speaks
                   else f"upgrade {name} (or install a cao2 of contract {version[0]})")
        raise UserError(f"plugin {name!r} ({source}) is written for contract {version[0]}, this cao2 speaks {speaks}: "
                        f"{upgrade}")
    return version


def _deprecated_parts(pm: pluggy.PluginManager, plugin: Any) -> list[str]:
    """The deprecated hooks ``plugin`` implements and hook arguments it takes (``hookspecs.DEPRECATED``)."""
    if not hookspecs.DEPRECATED:
        return []
    found = []
    for caller in pm.get_hookcallers(plugin) or []:
        for impl in caller.get_hookimpls():
            if impl.plugin is plugin:
                found += [w for w in (caller.name, *(f"{caller.name}({a})" for a in impl.argnames))
                          if w in hookspecs.DEPRECATED]
    return found


def _warn_deprecated(plugin: str, what: str, stacklevel: int = 3) -> None:
    warnings.warn(f"{plugin}: {what} is deprecated: {hookspecs.DEPRECATED[what]}; contract "
                  f"{hookspecs.CONTRACT[0] + 1} removes it", DeprecationWarning, stacklevel=stacklevel)


def _refused_key(message: str, generic: list[str]) -> str | None:
    """The generic option ``message`` refuses as a ``--gen-opt`` or an unknown option or key (alone or in a list),
    if any: ``unknown --gen-opt 'profile' for pixeldiff``, ``unexpected options: foo, profile``."""
    for key in generic:
        if re.search(rf"{_REFUSAL}\W{{0,3}}(?:[\w-]+['\"`]?,\s*['\"`]?)*{re.escape(key)}\b", message, re.IGNORECASE):
            return key
    return None


_REFUSAL = r"(?:gen-opt|(?:unknown|unexpected|unrecogni[sz]ed)\s+(?:option|key)s?)(?:\s+(?:option|key)s?)?"


def _dotted(version: tuple[int, int]) -> str:
    return ".".join(str(v) for v in version)


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


def _hook_arguments(hook: str) -> tuple[str, ...]:
    spec = getattr(hookspecs, hook)
    return spec.__code__.co_varnames[:spec.__code__.co_argcount]


def _validation_hint(exc: pluggy.PluginValidationError) -> str:
    """pluggy's refusal in one line, with what to change: the unknown arguments of a hook and the ones it takes,
    or the hook a misspelled name is close to."""
    text = " ".join(str(exc).split())
    names = [n for n in dir(hookspecs) if n.startswith("cao2_")]
    hook = re.search(r"for hook '(\w+)'", text)
    unknown = re.search(r"Argument\(s\) \{(.*?)\} are declared in the hookimpl", text)
    if hook and unknown and hook.group(1) in names:
        args = _hook_arguments(hook.group(1))
        bad = re.findall(r"'(\w+)'", unknown.group(1))
        near = [f"{c[0]} for {b!r}" for b in bad if (c := difflib.get_close_matches(b, args, n=1))]
        return (f"{hook.group(1)} has no argument {', '.join(map(repr, bad))}; it takes {', '.join(args)} (any "
                f"subset, by these names){' (did you mean ' + '; '.join(near) + '?)' if near else ''}")
    unknown_hook = re.search(r"unknown hook '(\w+)'", text)
    if unknown_hook:
        close = difflib.get_close_matches(unknown_hook.group(1), names, n=1)
        if close:
            return f"{text} (did you mean {close[0]}?)"
    return text


def _missing_hint(plugin: Any, missing: list[str]) -> str:
    bare = [h for h in missing if callable(getattr(plugin, h, None))]
    if bare:
        return (f" ({', '.join(bare)} is defined but not marked: decorate it with "
                "@hookimpl from cao2core.generators.hookspecs)")
    # a misspelling is a name no hook has: the plugin's other hooks (cao2_decode for cao2_describe) are no hint
    spelled = [n for n in dir(plugin) if n.startswith("cao2") and not hasattr(hookspecs, n)]
    near = [f"{h} (found {c[0]})" for h in missing if (c := difflib.get_close_matches(h, spelled, n=1))]
    if near:
        return f" (misspelled? {'; '.join(near)})"
    return (" (add " + "; ".join(f"@hookimpl def {h}({', '.join(_hook_arguments(h))})" for h in missing)
            + ": docs/plugins.md, The hooks)")


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[0] if lines else "")[:200]


def _dist_name(ep: importlib.metadata.EntryPoint) -> str | None:
    return ep.dist.metadata["Name"] if ep.dist is not None else None


def _dist_version(ep: importlib.metadata.EntryPoint) -> str:
    return ep.dist.version if ep.dist is not None else "unknown"


def _dist_label(ep: importlib.metadata.EntryPoint) -> str:
    return f"{_dist_name(ep) or 'unknown distribution'} {_dist_version(ep) if ep.dist is not None else ''}".strip()
