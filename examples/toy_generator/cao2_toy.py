"""A minimal third-party cao2 generator: one Gaussian per class in pixel space, with its exact denoiser.

Class c's images are N(mu_c, s^2 I) on 1x32x32, where mu_c is a fixed pattern (a blob at a class-specific
position). There are no weights: the optimal noise prediction of a Gaussian is known in closed form, so
CLO pulls latents towards the class pattern. It uses the MNIST label space (10 classes).
"""
from __future__ import annotations

import torch

from cao2core.hookspecs import Corrupted, LatentSpec, Prediction, SampleOutput, hookimpl

__version__ = "0.1.0"
CAO2_CONTRACT = (1, 1)      # the cao2 plugin contract this plugin is written for (docs/plugins.md, "Compatibility")
SIZE, CLASSES, STD = 32, 10, 0.3


class Toy:
    def __init__(self, device):
        yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
        centers = [(8 + 16 * (c % 2), 4 + 6 * (c // 2)) for c in range(CLASSES)]
        self.means = torch.stack([
            torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 18.0) * 1.6 - 0.8 for cy, cx in centers
        ]).unsqueeze(1).to(device)                                   # (classes, 1, H, W) in [-0.8, 0.8]
        betas = torch.linspace(1e-4, 0.02, 1000)
        self.alphas_cumprod = torch.cumprod(1 - betas, 0).to(device)


@hookimpl
def cao2_load(options, device):
    return Toy(device)


@hookimpl
def cao2_latent_spec(handle):
    return LatentSpec(shape=(1, SIZE, SIZE), num_classes=CLASSES, level_range=(1, 999), default_level_max=200,
                      label_space="mnist")


@hookimpl
def cao2_describe(handle):
    return {"family": "toy", "std": STD}


@hookimpl
def cao2_sample(handle, labels, generators, snapshot_steps):
    noise = torch.stack([torch.randn((1, SIZE, SIZE), generator=g) for g in generators]).to(labels.device)
    return SampleOutput(latents=handle.means[labels] + STD * noise)


@hookimpl
def cao2_decode(handle, latents):
    return latents


@hookimpl
def cao2_encode(handle, pixels, generators):
    return pixels


@hookimpl
def cao2_condition(handle, labels, kinds):
    class_means = handle.means[labels]
    overall = handle.means.mean(0, keepdim=True).expand_as(class_means)
    use_class = torch.tensor([k == "class" for k in kinds], device=labels.device).view(-1, 1, 1, 1)
    return torch.where(use_class, class_means, overall)


@hookimpl
def cao2_corrupt(handle, latents, levels, noise, generators):
    a = handle.alphas_cumprod[levels].view(-1, 1, 1, 1)
    return Corrupted(inputs=a.sqrt() * latents + (1 - a).sqrt() * noise, levels=levels, target=noise)


@hookimpl
def cao2_predict(handle, corrupted, condition):
    a = handle.alphas_cumprod[corrupted.levels].view(-1, 1, 1, 1)
    # E[eps | x_t] for x0 ~ N(mean, STD^2 I): sqrt(1-a) (x_t - sqrt(a) mean) / (a STD^2 + 1 - a)
    eps_hat = (1 - a).sqrt() * (corrupted.inputs - a.sqrt() * condition) / (a * STD**2 + 1 - a)
    return Prediction(pred=eps_hat, target=corrupted.target)
