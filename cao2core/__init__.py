"""cao2: dataset distillation with pretrained generators (CaO2).

The public API (``docs/api.md``)::

    import cao2core as cao2
    run = cao2.distill(cao2.RunConfig(classes="0,1", ipc=1, out="x"))
    print(cao2.evaluate(cao2.EvalConfig(data=run.out)).accuracy)

Functions: ``distill``, ``refine``, ``evaluate``, ``compare``, ``ablate``, ``sweep``, ``load_generator``,
``export``.
Configurations: ``RunConfig``, ``EvalConfig``. Results: ``RunResult``, ``EvalResult``, ``CompareResult``,
``AblationResult``, ``SweepResult``, ``LoadedGenerator``, ``ExportResult``. Errors: ``UserError``.

The package is laid out by who opens it: ``generators/`` (the plugin contract), ``method/`` (the CaO2 run),
``store/`` (the run folder on disk), ``data/`` (label spaces, images, classifiers), ``scoring/`` (students),
``studies/`` (compare, ablate, sweep), ``kernels/`` (fused CLO ops); ``docs/architecture.md`` walks through them.
Names are imported on first use, so ``import cao2core`` (and ``cao2 --help``) does not load torch.
"""
__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "distill": "api", "refine": "api", "evaluate": "api", "compare": "api", "ablate": "api", "sweep": "api",
    "load_generator": "api", "LoadedGenerator": "api", "export": "api", "ExportResult": "share.export",
    "report": "api", "ReportResult": "share.report",
    "RunConfig": "config", "EvalConfig": "config",
    "RunResult": "method.engine", "EvalResult": "scoring.evaluation", "CompareResult": "studies.compare",
    "AblationResult": "studies.ablate", "SweepResult": "studies.sweep",
    "UserError": "errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value     # once imported, a plain attribute
        return value
    raise AttributeError(f"module 'cao2core' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
