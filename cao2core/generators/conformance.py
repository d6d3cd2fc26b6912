"""The conformance kit: a third-party generator package checks its plugin against the cao2 contract in its own
test suite, the way diffusers ships test mixins.

    from .conformance import GeneratorConformance

    class TestMyGenerator(GeneratorConformance):
        generator = "mygen"                     # the entry-point name (or the plugin module itself)
        options = {"model": "tests/tiny-model"} # the plugin's smallest configuration

Every ``check_*`` function is also usable on its own; ``check_generator`` runs them all and returns the failures.
Each failure says which hook broke which rule, in words a plugin author can act on; a check that does not apply to
the plugin (no ``cao2_encode``, a one-step sampler) is skipped (``pytest.skip``), not passed.
"""
from __future__ import annotations

import types
import warnings

import pytest
import torch

from .hookspecs import CONDITION_KINDS, CONTRACT, generic_options
from .host import Generator, Host
from .seeding import unit_generators

CPU = torch.device("cpu")
PIXEL_WARNING = 10      # decoded values beyond this are no pixels in [-1, 1] that went a little over


class GeneratorUnderTest:
    """A generator loaded for the checks, as ``cao2 run`` loads it: its hooks (checked by the host), the
    configuration it was loaded with, its handle and its latent spec."""

    def __init__(self, generator, options: dict | None = None, device: torch.device = CPU):
        host = Host(load_entry_points=not isinstance(generator, types.ModuleType))
        if isinstance(generator, types.ModuleType):
            host.register(generator, generator.__name__, kind="generator")
            generator = generator.__name__
        self.gen: Generator = host.generator(generator)
        self.options = dict(options or {})
        self.device = device
        self.handle = self.load(self.gen.contract)
        self.spec = self.gen.latent_spec(handle=self.handle)

    def load(self, contract: tuple[int, int]):
        """A fresh handle from ``cao2_load`` given the options a cao2 of ``contract`` passes: its generic options
        (None unless the configuration sets them) and the configuration's other keys, parsed as ``cao2 run`` parses
        them, so the plugin receives typed --gen-opt values (hookspecs.cao2_load)."""
        later = set(generic_options()) - set(generic_options(contract))
        opts = {**dict.fromkeys(generic_options(contract)),
                **{k: v for k, v in self.options.items() if k not in later}}
        return self.gen.load(options=self.gen.parse_options(opts), device=self.device)

    def labels(self, n: int) -> torch.Tensor:
        return torch.arange(n, device=self.device) % self.spec.num_classes

    def sample(self, labels: torch.Tensor, seeds: list[int], snapshot_steps=()) -> torch.Tensor:
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        return self.gen.sample(handle=self.handle, labels=labels, generators=gens,
                               snapshot_steps=list(snapshot_steps))

    def corrupt_predict(self, z: torch.Tensor, labels: torch.Tensor, kinds: list[str], rows=None):
        """Corrupt and predict; row r (``rows``, default 0..B-1) gets its own level, noise and generator."""
        rows = list(range(len(z))) if rows is None else rows
        lo, top = self.spec.level_range[0], self.spec.default_level_max
        levels = torch.tensor([lo + (r * 7919) % (top - lo + 1) for r in rows], device=self.device)
        noise = torch.stack([torch.randn(z.shape[1:], generator=g)
                             for g in unit_generators(0, 0, rows, "kit-noise")]).to(self.device)
        condition = self.gen.condition(handle=self.handle, labels=labels, kinds=kinds)
        corrupted = self.gen.corrupt(handle=self.handle, latents=z, levels=levels, noise=noise,
                                     generators=unit_generators(0, 1, rows, "kit"), level_max=top)
        return self.gen.predict(handle=self.handle, corrupted=corrupted, condition=condition)


def __getattr__(name: str):
    # the kit's previous name for GeneratorUnderTest, kept for plugins' tests until contract 2
    if name == "Loaded":
        warnings.warn("the conformance kit's Loaded is renamed GeneratorUnderTest; contract 2 removes the old name",
                      DeprecationWarning, stacklevel=2)
        return GeneratorUnderTest
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    return a.shape == b.shape and bool(((a - b).abs().max() <= tol * (1 + b.abs().max())).item())


def check_sample_shapes(k: GeneratorUnderTest) -> None:
    out = k.sample(k.labels(3), [0, 1, 2])         # the host checks type, shape and dtype
    assert torch.isfinite(out.latents).all(), "cao2_sample returned NaN or Inf latents for plain labels"


def check_sample_determinism(k: GeneratorUnderTest) -> None:
    a = k.sample(k.labels(2), [5, 6]).latents
    b = k.sample(k.labels(2), [5, 6]).latents
    c = k.sample(k.labels(2), [7, 8]).latents
    assert torch.equal(a, b), "cao2_sample gave different latents for the same per-sample generators"
    assert not torch.equal(a, c), "cao2_sample ignores the per-sample generators: other seeds gave the same latents"


def check_sample_uses_only_its_generators(k: GeneratorUnderTest) -> None:
    state = torch.get_rng_state()
    torch.manual_seed(123)
    a = k.sample(k.labels(2), [1, 2]).latents
    torch.manual_seed(456)
    b = k.sample(k.labels(2), [1, 2]).latents
    torch.set_rng_state(state)
    assert torch.equal(a, b), ("cao2_sample draws from torch's global RNG: every draw must come from the sample's "
                               "own generator (CPU torch.Generator objects; draw on CPU, then move)")


def check_sample_batch_independence(k: GeneratorUnderTest, tol: float = 1e-4) -> None:
    labels = k.labels(3)
    batch = k.sample(labels, [10, 11, 12]).latents
    alone = k.sample(labels[1:2], [11]).latents
    assert _close(batch[1:2], alone, tol), ("cao2_sample: a sample depends on the others in its batch (row 1 of 3 "
                                            "differs from the same label and generator alone)")


def check_contract_versions(k: GeneratorUnderTest) -> None:
    """A cao2 of every minor version up to the one the plugin states (this cao2's, if that is older) loads it: an
    older minor version passes fewer generic options, so the plugin must not need a later version's keys."""
    major, stated = k.gen.contract
    try:
        for minor in range(min(stated, CONTRACT[1]) + 1):
            try:
                k.gen.latent_spec(handle=k.load((major, minor)))
            except Exception as exc:
                raise AssertionError(f"cao2_load with the options of contract {major}.{minor} (generic: "
                                     f"{', '.join(generic_options((major, minor)))}) failed: {exc}") from exc
    finally:
        k.gen.spec = k.spec          # the spec of the handle the other checks use


def check_snapshots(k: GeneratorUnderTest) -> None:
    if (k.spec.sample_steps or 0) < 2:
        pytest.skip(f"LatentSpec.sample_steps is {k.spec.sample_steps}: no step before the last to snapshot")
    out = k.sample(k.labels(2), [3, 4], snapshot_steps=[-2])
    assert not torch.equal(out.snapshots[-2], out.latents), "the snapshot one step before the end equals the final"


def check_decode(k: GeneratorUnderTest) -> None:
    """The rule ``cao2 run`` applies to every decode, applied by the same host check (``contract.pixel_problem``):
    (B, C, H, W) float, C 1 or 3, finite. Values far outside [-1, 1] pass, as in a run, which clamps them when it
    writes the images, but warn (uint8 0..255 by mistake?)."""
    z = k.sample(k.labels(2), [0, 1]).latents
    pixels = k.gen.decode(handle=k.handle, latents=z)       # a PluginError names what breaks the rule
    top = float(pixels.abs().max())
    if top > PIXEL_WARNING:
        warnings.warn(f"cao2_decode returned pixels up to {top:.3g}; they should be in about [-1, 1] (cao2 clamps "
                      "them when it writes the images): uint8 0..255 by mistake?", stacklevel=2)


def check_encode(k: GeneratorUnderTest) -> None:
    if not k.gen.implements("cao2_encode"):
        pytest.skip("the plugin has no cao2_encode (optional: cao2 refine needs it)")
    z = k.sample(k.labels(2), [0, 1]).latents
    pixels = k.gen.decode(handle=k.handle, latents=z)
    gens = lambda: [torch.Generator("cpu").manual_seed(s) for s in (3, 4)]   # noqa: E731
    a = k.gen.encode(handle=k.handle, pixels=pixels, generators=gens())
    b = k.gen.encode(handle=k.handle, pixels=pixels, generators=gens())
    assert torch.equal(a, b), "cao2_encode gave different latents for the same per-sample generators"
    assert torch.isfinite(a).all(), "cao2_encode returned NaN or Inf"


def check_conditions_and_gradient(k: GeneratorUnderTest) -> None:
    z0 = k.sample(k.labels(2), [0, 1]).latents.detach()
    preds = {}
    for kind in CONDITION_KINDS:
        z = z0.clone().requires_grad_(True)
        p = k.corrupt_predict(z, k.labels(2), [kind, kind])
        assert torch.isfinite(p.pred).all(), f"cao2_predict returned NaN or Inf under condition {kind!r}"
        loss = ((p.pred.float() - p.target.float()) ** 2).sum()
        if p.aux_loss is not None:
            loss = loss + p.aux_loss.sum()
        loss.backward()
        assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0, (
            f"under condition {kind!r} no finite gradient reaches the latents through cao2_corrupt and cao2_predict")
        preds[kind] = p.pred.detach()
    assert not torch.equal(preds["class"], preds["null"]), "the class and null conditions give the same prediction"
    frozen = [name for name, v in vars(k.handle).items() if isinstance(v, torch.nn.Module)
              and any(p.requires_grad for p in v.parameters())]
    assert not frozen, f"the generator is not frozen: {', '.join(frozen)} has parameters that require grad"


def check_predict_batch_independence(k: GeneratorUnderTest, tol: float = 1e-4) -> None:
    z = k.sample(k.labels(3), [0, 1, 2]).latents.detach()
    labels, kinds = k.labels(3), ["class", "null", "zero"]
    batch = k.corrupt_predict(z.clone().requires_grad_(True), labels, kinds).pred.detach()
    for r in range(3):
        alone = k.corrupt_predict(z[r:r + 1].clone().requires_grad_(True), labels[r:r + 1], kinds[r:r + 1], [r])
        assert _close(batch[r:r + 1], alone.pred.detach(), tol), (
            f"cao2_predict: row {r} of a batch differs from the same row alone (same level, noise and generator): "
            "a row must not depend on the other rows")


CHECKS = [check_contract_versions, check_sample_shapes, check_sample_determinism, check_sample_uses_only_its_generators,
          check_sample_batch_independence, check_snapshots, check_decode, check_encode,
          check_conditions_and_gradient, check_predict_batch_independence]


def check_generator(generator, options: dict | None = None, device: torch.device = CPU) -> list[str]:
    """Run every check; returns one line per failure (empty: the plugin conforms; a skipped check is no failure)."""
    try:
        loaded = GeneratorUnderTest(generator, options, device)
    except Exception as exc:
        return [f"loading: {exc}"]
    failures = []
    for check in CHECKS:
        try:
            check(loaded)
        except pytest.skip.Exception:
            pass
        except Exception as exc:      # a contract violation (PluginError) or a failed assertion
            failures.append(f"{check.__name__}: {exc}")
    return failures


class GeneratorConformance:
    """A pytest mixin: subclass it with ``generator`` (entry-point name or module) and ``options``."""

    generator = None
    options: dict = {}
    device = CPU

    @pytest.fixture(scope="class")
    @classmethod
    def loaded(cls):
        return GeneratorUnderTest(cls.generator, cls.options, cls.device)

    def test_contract_versions(self, loaded):
        check_contract_versions(loaded)

    def test_sample_shapes(self, loaded):
        check_sample_shapes(loaded)

    def test_sample_determinism(self, loaded):
        check_sample_determinism(loaded)

    def test_sample_uses_only_its_generators(self, loaded):
        check_sample_uses_only_its_generators(loaded)

    def test_sample_batch_independence(self, loaded):
        check_sample_batch_independence(loaded)

    def test_snapshots(self, loaded):
        check_snapshots(loaded)

    def test_decode(self, loaded):
        check_decode(loaded)

    def test_encode(self, loaded):
        check_encode(loaded)

    def test_conditions_and_gradient(self, loaded):
        check_conditions_and_gradient(loaded)

    def test_predict_batch_independence(self, loaded):
        check_predict_batch_independence(loaded)
