"""Per-dataset settings of the official CaO2 code, one flag away (``cao2 run --preset NAME``).

Each preset holds ``cao2 run`` options (flag names with underscores) and the accuracy the paper reports for it
(ResNet-18 student unless noted). Precedence: defaults < preset < ``--config`` file < command-line flags.

A preset states the official settings in the default profile's terms; ``reference`` holds what changes under
``--profile reference``. T-hat is the one such setting: the official "first 11 of the 50 respaced steps" is
T-hat 11 on the respaced index in the reference convention and T-hat 224 (the original timestep of index 11) on
the 1000-step scale of the default one. The official scripts derive k from the sampling steps (the CLO loop draws
from ``range(1, steps // 4)``, ``steps // 8`` for ImageNet-100), so a DiT preset holds that divisor
(``tmax_divisor``) and its T-hat follows ``--sample-steps``, as the DiT plugin's own reference default does.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UserError
from ..generators.respacing import space_timesteps


def derived_tmax(steps: int, divisor: int, convention: str) -> int:
    """T-hat of the official loop ``range(1, steps // divisor)``: its last k (at least 1, below ``steps``) in
    the reference convention; the original timestep of respaced step k on the 1000-step scale in the default
    one (50 steps, divisor 4: 11 and 224)."""
    k = max(1, min(steps // divisor - 1, steps - 1))
    return k if convention == "reference" else space_timesteps(1000, steps)[min(k, steps - 1)]

# The DiT scripts: 50-step ancestral DDPM at CFG 2.7, confidence selection, 100 CLO iterations of Adam 6e-4,
# lambda 10, null label.
_DIT_OFFICIAL = dict(generator="dit", sampler="ddpm", sample_steps=50, guidance=2.7, select="confidence",
                     clo_iters=100, clo_lr=6e-4, clo_lambda=10.0, condition="null")

# Stable Diffusion (the sd generator, SD 1.5 unless --model says otherwise) on a label space of class names: sampled
# at the model's own resolution with its shipped scheduler, stored at the dataset's (store_size); T-hat is the
# generator's default (the SD schedule's timestep with DiT's T-hat noise level, 299). Confidence selection needs the
# user's classifier of that label space (--classifier), or pass --select none.
_SD_CLASS_NAMES = dict(generator="sd", select="confidence", pool_factor=4, order="easy", clo_iters=100, clo_lr=6e-4,
                       clo_lambda=10.0, condition="null")

# SiT and REPA (the sit generator) with the DiT scripts' selection and CLO settings and the sampler each paper reports
# its FID with: SiT-XL/2 at CFG 1.5 with its SDE (250 steps, FID 2.06); REPA's SiT-XL/2 at CFG 1.8 on t in
# [0, 0.7] with its SDE (250 steps, FID 1.42). T-hat 224 is on DiT's scale: the sit generator maps level k to the
# interpolation time with DiT's noise level at k, so CLO sees the corruption DiT's presets apply (docs/sit.md). The
# family is stated, so a preset given the other code's checkpoint is refused rather than run with foreign settings.
_SIT_SAMPLER = dict(generator="sit", sampler="sde", sample_steps=250, guidance=1.5, gen_opt=["family=sit"])
_REPA_SAMPLER = dict(generator="sit", sampler="sde", sample_steps=250, guidance=1.8,
                     gen_opt=["family=repa", "guidance_high=0.7"])
_DIT_SELECTION_CLO = dict(select="confidence", clo_iters=100, clo_lr=6e-4, clo_lambda=10.0, condition="null")
# the DiT presets' T-hat at their 50 steps on DiT's 1000-step scale; fixed for sit, whose levels are that scale
# whatever its own sampler's step count
_SIT_T_HAT = derived_tmax(50, 4, "default")        # 224


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    options: dict
    paper: dict = field(default_factory=dict)    # "IPC10 (ResNet-18)" -> accuracy in %
    reference: dict = field(default_factory=dict)  # options that replace these under --profile reference
    tmax_divisor: int | None = None     # T-hat derived from the sampling steps (see derived_tmax)

    def options_for(self, profile: str | None, sample_steps: int | None = None,
                    convention: str | None = None) -> dict:
        """The preset's options under ``profile``; a derived T-hat follows ``sample_steps`` (default: the
        preset's) and the timestep ``convention`` (default: the profile's)."""
        values = {**self.options, **(self.reference if profile == "reference" else {})}
        if self.tmax_divisor:
            steps = sample_steps or values.get("sample_steps") or 50
            values["clo_tmax"] = derived_tmax(steps, self.tmax_divisor, convention or (
                "reference" if profile == "reference" else "default"))
        return values


def _sit_presets(family: str, model: str, sampler_text: str, sampler: dict) -> list[Preset]:
    """woof, nette and in1k for one family of the sit generator: the DiT presets' selection and CLO settings."""
    return [
        Preset(f"woof-{family}", f"ImageWoof with {model}, {sampler_text}; as woof: pool x4, easy order, T-hat 224 "
                                 "on DiT's scale, null label",
               dict(_DIT_SELECTION_CLO, **sampler, dataset="woof", pool_factor=4, order="easy", clo_tmax=_SIT_T_HAT)),
        Preset(f"nette-{family}", f"ImageNette with {model}, {sampler_text}; as nette: pool x2, easy order, "
                                  "0 CLO iterations (selection only)",
               dict(_DIT_SELECTION_CLO, **sampler, dataset="nette", pool_factor=2, order="easy", clo_iters=0,
                    clo_tmax=_SIT_T_HAT, condition="class")),
        Preset(f"in1k-{family}", f"ImageNet-1K with {model}, {sampler_text}; as in1k-dit: pool x4, easy order, "
                                 "T-hat 224 on DiT's scale, null label",
               dict(_DIT_SELECTION_CLO, **sampler, dataset="in1k", pool_factor=4, order="easy", clo_tmax=_SIT_T_HAT)),
    ]


PRESETS = {p.name: p for p in [
    Preset("woof", "ImageWoof as sample_woof.py: pool x4, easy order, T-hat 11 of 50 respaced steps, null label",
           dict(_DIT_OFFICIAL, dataset="woof", pool_factor=4, order="easy"),
           {"IPC10 (ResNet-18)": 45.6, "IPC50 (ResNet-18)": 68.9}, tmax_divisor=4),
    Preset("nette", "ImageNette as sample_nette.py: pool x2, easy order; the official script runs 0 CLO "
                    "iterations (selection only) -- see nette-clo",
           dict(_DIT_OFFICIAL, dataset="nette", pool_factor=2, order="easy", clo_iters=0, condition="class"),
           {"IPC10 (ResNet-18)": 65.0, "IPC50 (ResNet-50)": 82.7}, tmax_divisor=4),
    Preset("nette-clo", "ImageNette with CLO as on the other subsets: pool x2, easy, T-hat 11 of 50, null label",
           dict(_DIT_OFFICIAL, dataset="nette", pool_factor=2, order="easy"), tmax_divisor=4),
    Preset("in100", "ImageNet-100 as sample_imagenet100.py: pool x2, hard order, T-hat 5 of 50, null label",
           dict(_DIT_OFFICIAL, dataset="in100", pool_factor=2, order="hard"),
           {"IPC50 (ResNet-18)": 68.0}, tmax_divisor=8),
    Preset("in1k-dit", "ImageNet-1K as sample_imagenet.py: pool x4, easy order, T-hat 11 of 50, null label",
           dict(_DIT_OFFICIAL, dataset="in1k", pool_factor=4, order="easy"),
           {"IPC10 (ResNet-18)": 46.1, "IPC10 (ResNet-50)": 53.0}, tmax_divisor=4),
    Preset("in1k-mar", "ImageNet-1K with MAR-B as mar_imagenet1k.py: pool x2, stability selection, 32 AR steps, "
                       "CFG 2.9 (linear), zero label embedding",
           dict(generator="mar", dataset="in1k", pool_factor=2, select="stability", sample_steps=32, guidance=2.9,
                gen_opt=["cfg_schedule=linear"], condition="zero", clo_iters=100, clo_lr=6e-4, clo_lambda=10.0),
           {"IPC10 (ResNet-18)": 46.1}),
    Preset("cifar10-sd", "CIFAR-10 with Stable Diffusion: prompt 'a photo of a {name}', sampled at the model's "
                         "size (SD 1.5: 512 px) and stored at 32 px, pool x4 with your CIFAR-10 classifier "
                         "(--classifier), null condition",
           dict(_SD_CLASS_NAMES, dataset="cifar10", gen_opt=["prompt=a photo of a {name}", "store_size=32"])),
    Preset("cifar100-sd", "CIFAR-100 with Stable Diffusion: as cifar10-sd on the 100 fine labels",
           dict(_SD_CLASS_NAMES, dataset="cifar100", gen_opt=["prompt=a photo of a {name}", "store_size=32"])),
    *_sit_presets("sit", "SiT-XL/2 (SiT-XL-2-256.pt)", "SDE, 250 steps, CFG 1.5 on 3 channels", _SIT_SAMPLER),
    *_sit_presets("repa", "REPA's SiT-XL/2", "SDE, 250 steps, CFG 1.8 on t in [0, 0.7]", _REPA_SAMPLER),
    Preset("mnist", "the embedded MNIST world (DiT): pool x4, easy order, default timestep convention",
           dict(generator="dit", dataset="mnist", ipc=10, pool_factor=4, select="confidence", order="easy",
                clo_iters=100, condition="null")),
]}


def get(name: str) -> Preset:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; `cao2 presets` lists them: {', '.join(PRESETS)}")
    return PRESETS[name]


def table() -> str:
    lines = ["| preset | what | under --profile reference | paper |", "|---|---|---|---|"]
    for p in PRESETS.values():
        paper = ", ".join(f"{k} {v}" for k, v in p.paper.items()) or "-"
        changed = {k: v for k, v in p.options_for("reference").items() if p.options_for("default").get(k) != v}
        ref = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in changed.items()) or "-"
        if p.tmax_divisor:
            ref += f" (steps // {p.tmax_divisor} - 1 of --sample-steps)"
        lines.append(f"| {p.name} | {p.description} | {ref} | {paper} |")
    return "\n".join(lines)
