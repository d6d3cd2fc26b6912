"""The MAR plugin computes what the published MAR code computes: its respacing, its fp32 condition buffer, its
tolerance of training leftovers in ``kl16.ckpt``."""
from __future__ import annotations

import pytest
import torch

from cao2_mar.diffusion import GaussianDiffusion
from cao2core.generators.host import Host
from cao2core.generators.respacing import space_timesteps
from mar_tiny import make_published, tiny_mar, tiny_vae


def running_sum(total: int, count: int) -> list[int]:
    """MAR's (and DiT's) ``space_timesteps``: the kept steps are a running sum of the stride, each rounded."""
    stride, cur, kept = ((total - 1) / (count - 1) if count > 1 else 1), 0.0, set()
    for _ in range(count):
        kept.add(round(cur))
        cur += stride
    return sorted(kept)


def test_respacing_is_the_running_sum_for_every_count():
    assert space_timesteps(1000, 21)[10] == 499          # MAR keeps 499 where round(10 * 49.95) gives 500
    assert space_timesteps(1000, 100) == running_sum(1000, 100)
    assert all(space_timesteps(1000, n) == running_sum(1000, n) for n in range(1, 1001))
    assert GaussianDiffusion.respaced(21).timestep_map.tolist() == running_sum(1000, 21)


def test_condition_is_added_in_fp32_under_autocast():
    model = tiny_mar()
    cfg = model.cfg
    seen = {}
    model.z_proj_ln.register_forward_hook(lambda _m, inputs, _o: seen.setdefault("x", inputs[0]))
    tokens = torch.randn(2, cfg.seq_len, cfg.token_dim)
    cond = torch.randn(2, cfg.encoder_embed_dim) * 3 + 0.1234567
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.forward_mae(tokens, torch.zeros(2, cfg.seq_len, dtype=torch.bool), cond)
    buf = cfg.buffer_size
    x = seen["x"]
    assert x.dtype == torch.float32
    expected = cond[:, None, :] + model.encoder_pos_embed_learned[:, :buf]
    assert torch.equal(x[:, :buf], expected)        # bit for bit: nothing was rounded to bf16 on the way


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    return make_published(tmp_path_factory.mktemp("published"))


def _load(ckpt, vae, mar_json, vae_json):
    return Host().generator("mar").load(options=dict(model=str(ckpt), vae=str(vae), preset=mar_json,
                                                     vae_config=vae_json), device=torch.device("cpu"))


def test_kl16_with_training_leftovers_loads_and_names_them(published, tmp_path, capsys):
    ckpt, _, mar_json, vae_json, _ = published
    state = tiny_vae().state_dict()
    leftovers = {"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.zeros(4, 3, 4, 4)}
    torch.save({"model": {**state, **leftovers}}, tmp_path / "kl16.ckpt")
    handle = _load(ckpt, tmp_path / "kl16.ckpt", mar_json, vae_json)
    assert all(torch.equal(handle.vae.state_dict()[k], v) for k, v in state.items())
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ignoring 2 entries outside the VAE" in err[0] and "loss.logvar" in err[0]


def test_kl16_missing_a_vae_entry_is_refused(published, tmp_path):
    from cao2core.errors import UserError
    ckpt, _, mar_json, vae_json, _ = published
    state = tiny_vae().state_dict()
    state.pop(next(k for k in state if k.startswith("decoder.")))
    torch.save({"model": state}, tmp_path / "kl16.ckpt")
    with pytest.raises(UserError, match="missing decoder"):
        _load(ckpt, tmp_path / "kl16.ckpt", mar_json, vae_json)
