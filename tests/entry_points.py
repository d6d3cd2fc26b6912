"""Pretend more plugin packages are installed: extra entry points, as importlib.metadata lists them to the host."""
from __future__ import annotations

import importlib.metadata as md


def install_entry_points(monkeypatch, extra: dict[str, list[tuple[str, str, str]]]) -> None:
    """Add ``extra`` ({entry-point group: [(name, module, distribution name)]}) to what the host finds installed."""
    import cao2core.generators.host as host_module
    real = md.entry_points

    class Dist:
        def __init__(self, name):
            self.metadata, self.version = {"Name": name}, "1.0"

    def entry_points(group):
        eps = list(real(group=group))
        for name, value, dist in extra.get(group, []):
            ep = md.EntryPoint(name, value, group)
            object.__setattr__(ep, "dist", Dist(dist))     # an EntryPoint is frozen; its dist names the package
            eps.append(ep)
        return eps
    monkeypatch.setattr(host_module.importlib.metadata, "entry_points", entry_points)
