"""The training protocols of ``cao2 eval``: train a fresh student on a (distilled or real) set, test on real data.

``hard``          cross-entropy on the set's labels.
``rded``          a frozen teacher labels every augmented batch online; the student minimises
                  T^2 * KL(teacher_T || student_T); AdamW, cosine schedule to 0, random-resized crop + flip + CutMix;
                  the figure is the final epoch's accuracy.
``rded-faithful`` RDED's / CaO2's evaluation as their code runs it: the cosine only decays to half the base lr
                  (a quarter period, stepped per epoch), KL at T=20 without the T^2 factor, a 2x2 patch shuffle of
                  the training images, and the figure is the best test accuracy among the evaluations in the
                  last 20% of training.

Each repeat r draws everything from its own generators: student initialisation, batch order and augmentation
are seeded by (seed, r, stream), so a repeat is reproducible on its own and independent of the others.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field

import timm.data
import torch
import torch.nn.functional as F

from ..data.classifiers import Classifier
from ..errors import UserError
from ..data.labels import LabelSpace
from ..generators.seeding import unit_seed
from .augment import AugmentSpec, augment
from .data import ImageSet
from .students import create_student


CL = torch.channels_last     # NHWC: about 25% faster convolutions on CPU, and the usual layout on GPU


@dataclass(frozen=True)
class Protocol:
    name: str
    soft: bool               # teacher soft labels (KL) instead of hard labels (CE)
    lr_floor: float          # the cosine schedule ends at lr * lr_floor
    per_epoch_schedule: bool  # the lr changes once per epoch (RDED) instead of every step
    t_squared: bool          # multiply the KL by T^2 (Hinton et al.) so gradients keep their scale
    patch_shuffle: bool
    headline: str            # "final" or "best-last-20%"
    temperature: float | None
    cutmix: bool


PROTOCOLS = {
    "hard": Protocol("hard", soft=False, lr_floor=0.0, per_epoch_schedule=False, t_squared=False,
                     patch_shuffle=False, headline="final", temperature=None, cutmix=False),
    "rded": Protocol("rded", soft=True, lr_floor=0.0, per_epoch_schedule=False, t_squared=True,
                     patch_shuffle=False, headline="final", temperature=20.0, cutmix=True),
    "rded-faithful": Protocol("rded-faithful", soft=True, lr_floor=0.5, per_epoch_schedule=True, t_squared=False,
                              patch_shuffle=True, headline="best-last-20%", temperature=20.0, cutmix=True),
}


@dataclass
class Settings:
    protocol: str
    student: str
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    optimizer: str
    temperature: float | None
    augment: AugmentSpec
    eval_every: int
    repeats: int
    seed: int
    channels: int
    image_size: int
    mean: tuple
    std: tuple
    eval_batch_size: int = 500
    workers: int = 0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["augment"] = asdict(self.augment)
        return d


def lr_factor(protocol: Protocol, step: int, steps: int, epoch: int, epochs: int) -> float:
    """Multiplier of the base lr for the update at (0-based) ``step`` of ``steps`` in (0-based) ``epoch``."""
    if protocol.per_epoch_schedule:
        # RDED: 0.5 * (1 + cos(pi * e / E / 2)) per epoch: a quarter period, from 1 down to 0.5
        return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs / 2))
    cosine = 0.5 * (1.0 + math.cos(math.pi * step / steps))
    return protocol.lr_floor + (1.0 - protocol.lr_floor) * cosine


def eval_epochs(epochs: int, every: int) -> list[int]:
    """The 1-based epochs after which the student is tested: every ``every`` epochs and always the last."""
    return sorted(set(range(every, epochs + 1, every)) | {epochs})


class Teacher:
    """A frozen classifier giving logits over the label space's classes, in the label space's order."""

    def __init__(self, clf: Classifier, space: LabelSpace, device: torch.device):
        self.index = torch.tensor(clf.output_indices(space), device=device)   # refuses a class-order mismatch
        cfg = timm.data.resolve_data_config({}, model=clf.model)
        self.in_chans = cfg["input_size"][0]
        self.mean = torch.tensor(cfg["mean"], device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(cfg["std"], device=device).view(1, -1, 1, 1)
        self.model = clf.model.to(device).eval()
        self.source = clf.source
        self.sha256 = clf.sha256

    @torch.no_grad()
    def logits(self, x01: torch.Tensor) -> torch.Tensor:
        if x01.shape[1] != self.in_chans:
            x01 = x01.expand(-1, self.in_chans, -1, -1) if x01.shape[1] == 1 else x01.mean(1, keepdim=True)
        return self.model((x01 - self.mean) / self.std).float()[:, self.index]


@dataclass
class RepeatResult:
    repeat: int
    seeds: dict
    curve: list = field(default_factory=list)     # one entry per epoch: epoch, train_loss, lr, [test_acc]
    final_acc: float = float("nan")
    best_acc: float = float("nan")
    best_epoch: int = 0
    headline_acc: float = float("nan")
    wall_s: float = 0.0
    test_s: float = 0.0                           # of wall_s, the time spent testing
    data: dict = field(default_factory=dict)


def _seeds(seed: int, repeat: int) -> dict:
    return {s: unit_seed(seed, repeat, 0, f"eval/{s}") for s in ("init", "order", "augment")}


@torch.no_grad()
def evaluate(model: torch.nn.Module, val: ImageSet, settings: Settings, device: torch.device) -> float:
    """Top-1 accuracy (%) on ``val``."""
    model.eval()
    mean, std = _norm(settings, device)
    correct = 0
    for x, y in val.batches(torch.arange(len(val)), settings.eval_batch_size, settings.workers):
        x = x.to(device, non_blocking=True).float().div_(255)
        pred = model(((x - mean) / std).contiguous(memory_format=CL)).argmax(1).cpu()
        correct += int((pred == y).sum())
    model.train()
    return 100.0 * correct / len(val)


def _norm(settings: Settings, device):
    return (torch.tensor(settings.mean, device=device).view(1, -1, 1, 1),
            torch.tensor(settings.std, device=device).view(1, -1, 1, 1))


def train_one(train: ImageSet, val: ImageSet, space: LabelSpace, settings: Settings, repeat: int,
              device: torch.device, teacher: Teacher | None = None, log=None) -> RepeatResult:
    """Train one student from scratch on ``train`` and test it on ``val`` at the evaluation epochs."""
    protocol = PROTOCOLS[settings.protocol]
    seeds = _seeds(settings.seed, repeat)
    result = RepeatResult(repeat, seeds)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seeds["init"])
        model = create_student(settings.student, len(space.ids), settings.channels, settings.image_size)
    model.to(device, memory_format=CL).train()
    if settings.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=0.9, weight_decay=settings.weight_decay)
    order_g = torch.Generator().manual_seed(seeds["order"])
    aug_g = torch.Generator().manual_seed(seeds["augment"])
    mean, std = _norm(settings, device)
    n = len(train)
    per_epoch = math.ceil(n / settings.batch_size)
    steps = per_epoch * settings.epochs
    tests = set(eval_epochs(settings.epochs, settings.eval_every))
    T = settings.temperature
    step = 0
    for epoch in range(settings.epochs):
        losses, lr = [], settings.lr
        for x, y in train.batches(torch.randperm(n, generator=order_g), settings.batch_size, settings.workers):
            lr = settings.lr * lr_factor(protocol, step, steps, epoch, settings.epochs)
            for group in opt.param_groups:
                group["lr"] = lr
            x = x.to(device, non_blocking=True).float().div_(255)
            y = y.to(device)
            x, mix = augment(x, settings.augment, aug_g)
            out = model(((x - mean) / std).contiguous(memory_format=CL))
            if protocol.soft:
                target = F.softmax(teacher.logits(x) / T, dim=1)
                loss = F.kl_div(F.log_softmax(out / T, dim=1), target, reduction="batchmean")
                if protocol.t_squared:
                    loss = loss * T * T
            elif mix is not None:
                perm, kept = mix
                loss = kept * F.cross_entropy(out, y) + (1 - kept) * F.cross_entropy(out, y[perm.to(device)])
            else:
                loss = F.cross_entropy(out, y)
            if not torch.isfinite(loss):
                raise UserError(f"training diverged (loss {float(loss)}) at epoch {epoch + 1} of repeat {repeat}; "
                                "lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
        entry = {"epoch": epoch + 1, "train_loss": sum(losses) / len(losses), "lr": lr}
        if epoch + 1 in tests:
            tic = time.perf_counter()
            entry["test_acc"] = evaluate(model, val, settings, device)
            result.test_s += time.perf_counter() - tic
            if log is not None:
                log(f"repeat {repeat}: epoch {epoch + 1}/{settings.epochs}  loss {entry['train_loss']:.4f}  "
                    f"test acc {entry['test_acc']:.2f}%")
        result.curve.append(entry)
    tested = [e for e in result.curve if "test_acc" in e]
    result.final_acc = tested[-1]["test_acc"]
    best = max(tested, key=lambda e: e["test_acc"])
    result.best_acc, result.best_epoch = best["test_acc"], best["epoch"]
    if protocol.headline == "best-last-20%":
        late = [e["test_acc"] for e in tested if e["epoch"] >= 0.8 * settings.epochs]
        result.headline_acc = max(late)
    else:
        result.headline_acc = result.final_acc
    result.wall_s = time.perf_counter() - start
    return result


def stderr_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
