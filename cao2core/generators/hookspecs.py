"""The generator contract: pluggy hookspecs (project ``cao2``) and the small types they exchange.

A generator plugin implements these hooks in one module and registers it under the ``cao2.generators``
entry-point group. The engine calls a generator's hooks only on that plugin (plus any cross-cutting plugins
from the ``cao2.plugins`` group, which may wrap them), so several generators can be installed side by side.

Latents are always the *scaled* latents the generator denoises, batched along dim 0. Pixels are in [-1, 1].

The contract is versioned (``CONTRACT``): a plugin states the version it was written for as ``CAO2_CONTRACT`` in
its module and receives only what that version defines; see docs/plugins.md, "Compatibility".
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol

import pluggy

if TYPE_CHECKING:      # the contract's types name torch's; importing it here would slow `cao2 --help`
    import torch

from ..errors import UserError

PROJECT = "cao2"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

# The contract's version (major, minor). A minor version only adds (a generic option, an optional hook, an
# argument a hook may take, a field with a default), so cao2 runs every plugin of its major version unchanged;
# anything else needs the next major version, and a plugin of another major version is set aside as BROKEN.
# 1.0: the hooks as of cao2 0.1 before --profile; 1.1 added the generic option ``profile``, the optional hooks
# ``cao2_options`` and ``cao2_label_spaces``, ``cao2_sample``'s ``progress`` and
# ``LatentSpec.reference_classifier_input`` (and later, without a version of its own, the defaulted
# ``LatentSpec.reference_selection_autocast``).
CONTRACT = (1, 1)
# what a plugin that states no version was written for: the contract before versions were stated
FIRST_CONTRACT = (1, 0)
# the plugin module's attribute that states its version, written out (CAO2_CONTRACT = (1, 1)), not imported from
# here: it says what the plugin's code knows, not what the installed cao2 speaks
CONTRACT_ATTRIBUTE = "CAO2_CONTRACT"

# What each version added to the generic load options (the keys cao2 fills from its own flags). A plugin receives
# the keys of its own version and the earlier ones of its major version, never a later version's: a key it cannot
# know about must not reach it.
GENERIC_OPTIONS_BY_VERSION: dict[tuple[int, int], tuple[str, ...]] = {
    (1, 0): ("model", "vae", "dataset", "sampler", "sample_steps", "guidance", "timestep_convention", "dtype"),
    (1, 1): ("profile",),
}
# The value of a generic option that asks nothing of a plugin beyond what the versions before the option did (None
# too): cao2 leaves a later version's option out of an older plugin's options only at such a value, and refuses
# another (the plugin could not honour it). Every option a minor version adds needs one.
NEUTRAL_VALUES: dict[str, Any] = {"profile": "default"}

# On their way out: {"cao2_HOOK", "cao2_HOOK(ARGUMENT)" or "options[KEY]": what to do instead}. An entry keeps
# working for the rest of its major version; cao2 warns (DeprecationWarning naming the plugin) when a plugin
# implements, takes or reads it, from one release before the next major version removes it.
DEPRECATED: dict[str, str] = {}


def generic_options(contract: tuple[int, int] | None = None) -> tuple[str, ...]:
    """The generic load options a plugin written for ``contract`` receives (None: every one this cao2 passes)."""
    contract = CONTRACT if contract is None else contract
    return tuple(key for version, keys in GENERIC_OPTIONS_BY_VERSION.items()
                 if version[0] == contract[0] and version <= contract for key in keys)


CONDITION_KINDS = ("class", "null", "zero")
# what the selection classifier sees of a decoded sample (see cao2core.data.classifiers)
CLASSIFIER_INPUTS = ("timm", "raw", "jpeg")


class Handle(Protocol):
    """What ``cao2_load`` returns and every other hook receives back: the plugin's own object, opaque to cao2.

    cao2 reads no attribute of it. It looks among its attributes (``vars(handle)``) for torch modules, to count the
    parameters for ``--dry-run`` and to check they are frozen (the conformance kit): keep the modules there.
    """


@dataclass(frozen=True)
class LatentSpec:
    """What the engine needs to know about a loaded generator."""

    shape: tuple[int, ...]          # one sample's latent shape, e.g. (4, 32, 32)
    num_classes: int                # labels are 0 .. num_classes-1
    level_range: tuple[int, int]    # allowed CLO corruption levels (inclusive), e.g. (1, 999) timesteps
    default_level_max: int          # T-hat used when the user gives none
    label_space: str | None = None  # the label space whose order the generator's labels follow ("mnist", "in1k",
    #                                 one of its cao2_label_spaces); None: any (text-conditioned), --dataset says
    corruption: str = "noise"       # "noise" (q_sample) or "mask" (token masking)
    sample_steps: int | None = None  # K, the sampler's step count (snapshot steps are 0 .. K-1)
    # how the generator's reference code fed decoded samples to the selection classifier, used under
    # --profile reference (one of CLASSIFIER_INPUTS; "timm" = the classifier's own preprocessing)
    reference_classifier_input: str = "timm"
    # the autocast ("fp16", "bf16") the generator's reference code decoded and classified the selection pool
    # under, applied under --profile reference on CUDA (None: fp32). A field with a default: no plugin must set it
    reference_selection_autocast: str | None = None


@dataclass
class SampleOutput:
    latents: torch.Tensor                                   # (B, *shape)
    snapshots: dict[int, torch.Tensor] = field(default_factory=dict)  # step -> latents at that step


def snapshot_steps_of(asked: list, steps: int) -> dict[int, int]:
    """Resolve ``cao2_sample``'s ``snapshot_steps`` for a ``steps``-step sampler: {0-based step: key as asked}."""
    wanted = {}
    for step in asked:
        resolved = step + steps if step < 0 else step
        if not 0 <= resolved < steps:
            raise UserError(f"snapshot step {step} does not exist in a {steps}-step sampler")
        wanted[resolved] = step
    return wanted


@dataclass
class Corrupted:
    """A corrupted batch as the generator's ``predict`` needs it; ``extras`` is the plugin's own business."""

    inputs: torch.Tensor
    levels: torch.Tensor
    target: torch.Tensor
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class Prediction:
    pred: torch.Tensor                   # (B, ...) prediction
    target: torch.Tensor                 # (B, ...) what it should equal
    weight: torch.Tensor | None = None   # optional per-element weight (e.g. a token mask), broadcastable to pred
    aux_loss: torch.Tensor | None = None  # optional (B,) extra per-sample loss added to the CLO loss


@dataclass(frozen=True)
class GenOption:
    """One ``--gen-opt KEY=VALUE`` key a generator takes, as ``cao2_options`` declares it."""

    help: str
    default: Any = None                          # shown by `cao2 plugins --verbose`; the plugin applies it
    parse: Callable[[str], Any] = str            # the value's text -> the value; raise ValueError for bad text
    choices: tuple[str, ...] | None = None       # the allowed texts, if it is a choice


# the keys of a generator's load options that come from the run's own flags (every version's of this major); the
# rest are --gen-opt pairs
GENERIC_OPTIONS = generic_options()


@hookspec(firstresult=True)
def cao2_load(options: dict, device: torch.device) -> Handle:
    """Load the generator (frozen, eval mode, on ``device``) and return an opaque handle.

    ``options`` holds the generic options of the plugin's contract version (``generic_options``), None when
    unset: ``model``, ``vae``, ``dataset`` (None: the plugin's default world), the sampling options, and from 1.1
    ``profile`` (``default`` or ``reference``: reproduce the generator's official CaO2 code where the default
    corrects it); then the ``--gen-opt key=value`` pairs. cao2 refuses unknown ``--gen-opt`` keys (declared with
    ``cao2_options``); raise ``cao2core.errors.UserError`` for bad checkpoints or bad values.
    """


@hookspec(firstresult=True)
def cao2_options() -> dict[str, GenOption]:
    """The ``--gen-opt`` keys this generator takes, ``{key: GenOption}`` (optional hook).

    cao2 refuses unknown keys and parses every value through its ``GenOption`` before ``cao2_load``, so the plugin
    receives typed values; ``cao2 plugins --verbose`` lists them. Without this hook the values arrive as text.
    (Contract 1.1.)
    """


@hookspec(firstresult=True)
def cao2_label_spaces() -> dict[str, list[tuple[str, str]]]:
    """Label spaces this generator's labels can refer to (optional): ``{name: [(class id, class name), ...]}`` in
    label order. ``--dataset NAME`` resolves through them, and a ``LatentSpec.label_space`` naming one needs no
    ``--dataset``; the generator label of a class is its position in the list. (Contract 1.1.)"""


@hookspec(firstresult=True)
def cao2_latent_spec(handle: Handle) -> LatentSpec:
    """Describe the latents, the label space and the CLO level range of a loaded generator."""


@hookspec(firstresult=True)
def cao2_describe(handle: Handle) -> dict:
    """Return what the manifest records about the loaded generator (checkpoints, sha256, resolved options), as
    strict JSON (no NaN or Infinity)."""


@hookspec(firstresult=True)
def cao2_sample(handle: Handle, labels: torch.Tensor, generators: list[torch.Generator], snapshot_steps: list[int],
                progress: Callable[[], None] | None) -> SampleOutput:
    """Sample one latent per label; sample i draws all its randomness from ``generators[i]`` only.

    ``progress()`` (contract 1.1; None when nothing draws a bar) may be called after each of the
    ``LatentSpec.sample_steps`` sampler steps, so the pool bar moves per step (a plugin that does not take the
    argument moves it per call).

    ``snapshot_steps``: 0-based sampler steps (negative ones count from the end, -1 = the last) whose state
    after that step is returned in ``SampleOutput.snapshots`` under the step as asked; the selection strategy
    ``stability`` asks for ``[-2]``. Raise ``UserError`` for a step the sampler does not have.
    """


@hookspec(firstresult=True)
def cao2_decode(handle: Handle, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> pixels in [-1, 1] (not clamped), shape (B, C, H, W) with C 1 or 3, finite where the
    latents are (``contract.pixel_problem``)."""


@hookspec(firstresult=True)
def cao2_encode(handle: Handle, pixels: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """Pixels in [-1, 1] -> scaled latents (optional hook)."""


@hookspec(firstresult=True)
def cao2_condition(handle: Handle, labels: torch.Tensor, kinds: list[str]) -> Any:
    """Build the condition for ``predict``: per sample, kind ``class``, ``null`` (CFG null) or ``zero``."""


@hookspec(firstresult=True)
def cao2_corrupt(handle: Handle, latents: torch.Tensor, levels: torch.Tensor, noise: torch.Tensor,
                 generators: list[torch.Generator], level_max: int) -> Corrupted:
    """Corrupt latents at per-sample ``levels`` with the fixed per-sample ``noise`` (noise or mask).

    ``level_max`` is the run's T-hat (``--clo-tmax``), the top of the levels' range, for generators that draw
    finer levels themselves from the samples' ``generators`` (MAR: one diffusion timestep per token)."""


@hookspec(firstresult=True)
def cao2_predict(handle: Handle, corrupted: Corrupted, condition: Any) -> Prediction:
    """Run the frozen generator on a corrupted batch; gradients flow to the latents only."""


REQUIRED_HOOKS = ("cao2_load", "cao2_latent_spec", "cao2_describe", "cao2_sample", "cao2_decode",
                  "cao2_condition", "cao2_corrupt", "cao2_predict")
OPTIONAL_HOOKS = ("cao2_encode", "cao2_options", "cao2_label_spaces")
