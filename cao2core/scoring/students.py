"""Students: any timm architecture, plus ConvNet-D registered in timm's registry.

ConvNet-3 is the dataset-distillation standard on small images: three blocks of conv3x3 (128 channels),
instance norm (GroupNorm with one group per channel, affine), ReLU and 2x2 average pooling, then one linear
layer. After ``import cao2core.scoring.students``, ``timm.create_model("convnet3", num_classes=10, in_chans=1)``
builds it like any timm model; ``img_size`` sizes the linear layer (default 32).
"""
from __future__ import annotations

import timm
import torch
from timm.models import register_model
from torch import nn

from ..errors import UserError

CONVNET_DEPTHS = (3, 4, 5, 6)


class ConvNet(nn.Module):
    def __init__(self, depth: int = 3, num_classes: int = 10, in_chans: int = 3, img_size: int | tuple = 32,
                 width: int = 128, drop_rate: float = 0.0, **_):
        super().__init__()
        h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)[-2:]
        layers, c = [], in_chans
        for _ in range(depth):
            if h < 2 or w < 2:
                raise ValueError(f"ConvNet-{depth} needs images of at least {2 ** depth} pixels a side, got {img_size}")
            layers += [nn.Conv2d(c, width, 3, padding=1), nn.GroupNorm(width, width, affine=True),
                       nn.ReLU(inplace=True), nn.AvgPool2d(2)]
            c, h, w = width, h // 2, w // 2
        self.features = nn.Sequential(*layers)
        self.drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(width * h * w, num_classes)
        self.num_classes = num_classes
        self.pretrained_cfg = {"input_size": (in_chans, h << depth, w << depth), "num_classes": num_classes,
                               "mean": (0.5,) * in_chans, "std": (0.5,) * in_chans, "crop_pct": 1.0,
                               "interpolation": "bilinear"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.features(x).flatten(1)))


def _factory(depth: int):
    def build(pretrained: bool = False, **kwargs) -> ConvNet:
        if pretrained:
            raise ValueError(f"convnet{depth} has no pretrained weights; train it or load a local checkpoint")
        kwargs.pop("pretrained_cfg", None)
        kwargs.pop("pretrained_cfg_overlay", None)
        return ConvNet(depth=depth, **kwargs)
    build.__name__ = build.__qualname__ = f"convnet{depth}"
    build.__module__ = __name__
    build.__doc__ = f"ConvNet-{depth}: {depth} x (conv3x3(128) + instance norm + ReLU + avgpool2) + linear."
    return build


for _d in CONVNET_DEPTHS:
    if f"convnet{_d}" not in timm.list_models(f"convnet{_d}"):
        globals()[f"convnet{_d}"] = register_model(_factory(_d))


def create_student(name: str, num_classes: int, in_chans: int, img_size: int) -> nn.Module:
    """A randomly initialised student (draws from torch's global RNG: seed it around the call)."""
    base = name.split(".")[0]
    if not timm.list_models(base):
        raise UserError(f"unknown --student {name!r}; use a timm architecture (resnet18, resnet50, ...) "
                        f"or {', '.join(f'convnet{d}' for d in CONVNET_DEPTHS)}")
    kwargs = {"img_size": img_size} if base.startswith("convnet") else {}
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise UserError(f"cannot build student {name!r} for {in_chans}-channel {img_size}px images "
                        f"({type(exc).__name__}: {exc})") from None
