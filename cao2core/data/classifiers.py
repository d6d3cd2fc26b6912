"""Selection classifiers: any timm model, a local checkpoint, or the embedded MNIST judge.

The MNIST judge is registered in timm's registry, so ``timm.create_model("mnist_cnn")`` builds it like any
other timm architecture and the engine needs no special case for it.

What the classifier sees of a decoded sample (``CLASSIFIER_INPUTS``, ``--classifier-input``):

* ``timm``: clamped to [-1, 1], mapped to [0, 1], then the classifier's own eval preprocessing (timm's data
  config: e.g. resize 256, centre crop 224, ImageNet mean/std for ResNet-18).
* ``raw``: the decoder output as it is (unclamped, in about [-1, 1]) resized to the classifier's input size with
  no crop and no normalization, as the official CaO2 DiT scripts feed ``Resize((224, 224))(samples)`` to ResNet-18.
* ``jpeg``: written as an 8-bit image, JPEG-encoded and read back (PIL's default quality 75), short side resized
  to the input size, [0, 1] and the classifier's mean/std, as the official CaO2 MAR script classifies its buffer.
"""
from __future__ import annotations

import importlib.resources
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import timm
import timm.data
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from timm.models import register_model
from torch import nn

from ..generators import weights
from ..errors import UserError
from .labels import LabelSpace


class MnistCNN(nn.Module):
    """3 x (conv3x3 + ReLU + maxpool) with 32/64/64 channels, then FC 1024 -> 128 -> classes; input 32x32 in [-1, 1]."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, drop_rate: float = 0.2, **_):
        super().__init__()
        layers, c = [], in_chans
        for width in (32, 64, 64):
            layers += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(inplace=True),
                                  nn.Dropout(drop_rate), nn.Linear(128, num_classes))
        self.num_classes = num_classes
        # timm-style metadata: how this model wants its input (images in [-1, 1], no resize).
        self.pretrained_cfg = {"input_size": (in_chans, 32, 32), "mean": (0.5,), "std": (0.5,),
                               "crop_pct": 1.0, "interpolation": "bilinear", "num_classes": num_classes}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_model
def mnist_cnn(pretrained: bool = False, **kwargs) -> MnistCNN:
    if pretrained:
        raise ValueError("mnist_cnn has no hub weights; load the embedded checkpoint through cao2core.data.classifiers")
    kwargs.pop("pretrained_cfg", None)
    kwargs.pop("pretrained_cfg_overlay", None)
    return MnistCNN(**kwargs)


# --- loading -------------------------------------------------------------------------------------------------


DEFAULT_IMAGENET_CLASSIFIER = "resnet18.tv_in1k"   # the weights of torchvision's resnet18, as the reference uses


def embedded_mnist_classifier() -> Path:
    return Path(str(importlib.resources.files("cao2core") / "assets" / "mnist_cnn.safetensors"))


@dataclass
class Classifier:
    """A frozen classifier with its own preprocessing and the class ids of its outputs, in order."""

    model: nn.Module
    classes: list[str] | None
    source: str
    sha256: str | None = None
    class_accuracy: dict[str, float] = field(default_factory=dict)
    input: str = "timm"         # what it sees of a decoded sample (CLASSIFIER_INPUTS)
    flag: str = "--classifier"  # the flag that gave it (--teacher for cao2 eval): messages name its -arch/-classes

    def __post_init__(self):
        self.model.eval().requires_grad_(False)
        _match_input_channels(self.model)
        self.data_config = timm.data.resolve_data_config({}, model=self.model)
        self.transform = timm.data.create_transform(**self.data_config)
        self.in_chans, self.size = self.data_config["input_size"][0], self.data_config["input_size"][-1]

    def output_indices(self, space: LabelSpace) -> list[int]:
        """The output index of each class of ``space``; refuses a classifier whose class list does not cover it."""
        if self.classes is None:
            raise UserError(f"classifier {self.source} does not say which class each output is; "
                            f"give its class ids with {self.flag}-classes FILE (one per line, in output order)")
        index = {c: i for i, c in enumerate(self.classes)}
        missing = [c for c in space.ids if c not in index]
        if missing:
            raise UserError(f"classifier {self.source} has no output for class {missing[0]!r} of dataset "
                            f"{space.name}; use a classifier trained on this label space")
        return [index[c] for c in space.ids]

    @torch.no_grad()
    def probs(self, pixels: torch.Tensor) -> torch.Tensor:
        """Softmax over the classifier's outputs for decoded pixels in about [-1, 1], seen as ``input`` says."""
        device = next(self.model.parameters()).device
        return self.model(self.prepare(pixels).to(device)).float().softmax(-1)

    def prepare(self, pixels: torch.Tensor) -> torch.Tensor:
        """The classifier's input batch for decoded pixels (B, C, H, W)."""
        if self.input == "raw":
            return F.interpolate(self._channels(pixels.float()), size=(self.size, self.size), mode="bilinear",
                                 align_corners=False, antialias=True)
        if self.input == "jpeg":
            return torch.stack([self._jpeg(p) for p in pixels])
        return self.transform(self._channels((pixels.clamp(-1, 1) + 1) / 2))

    def _channels(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == self.in_chans:
            return x
        return x.expand(-1, self.in_chans, -1, -1) if x.shape[1] == 1 else x.mean(1, keepdim=True)

    def _jpeg(self, pixels: torch.Tensor) -> torch.Tensor:
        # 8 bits as torchvision's save_image rounds them, then a JPEG file read back as the official buffer is
        arr = ((pixels.float().clamp(-1, 1) + 1) / 2 * 255 + 0.5).clamp(0, 255).to(torch.uint8).cpu().numpy()
        image = Image.fromarray(arr[0], "L") if arr.shape[0] == 1 else Image.fromarray(arr.transpose(1, 2, 0), "RGB")
        buf = io.BytesIO()
        image.save(buf, format="JPEG")
        image = Image.open(io.BytesIO(buf.getvalue())).convert("L" if self.in_chans == 1 else "RGB")
        w, h = image.size      # the short side to the input size, the long one truncated, as torchvision's Resize
        image = image.resize((self.size, int(self.size * h / w)) if w <= h else (int(self.size * w / h), self.size),
                             Image.BILINEAR)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).reshape(image.size[1], image.size[0], -1)
        mean = torch.tensor(self.data_config["mean"]).view(-1, 1, 1)
        std = torch.tensor(self.data_config["std"]).view(-1, 1, 1)
        return (x.permute(2, 0, 1) - mean) / std


def _match_input_channels(model: nn.Module) -> None:
    """Make the model's ``pretrained_cfg`` describe the channels its first convolution takes. timm keeps the RGB
    config of an architecture built with another ``in_chans`` (resnet18 for grayscale digits), so its data config
    would feed 3 channels to a 1-channel stem; the means and stds are averaged over the channels."""
    cfg = getattr(model, "pretrained_cfg", None)
    chans = _first_conv_channels(model)
    if not isinstance(cfg, dict) or chans is None:
        return
    size = tuple(cfg.get("input_size") or (3, 224, 224))
    if size[0] == chans:
        return
    mean, std = (cfg.get(key) or default for key, default in (("mean", timm.data.IMAGENET_DEFAULT_MEAN),
                                                              ("std", timm.data.IMAGENET_DEFAULT_STD)))
    # a new dict: timm may share the config object with its registry and other models of the architecture
    model.pretrained_cfg = {**cfg, "input_size": (chans, *size[1:]),
                            "mean": (sum(mean) / len(mean),) * chans, "std": (sum(std) / len(std),) * chans}


def _first_conv_channels(model: nn.Module) -> int | None:
    """The input channels of the model's stem: the layer its config names ``first_conv``, else its first Conv2d."""
    cfg = getattr(model, "pretrained_cfg", None)
    first = cfg.get("first_conv") if isinstance(cfg, dict) else None
    stem = None
    if isinstance(first, str):
        try:
            stem = model.get_submodule(first)
        except AttributeError:
            stem = None
    if not isinstance(stem, nn.Conv2d):
        stem = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return stem.in_channels if stem is not None else None


def load_classifier(spec: str | None, space: LabelSpace, device: torch.device, arch: str | None = None,
                    classes_file: str | None = None, input: str = "timm", flag: str = "--classifier") -> Classifier:
    """A timm model name (hub weights), a local .safetensors/.pt checkpoint, or None for the dataset's default;
    ``input`` says what it sees of a decoded sample (``CLASSIFIER_INPUTS``); ``flag`` the option that named it
    (``--teacher``: messages then name --teacher-arch and --teacher-classes)."""
    if spec is None:
        if space.generator_space not in ("mnist", "in1k"):
            role, instead = (("selection classifier", "or --select none|random") if flag == "--classifier" else
                             ("teacher", "or a hard-label --protocol"))
            raise UserError(f"label space {space.name} has no default {role}: pass {flag} (a checkpoint "
                            f"whose metadata names its classes, or a timm model with {flag}-classes) {instead}")
        spec = str(embedded_mnist_classifier()) if space.generator_space == "mnist" else DEFAULT_IMAGENET_CLASSIFIER
    path = Path(spec)
    if path.suffix in (".safetensors", ".pt", ".pth", ".bin") or path.exists():
        clf = _load_local(path, arch, flag)
    else:
        clf = _load_timm(spec, flag)
    clf.flag = flag
    if classes_file is not None:
        clf.classes = read_class_list(classes_file, f"{flag}-classes")
    if clf.classes is not None and len(clf.classes) != _num_outputs(clf.model):
        raise UserError(f"classifier {clf.source} has {_num_outputs(clf.model)} outputs but its class list has "
                        f"{len(clf.classes)} entries; fix the class list")
    clf.input = input
    clf.model.to(device)
    return clf


def read_class_list(path: str, flag: str) -> list[str]:
    """Class ids in output order, the first word of each non-empty line of ``path``."""
    try:
        lines = [ln.split()[0] for ln in Path(path).read_text().splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{flag} {path}: cannot read it ({getattr(exc, 'strerror', None) or exc}); give a text file "
                        "with one class id per line, in the classifier's output order") from None
    if not lines:
        raise UserError(f"{flag} {path} lists no class; give one class id per line, in the classifier's output order")
    refuse_duplicates(lines, f"{flag} {path}", "give each class id once, in the classifier's output order")
    return lines


def refuse_duplicates(classes: list[str], where: str, fix: str) -> None:
    """Refuse a class list naming an id twice: the first output would score both entries' class."""
    seen = set()
    for cid in classes:
        if cid in seen:
            raise UserError(f"{where} lists class {cid!r} twice; {fix}")
        seen.add(cid)


def _num_outputs(model: nn.Module) -> int:
    return int(getattr(model, "num_classes", 0) or model.pretrained_cfg.get("num_classes", 0))


def _load_timm(name: str, flag: str) -> Classifier:
    if name.split(".")[0] not in timm.list_models():
        raise UserError(f"classifier {name!r} is neither a file nor a timm model name; "
                        "give a timm name (e.g. resnet18.tv_in1k) or a checkpoint path")
    overlay = {"file": str(f)} if (f := _hub_weights(name, flag)) is not None else None
    try:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay)
    except Exception as exc:  # hub unreachable, unknown tag, ...
        raise UserError(f"cannot load timm classifier {name!r} ({type(exc).__name__}: {exc}); "
                        "check the name and network access, or pass a local checkpoint") from None
    subset = timm.data.infer_imagenet_subset(model)
    classes = timm.data.ImageNetInfo(subset).label_names() if subset == "imagenet-1k" else None
    return Classifier(model, classes, name)


def _hub_weights(name: str, flag: str) -> Path | None:
    """The local file of a timm model's hub weights, from the hub cache before any network call (timm's own
    download asks the hub first and, offline, waits about a minute before using the cache); None for a model
    whose weights are not on the hub (timm fetches those from their URL itself). Not cached and not
    downloadable now (HF_HUB_OFFLINE, hub unreachable) is one UserError at once."""
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError as exc:      # an unknown pretrained tag
        raise UserError(f"classifier {name!r}: {exc}; give a timm name with a published tag "
                        "(e.g. resnet18.tv_in1k) or a checkpoint path") from None
    repo = getattr(cfg, "hf_hub_id", None)
    if not repo:
        return None
    repo, _, revision = repo.partition("@")
    if revision:    # a pinned revision: timm resolves it itself
        return None
    files = [cfg.hf_hub_filename] if getattr(cfg, "hf_hub_filename", None) else ["model.safetensors",
                                                                                "pytorch_model.bin"]
    try:
        return weights.hub_files(repo, [(f,) for f in files])[0]
    except weights.HubMiss as why:
        raise UserError(weights.hub_miss_message(
            f"the weights of classifier {name}:", repo, why,
            f"pass {flag} with a local checkpoint (a .safetensors or .pt state dict, with {flag}-arch "
            f"and {flag}-classes unless its metadata names them), or set HF_HOME to a cache that holds it")) from None


def _load_local(path: Path, arch: str | None, flag: str) -> Classifier:
    if not path.is_file():
        raise UserError(f"classifier checkpoint {path} not found; give an existing file or a timm model name")
    meta: dict[str, str] = {}
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            state = load_file(str(path))
        else:
            state = weights.torch_load(path)
            state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    except Exception as exc:
        raise UserError(f"cannot read classifier checkpoint {path}: {weights.load_error(exc)}") from None
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise UserError(f"classifier checkpoint {path} is not a state dict of tensors (it holds "
                        f"{_what(state)}); save it with torch.save(model.state_dict(), ...) or as safetensors")
    arch = arch or meta.get("arch")
    if not arch:
        raise UserError(f"classifier checkpoint {path} does not name its architecture; pass {flag}-arch")
    num_classes = _meta_count(meta, "num_classes", path) or _infer_num_classes(state, path)
    convs = [v for v in state.values() if v.ndim == 4]
    in_chans = _meta_count(meta, "in_chans", path) or (convs[0].shape[1] if convs else 3)
    model = _create(arch, path, flag, num_classes=num_classes, in_chans=in_chans)
    # after the model exists: what it declares as integer buffers (BatchNorm's counters) is no quantized weight
    weights.require_floating(state, path, model)
    try:
        weights.load_into(model, state)     # a memory-mapped checkpoint's tensors become the parameters
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"classifier checkpoint {path} does not fit architecture {arch}: {first}") from None
    classes = _meta_classes(meta, path, flag)
    class_accuracy = _meta_accuracy(meta, classes, path)
    return Classifier(model, classes, str(path), weights.file_sha256(path), class_accuracy)


def _what(value) -> str:
    """What a checkpoint holds instead of a state dict, in a few words."""
    def kind(obj) -> str:
        name = type(obj).__name__
        return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"
    if not isinstance(value, dict):
        return kind(value)
    if not value:
        return "no tensor"
    odd = next((v for v in value.values() if not isinstance(v, torch.Tensor)), None)
    return "keys that are not names" if odd is None else f"{kind(odd)} among its entries"


def _create(arch: str, path: Path, flag: str, **kwargs) -> nn.Module:
    """timm's ``arch`` with random weights; an unknown name or one that cannot be built is one UserError."""
    if ":" not in arch and not timm.is_model(arch):     # hf-hub:... names are resolved by create_model itself
        raise UserError(f"classifier checkpoint {path}: architecture {arch!r} is not a timm model; give a timm name "
                        f"(e.g. resnet18) with {flag}-arch, or fix the checkpoint's 'arch' metadata")
    try:
        return timm.create_model(arch, pretrained=False, **kwargs)
    except Exception as exc:
        raise UserError(f"classifier checkpoint {path}: cannot build architecture {arch} with {kwargs} "
                        f"({type(exc).__name__}: {' '.join(str(exc).split())[:160]}); fix {flag}-arch or "
                        "the checkpoint's metadata") from None


def _meta_count(meta: dict[str, str], key: str, path: Path) -> int | None:
    """A positive whole number from the checkpoint's metadata (None: not there)."""
    if key not in meta:
        return None
    try:
        value = int(meta[key])
    except (TypeError, ValueError):
        value = 0
    if value < 1:
        raise UserError(f"classifier checkpoint {path}: metadata {key}={meta[key]!r} is not a positive whole "
                        f"number; fix or drop the {key!r} entry of its metadata")
    return value


def _meta_json(meta: dict[str, str], key: str, path: Path, expected: str):
    try:
        return json.loads(meta[key])
    except (TypeError, ValueError):
        raise UserError(f"classifier checkpoint {path}: metadata {key!r} is not valid JSON; it must be {expected}"
                        ) from None


def _meta_classes(meta: dict[str, str], path: Path, flag: str) -> list[str] | None:
    """The class ids of the outputs, in order, from the metadata's ``classes`` (None: not there)."""
    if "classes" not in meta:
        return None
    expected = 'a JSON list of class id strings in output order (e.g. ["0", "1"])'
    classes = _meta_json(meta, "classes", path, expected)
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise UserError(f"classifier checkpoint {path}: metadata 'classes' must be {expected}")
    refuse_duplicates(classes, f"classifier checkpoint {path}: metadata 'classes'",
                      f"fix the checkpoint's metadata or give {flag}-classes FILE")
    return classes


def _meta_accuracy(meta: dict[str, str], classes: list[str] | None, path: Path) -> dict[str, float]:
    """Validation accuracy per class id from the metadata's ``class_accuracy``: a list in the order of ``classes``
    or an object {class id: accuracy}; every accuracy a finite number ({}: not there)."""
    if "class_accuracy" not in meta:
        return {}
    expected = ("a JSON list of accuracies in the order of 'classes', or an object {class id: accuracy}, "
                "of finite numbers")
    acc = _meta_json(meta, "class_accuracy", path, expected)
    if isinstance(acc, list):
        if classes is None:
            return {}       # nothing says which class each entry is; --condition auto asks for --class-accuracy
        if len(acc) != len(classes):
            raise UserError(f"classifier checkpoint {path}: metadata 'class_accuracy' has {len(acc)} entries for "
                            f"{len(classes)} classes; it must be {expected}")
        acc = dict(zip(classes, acc))
    if not isinstance(acc, dict):
        raise UserError(f"classifier checkpoint {path}: metadata 'class_accuracy' must be {expected}")
    for cid, value in acc.items():
        # bool is an int to Python, and NaN compares false with every threshold: neither is an accuracy
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UserError(f"classifier checkpoint {path}: metadata 'class_accuracy' of class {cid!r} is "
                            f"{json.dumps(value)}; it must be {expected}")
    return {cid: float(value) for cid, value in acc.items()}


def _infer_num_classes(state: dict, path: Path) -> int:
    last = [v for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
    if not last:
        raise UserError(f"cannot tell the number of classes of classifier checkpoint {path}; save it as "
                        "safetensors with metadata num_classes")
    return int(last[-1].shape[0])