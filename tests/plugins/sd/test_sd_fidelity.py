"""The sd generator against the definitions: StableDiffusionPipeline's sampling and decoding, CLIP's prompt
embeddings, the DDPM forward process of the shipped betas and the epsilon / velocity targets."""
from __future__ import annotations

import diffusers
import pytest
import torch
import torchvision.transforms.functional as TF

from cao2core.generators.conformance import GeneratorUnderTest
from cao2_sd.sampling import SAMPLERS
from sd_tiny import MAX_TOKENS, SCHEDULER, load_pipeline, make_sd, shapes_file

PROMPTS = ["a photo of a round circle", "a photo of a square", "a photo of a triangle"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd-fidelity")
    return {"epsilon": make_sd(root / "eps"), "v_prediction": make_sd(root / "v", prediction_type="v_prediction"),
            "shapes": shapes_file(root / "shapes.txt")}


def loaded(folders, kind="epsilon", **options) -> GeneratorUnderTest:
    return GeneratorUnderTest("sd", {"model": str(folders[kind]), "dataset": str(folders["shapes"]), "sample_steps": 4,
                         "guidance": 2.0, **options})


def alphas_cumprod() -> torch.Tensor:
    """SD's scaled-linear schedule from the scheduler config: betas = linspace(sqrt(b0), sqrt(b1), T)^2."""
    betas = torch.linspace(SCHEDULER["beta_start"] ** 0.5, SCHEDULER["beta_end"] ** 0.5,
                           SCHEDULER["num_train_timesteps"]) ** 2
    return torch.cumprod(1 - betas, 0)


@pytest.mark.parametrize("kind,sampler", [("epsilon", None), ("epsilon", "dpm"), ("v_prediction", "euler_a"),
                                          ("v_prediction", "ddpm")])
def test_samples_are_the_pipelines_for_the_same_generators(folders, kind, sampler):
    """Deterministic and ancestral schedulers, epsilon and v: the pipeline's latents for per-sample generators."""
    k = loaded(folders, kind, sampler=sampler)
    ours = k.sample(torch.tensor([0, 2]), [5, 6]).latents
    pipe = load_pipeline(folders[kind])
    pipe.set_progress_bar_config(disable=True)
    if sampler:
        pipe.scheduler = getattr(diffusers, SAMPLERS[sampler]).from_config(pipe.scheduler.config)
    ref = pipe([PROMPTS[0], PROMPTS[2]], num_inference_steps=4, guidance_scale=2.0, height=16, width=16,
               generator=[torch.Generator().manual_seed(s) for s in (5, 6)], output_type="latent").images
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5)
    assert k.handle.scheduler_class is type(pipe.scheduler)


def test_decode_is_the_pipelines_image(folders):
    k = loaded(folders)
    z = k.sample(torch.tensor([1]), [3]).latents
    pipe = load_pipeline(folders["epsilon"])
    pipe.set_progress_bar_config(disable=True)
    image = pipe([PROMPTS[1]], num_inference_steps=4, guidance_scale=2.0, height=16, width=16,
                 generator=[torch.Generator().manual_seed(3)], output_type="pt").images       # in [0, 1]
    pixels = k.gen.decode(handle=k.handle, latents=z)
    assert pixels.shape == (1, 3, 16, 16)
    assert torch.allclose((pixels.clamp(-1, 1) + 1) / 2, image, atol=1e-5)


def test_store_size_resizes_the_decoded_image_antialiased(folders):
    z = loaded(folders).sample(torch.tensor([0]), [1]).latents
    native = loaded(folders).gen.decode(handle=loaded(folders).handle, latents=z)
    k = loaded(folders, store_size="8")
    small = k.gen.decode(handle=k.handle, latents=z)
    assert small.shape == (1, 3, 8, 8)
    assert torch.allclose(small, TF.resize(native, [8, 8], antialias=True), atol=1e-6)


def test_conditions_are_the_pipelines_prompt_embeddings(folders):
    k = loaded(folders)
    pipe = load_pipeline(folders["epsilon"])
    ids = pipe.tokenizer(PROMPTS + [""], padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids
    with torch.no_grad():
        want = pipe.text_encoder(ids).last_hidden_state
    labels = torch.tensor([0, 1, 2, 0, 1])
    got = k.gen.condition(handle=k.handle, labels=labels, kinds=["class", "class", "class", "null", "zero"])
    assert torch.allclose(got[:3], want[:3], atol=1e-6)
    assert torch.allclose(got[3], want[3], atol=1e-6)              # null: the empty prompt, the CFG input
    assert torch.equal(got[4], torch.zeros_like(want[0]))         # zero: a zero text embedding


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_corrupt_and_predict_follow_the_forward_process(folders, kind):
    k = loaded(folders, kind)
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    levels = torch.tensor([1, 299, 999])
    c = k.gen.corrupt(handle=k.handle, latents=x, levels=levels, noise=eps, generators=[], level_max=299)
    a = alphas_cumprod()[levels].view(-1, 1, 1, 1)
    assert torch.allclose(c.inputs, a.sqrt() * x + (1 - a).sqrt() * eps, atol=1e-6)
    target = eps if kind == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x
    assert torch.allclose(c.target, target, atol=1e-6)
    condition = k.gen.condition(handle=k.handle, labels=torch.tensor([0, 1, 2]), kinds=["class", "null", "zero"])
    p = k.gen.predict(handle=k.handle, corrupted=c, condition=condition)
    with torch.no_grad():
        want = k.handle.unet(c.inputs, levels, encoder_hidden_states=condition).sample
    assert torch.allclose(p.pred, want, atol=1e-6) and torch.equal(p.target, c.target)


def test_v_target_carries_the_gradient_of_the_denoising_error(folders):
    """For v-prediction the target depends on the latent: v - v_hat = (eps - eps_hat) / sqrt(alpha-bar)."""
    k = loaded(folders, "v_prediction")
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    eps = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([500])
    c = k.gen.corrupt(handle=k.handle, latents=x, levels=t, noise=eps, generators=[], level_max=299)
    p = k.gen.predict(handle=k.handle, corrupted=c,
                      condition=k.gen.condition(handle=k.handle, labels=torch.tensor([0]), kinds=["class"]))
    a = alphas_cumprod()[t].view(-1, 1, 1, 1)
    eps_hat = a.sqrt() * p.pred + (1 - a).sqrt() * c.inputs
    assert torch.allclose(p.target - p.pred, (eps - eps_hat) / a.sqrt(), atol=1e-4)
    assert p.target.requires_grad


def test_default_t_hat_has_dits_noise_level(folders):
    """T-hat is the timestep of the checkpoint's schedule with alpha-bar of DiT's T-hat 224 (linear schedule)."""
    dit = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[224]
    abar = alphas_cumprod()
    want = int((abar >= round(float(dit), 4)).nonzero().max())
    spec = loaded(folders).spec
    assert spec.default_level_max == want == 299 and spec.level_range == (1, 999)
    assert abs(float(abar[want]) - float(dit)) < 2e-3
