"""MAR architecture and schedules: golden sizes of the published presets, layouts, masks, CFG ramp, diffusion."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from cao2_mar.diffusion import GaussianDiffusion, cosine_betas, space_timesteps
from cao2_mar.masking import guidance_at, masked_after_steps, truncated_normal_ratio
from cao2_mar.model import MAR, PRESETS, timestep_embedding
from cao2_mar.vae import KL16, AutoencoderKL
from mar_tiny import TINY_MAR, tiny_mar, tiny_vae


@pytest.mark.parametrize("name,params,keys,width,dl", [
    ("mar_base", 207_924_768, 364, 768, (6, 1024)),
    ("mar_large", 478_326_304, 476, 1024, (8, 1280)),
    ("mar_huge", 942_403_104, 604, 1280, (12, 1536)),
])
def test_published_presets_have_the_published_sizes(name, params, keys, width, dl):
    with torch.device("meta"):
        model = MAR(PRESETS[name])
    sd = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(sd) == keys and not list(model.buffers())          # MAR has no buffers: all keys are parameters
    d, w = width, dl[1]
    shapes = {"class_emb.weight": (1000, d), "fake_latent": (1, d), "mask_token": (1, 1, d),
              "encoder_pos_embed_learned": (1, 320, d), "decoder_pos_embed_learned": (1, 320, d),
              "diffusion_pos_embed_learned": (1, 256, d), "z_proj.weight": (d, 16), "decoder_embed.weight": (d, d),
              "encoder_blocks.0.attn.qkv.weight": (3 * d, d), "decoder_blocks.0.mlp.fc1.weight": (4 * d, d),
              "diffloss.net.time_embed.mlp.0.weight": (w, 256), "diffloss.net.cond_embed.weight": (w, d),
              "diffloss.net.input_proj.weight": (w, 16), "diffloss.net.final_layer.linear.weight": (32, w),
              f"diffloss.net.res_blocks.{dl[0] - 1}.adaLN_modulation.1.weight": (3 * w, w),
              "diffloss.net.final_layer.adaLN_modulation.1.weight": (2 * w, w)}
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key
    assert f"diffloss.net.res_blocks.{dl[0]}.in_ln.weight" not in sd


def test_kl16_has_the_published_size_and_layout():
    with torch.device("meta"):
        vae = AutoencoderKL(KL16)
    sd = vae.state_dict()
    assert sum(p.numel() for p in vae.parameters()) == 66_456_019 and len(sd) == 312
    assert "encoder.down.4.attn.1.q.weight" in sd and "encoder.down.3.attn.0.q.weight" not in sd
    assert not any(".attn." in k for k in sd if k.startswith("decoder.up"))     # decoder attention: middle only
    assert tuple(sd["encoder.conv_out.weight"].shape) == (32, 512, 3, 3)
    assert tuple(sd["quant_conv.weight"].shape) == (32, 32, 1, 1)
    assert tuple(sd["post_quant_conv.weight"].shape) == (16, 16, 1, 1)
    assert tuple(sd["decoder.up.0.block.2.conv2.weight"].shape) == (128, 128, 3, 3)   # up.0 = highest resolution


def test_vae_shapes_and_scaling():
    vae = tiny_vae()
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    z = vae.encode_scaled(x)
    assert z.shape == (2, 4, 8, 8) and vae.decode_scaled(z).shape == (2, 1, 32, 32)
    mean, _ = vae.moments(x)
    torch.testing.assert_close(z, (mean - 0.1) * 0.8)


def test_patchify_is_mar_token_order_and_inverts():
    model = tiny_mar()
    x = torch.arange(2 * 4 * 8 * 8, dtype=torch.float32).reshape(2, 4, 8, 8)
    tokens = model.patchify(x)
    assert tokens.shape == (2, 16, 16)
    # token 1 is the patch at row 0, column 1; its dims are (channel, dy, dx)
    assert tokens[0, 1].tolist() == x[0, :, 0:2, 2:4].reshape(-1).tolist()
    assert torch.equal(model.unpatchify(tokens), x)


def test_cosine_mask_schedule_256_tokens_32_steps():
    left = masked_after_steps(256, 32)
    assert len(left) == 32 and left[-1] == 0 and left[30] == 12 and left[0] == 255
    predicted = [before - after for before, after in zip([256] + left[:-1], left)]
    assert sum(predicted) == 256 and min(predicted) >= 1


def test_linear_cfg_ramp():
    left = masked_after_steps(256, 32)
    scales = [guidance_at(2.9, "linear", 256, n) for n in left]
    assert scales[0] == pytest.approx(1 + 1.9 / 256) and scales[-1] == pytest.approx(1 + 1.9 * 255 / 256)
    assert all(a < b for a, b in zip(scales, scales[1:-1]))
    assert guidance_at(2.9, "constant", 256, 100) == 2.9


def test_respaced_diffloss_timesteps_hand_the_net_original_indices():
    kept = space_timesteps(1000, 100)
    assert len(kept) == 100 and kept[:7] == [0, 10, 20, 30, 40, 50, 61] and kept[-2:] == [989, 999]
    d = GaussianDiffusion.respaced(100)
    assert d.timestep_map.tolist() == kept and d.num_timesteps == 100
    torch.testing.assert_close(d.alphas_cumprod, GaussianDiffusion.training().alphas_cumprod[kept])


def test_cosine_schedule_endpoints_and_embedding_order():
    acp = torch.cumprod(1 - cosine_betas(), 0)
    assert acp[0] > 0.9999 and acp[-1] < 1e-6 and bool((acp[1:] < acp[:-1]).all())
    emb = timestep_embedding(torch.tensor([0.0]), 256)
    assert torch.equal(emb[0, :128], torch.ones(128)) and torch.equal(emb[0, 128:], torch.zeros(128))


def test_truncated_normal_mask_ratio():
    rs = [truncated_normal_ratio(u / 100) for u in range(100)]
    assert min(rs) >= 0.7 and max(rs) <= 1.0 and rs == sorted(rs)
    assert sum(rs) / len(rs) == pytest.approx(0.867, abs=0.01)


@pytest.mark.parametrize("counts", [(10, 10), (10, 3)])        # equal counts: unpadded; mixed: padded encoder
def test_encoder_only_sees_visible_tokens(counts):
    model = tiny_mar()
    tokens = torch.randn(2, 16, 16, requires_grad=True)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    for row, n in enumerate(counts):
        mask[row, torch.randperm(16)[:n]] = True
    z = model.forward_mae(tokens, mask, model.condition_embedding(torch.tensor([1, 2]), ["class"] * 2))
    assert z.shape == (2, TINY_MAR.seq_len, TINY_MAR.decoder_embed_dim)
    z.square().sum().backward()
    assert torch.equal(tokens.grad[mask], torch.zeros_like(tokens.grad[mask]))
    assert bool((tokens.grad[~mask].abs().sum(-1) > 0).all())
    assert math.isfinite(z.sum().item())


def encoder_attention_masks(model, tokens, mask, cond):
    """forward_mae's output and (attention mask, sequence length) of every encoder attention call."""
    seen = []
    hooks = [blk.attn.register_forward_pre_hook(lambda m, args: seen.append((args[1], args[0].shape[1])))
             for blk in model.encoder_blocks]
    try:
        return model.forward_mae(tokens, mask, cond), seen
    finally:
        for h in hooks:
            h.remove()


def test_mixed_masked_counts_equal_each_row_alone():
    """Rows with different masked counts (0 .. all masked) give what each row gives alone."""
    model = tiny_mar(3, replace(TINY_MAR, encoder_depth=2))
    g = torch.Generator().manual_seed(0)
    counts = [3, 16, 0, 9, 12]
    tokens = torch.randn(5, 16, 16, generator=g)
    cond = torch.randn(5, TINY_MAR.encoder_embed_dim, generator=g)
    mask = torch.stack([torch.zeros(16, dtype=torch.bool).index_fill(0, torch.randperm(16, generator=g)[:n], True)
                        for n in counts])
    z, seen = encoder_attention_masks(model, tokens, mask, cond)
    assert all(m is not None and m.shape == (5, 1, 1, 4 + 16) and n == 4 + 16 for m, n in seen)  # padded to 20
    assert torch.isfinite(z).all()
    for i in range(5):
        alone, seen = encoder_attention_masks(model, tokens[i:i + 1], mask[i:i + 1], cond[i:i + 1])
        assert all(m is None and n == 4 + 16 - counts[i] for m, n in seen)                    # unpadded path
        torch.testing.assert_close(z[i:i + 1], alone, rtol=1e-5, atol=1e-6)


def test_equal_masked_counts_keep_the_unpadded_path():
    model = tiny_mar()
    g = torch.Generator().manual_seed(1)
    tokens, cond = torch.randn(3, 16, 16, generator=g), torch.randn(3, TINY_MAR.encoder_embed_dim, generator=g)
    mask = torch.stack([torch.randperm(16, generator=g) < 6 for _ in range(3)])
    z, seen = encoder_attention_masks(model, tokens, mask, cond)
    assert [(m, n) for m, n in seen] == [(None, 4 + 10)]                  # no padding, no attention mask
    for i in range(3):
        torch.testing.assert_close(z[i], model.forward_mae(tokens[i:i + 1], mask[i:i + 1], cond[i:i + 1])[0],
                                   rtol=1e-5, atol=1e-6)


def test_clip_x0_tames_the_first_cosine_step():
    """At t = 999 the cosine schedule turns an eps error of 0.01 into a mean error of ~6 (1/sqrt(alpha-bar) ~ 2e4);
    clipping the predicted x0 keeps the step bounded."""
    d = GaussianDiffusion.respaced(100)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    out = torch.cat([x + 0.01, torch.zeros_like(x)], dim=1)
    t = torch.full((64,), d.num_timesteps - 1)
    assert d.p_mean_variance(out, x, t)[0].abs().min() > 3
    assert d.p_mean_variance(out, x, t, clip_x0=3.0)[0].abs().max() < 0.5
