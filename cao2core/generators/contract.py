"""What each generator hook must return, checked where the return enters the engine.

A plugin that breaks the contract gets one line naming the plugin, the hook, what was expected and what came
back, instead of a traceback three calls later or, worse, wrong images written with exit 0. The checks look at
types, shapes and dtypes, and at values only where a wrong value would be written: the samples and the decoded
pixels are checked to be finite (one device synchronisation per call), and a description to be strict JSON.
"""
from __future__ import annotations

import json
import math

import torch

from ..errors import UserError
from .hookspecs import CLASSIFIER_INPUTS, Corrupted, GenOption, LatentSpec, Prediction, SampleOutput


class PluginError(UserError):
    """A plugin broke the contract or raised inside a hook."""


# what cao2 writes decoded pixels as: one channel (a grey PNG) or three (RGB)
PIXEL_CHANNELS = (1, 3)


def pixel_problem(pixels: torch.Tensor, latents: torch.Tensor) -> str | None:
    """What is wrong with ``pixels`` that ``cao2_decode`` made of ``latents``, by the rule both ``cao2 run`` and the
    conformance kit apply, or None: (B, C, H, W) float with C 1 or 3, finite wherever the latents are. Values
    outside [-1, 1] are no error: cao2 clamps them when it writes the images."""
    problem = _float_tensor(pixels, (len(latents), None, None, None), "decoded pixels (B, C, H, W)")
    if problem:
        return problem
    if pixels.shape[1] not in PIXEL_CHANNELS:
        return (f"decoded pixels should have 1 (grey) or 3 (RGB) channels, got {pixels.shape[1]} in shape "
                f"{tuple(pixels.shape)}")
    # rows decoded from non-finite latents (CLO diverged) are the run's to record as failed, not the decoder's
    broken = ~torch.isfinite(pixels).flatten(1).all(1)
    if isinstance(latents, torch.Tensor) and latents.ndim and len(latents) == len(pixels):
        broken &= torch.isfinite(latents.detach()).flatten(1).all(1).to(broken.device)
    count = int(broken.sum())             # the one device synchronisation
    if count:
        return f"returned NaN or Inf pixels for {count} of {len(pixels)} finite latents"
    return None


def non_finite_key(value, path: str = "") -> str | None:
    """The key (dotted, with [i] for list items) of the first NaN or Inf float in a JSON-like value, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return path or "(the value itself)"
    if isinstance(value, dict):
        items = ((f"{path}.{k}" if path else str(k), v) for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    return next((found for key, v in items if (found := non_finite_key(v, key)) is not None), None)


def _desc(value) -> str:
    """What a plugin returned, in a few words."""
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
    if value is None or isinstance(value, (int, float, str)):
        return f"{type(value).__name__} {value!r}"[:120]
    return type(value).__name__


def _float_tensor(value, shape: tuple | None, what: str) -> str | None:
    """The problem with ``value`` as a floating tensor of ``shape`` (None entries: any size), or None."""
    if not isinstance(value, torch.Tensor):
        return f"{what} should be a torch.Tensor, got {_desc(value)}"
    if not value.is_floating_point():
        return f"{what} should be floating point, got {_desc(value)}"
    if shape is not None and (value.ndim != len(shape) or any(s is not None and s != v
                                                              for s, v in zip(shape, value.shape))):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        return f"{what} should have shape {want}, got {tuple(value.shape)}"
    return None


def check_spec(spec) -> str | None:
    if not isinstance(spec, LatentSpec):
        return f"should return a cao2core.generators.hookspecs.LatentSpec, got {_desc(spec)}"
    if not (isinstance(spec.shape, tuple) and spec.shape and all(isinstance(s, int) and s > 0 for s in spec.shape)):
        return f"LatentSpec.shape should be a tuple of positive ints, got {spec.shape!r}"
    if not (isinstance(spec.num_classes, int) and spec.num_classes >= 1):
        return f"LatentSpec.num_classes should be a positive int, got {spec.num_classes!r}"
    lo, hi = spec.level_range
    if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= spec.default_level_max <= hi):
        return (f"LatentSpec needs level_range lo <= default_level_max <= hi (ints), got {spec.level_range!r} and "
                f"{spec.default_level_max!r}")
    if spec.reference_classifier_input not in CLASSIFIER_INPUTS:
        return (f"LatentSpec.reference_classifier_input should be one of {', '.join(CLASSIFIER_INPUTS)}, got "
                f"{spec.reference_classifier_input!r}")
    if spec.reference_selection_autocast not in (None, "fp16", "bf16"):
        return (f"LatentSpec.reference_selection_autocast should be None, 'fp16' or 'bf16', got "
                f"{spec.reference_selection_autocast!r}")
    if spec.sample_steps is not None and not (isinstance(spec.sample_steps, int) and spec.sample_steps >= 1):
        return f"LatentSpec.sample_steps should be a positive int or None, got {spec.sample_steps!r}"
    return None


def non_finite_samples(out: SampleOutput) -> list[int]:
    """The rows of a checked ``cao2_sample`` return that hold NaN or Inf, in their latents or a snapshot."""
    bad = ~torch.isfinite(out.latents).flatten(1).all(1)
    for snapshot in out.snapshots.values():
        bad |= ~torch.isfinite(snapshot).flatten(1).all(1).to(bad.device)
    return bad.nonzero().flatten().tolist()   # the one device synchronisation


def check(hook: str, result, args: dict, spec: LatentSpec | None) -> str | None:
    """The contract violation of ``result`` returned by ``hook`` called with ``args``, or None."""
    if hook == "cao2_load":
        return "returned None; it should return the loaded generator's handle" if result is None else None
    if hook == "cao2_latent_spec":
        return check_spec(result)
    if hook == "cao2_options":
        bad = [k for k, v in result.items() if not isinstance(v, GenOption)] if isinstance(result, dict) \
            else ["(not a dict)"]
        return f"should return {{key: GenOption}}, got {bad[0]!r}" if bad else None
    if hook == "cao2_label_spaces":
        ok = isinstance(result, dict) and all(
            isinstance(v, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in v)
            for v in result.values())
        return None if ok else "should return {name: [(class id, class name), ...]}"
    if hook == "cao2_describe":
        if not isinstance(result, dict):
            return f"should return a dict for the manifest, got {_desc(result)}"
        key = non_finite_key(result)
        if key is not None:
            return (f"returned NaN or Infinity at key {key!r}: the manifest is strict JSON, which has neither "
                    "(record None, or the value as a string)")
        try:
            json.dumps(result, allow_nan=False)
        except (TypeError, ValueError) as exc:
            return f"should return JSON-serialisable values for the manifest ({exc})"
        return None
    shape = spec.shape if spec is not None else None
    if hook == "cao2_sample":
        n = len(args["labels"])
        if not isinstance(result, SampleOutput):
            return f"should return a cao2core.generators.hookspecs.SampleOutput, got {_desc(result)}"
        problem = _float_tensor(result.latents, (n, *shape) if shape else None,
                                f"SampleOutput.latents for {n} labels")
        if problem:
            return problem
        wanted = set(args.get("snapshot_steps") or [])
        if not isinstance(result.snapshots, dict) or not wanted <= set(result.snapshots):
            got = sorted(result.snapshots) if isinstance(result.snapshots, dict) else _desc(result.snapshots)
            return f"SampleOutput.snapshots should hold the asked steps {sorted(wanted)}, got {got}"
        for step in wanted:
            problem = _float_tensor(result.snapshots[step], tuple(result.latents.shape), f"snapshot {step}")
            if problem:
                return problem
        return None
    if hook == "cao2_decode":
        return pixel_problem(result, args["latents"])
    if hook == "cao2_encode":
        return _float_tensor(result, (len(args["pixels"]), *shape) if shape else None, "encoded latents")
    if hook == "cao2_condition":
        return "returned None; it should return the condition predict takes" if result is None else None
    if hook == "cao2_corrupt":
        if not isinstance(result, Corrupted):
            return f"should return a cao2core.generators.hookspecs.Corrupted, got {_desc(result)}"
        n = len(args["latents"])
        return (_float_tensor(result.inputs, None, "Corrupted.inputs")
                or _float_tensor(result.target, None, "Corrupted.target")
                or (None if len(result.target) == n and len(result.inputs) == n
                    else f"Corrupted.inputs and target should have {n} rows, got {len(result.inputs)} and "
                         f"{len(result.target)}"))
    if hook == "cao2_predict":
        inputs = getattr(args["corrupted"], "inputs", None)
        needs_grad = isinstance(inputs, torch.Tensor) and inputs.requires_grad and torch.is_grad_enabled()
        return _check_prediction(result, len(args["corrupted"].target), needs_grad)
    return None


def _check_prediction(result, n: int, needs_grad: bool) -> str | None:
    if not isinstance(result, Prediction):
        return f"should return a cao2core.generators.hookspecs.Prediction, got {_desc(result)}"
    problem = (_float_tensor(result.pred, None, "Prediction.pred")
               or _float_tensor(result.target, tuple(result.pred.shape), "Prediction.target (the shape of pred)"))
    if problem:
        return problem
    if len(result.pred) != n:
        return f"Prediction.pred should have {n} rows (one per latent), got {len(result.pred)}"
    if needs_grad and not result.pred.requires_grad:
        return ("Prediction.pred carries no gradient (computed under torch.no_grad, or detached?): CLO needs it to "
                "reach the latents through the frozen generator")
    if result.weight is not None:
        if not isinstance(result.weight, torch.Tensor):
            return f"Prediction.weight should be a tensor or None, got {_desc(result.weight)}"
        try:
            torch.broadcast_shapes(result.weight.shape, result.pred.shape)
        except RuntimeError:
            return f"Prediction.weight {tuple(result.weight.shape)} does not broadcast to pred {tuple(result.pred.shape)}"
    if result.aux_loss is not None:
        problem = _float_tensor(result.aux_loss, (n,), "Prediction.aux_loss (one per latent)")
        if problem:
            return problem
    return None
