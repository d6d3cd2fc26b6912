"""The original facebookresearch DiT layout converts to diffusers' DiTTransformer2DModel, strictly."""
from __future__ import annotations

import argparse

import pytest
import torch
from diffusers import DiTTransformer2DModel

from cao2_dit import convert, loading
from cao2core.errors import UserError
from dit_files import to_original

XL = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
          sample_size=32, patch_size=2, num_embeds_ada_norm=1000)
# The names of DiT's models.py, written out independently of the converter.
ORIGINAL_TOP = {"x_embedder.proj.weight", "x_embedder.proj.bias", "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias",
                "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias", "y_embedder.embedding_table.weight", "pos_embed",
                "final_layer.linear.weight", "final_layer.linear.bias", "final_layer.adaLN_modulation.1.weight",
                "final_layer.adaLN_modulation.1.bias"}
ORIGINAL_BLOCK = {"attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"}



def test_dit_xl2_on_meta_every_entry_used_and_filled():
    with torch.device("meta"):
        model = DiTTransformer2DModel(**XL)
    original = to_original(model)
    expected_keys = ORIGINAL_TOP | {f"blocks.{i}.{n}.{s}" for i in range(28) for n in ORIGINAL_BLOCK
                                    for s in ("weight", "bias")}
    assert set(original) == expected_keys
    assert len(original) == 292
    assert sum(v.numel() for v in original.values()) == 675_129_632
    assert convert.infer_config(original) == XL
    converted, _ = convert.convert_original(original)
    target = model.state_dict()
    assert set(converted) == set(target) and len(converted) == 538
    assert all(converted[k].shape == target[k].shape for k in target)
    # The shared embedders are copied into each of the 28 blocks.
    assert sum(v.numel() for v in converted.values()) == 749_826_464


@pytest.fixture
def tiny_original(tmp_path):
    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                  num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
    with torch.no_grad():   # the original layout has one embedder: make the blocks share block 0's
        for blk in model.transformer_blocks[1:]:
            blk.norm1.emb.load_state_dict(model.transformer_blocks[0].norm1.emb.state_dict())
    path = tmp_path / "DiT-tiny.pt"
    torch.save(to_original(model), path)
    return model, path


def test_tiny_original_checkpoint_converts_and_matches(tiny_original):
    model, path = tiny_original
    loaded = loading.load_transformer(str(path), num_heads=2).eval()
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 500, 999]), torch.tensor([0, 7, 10])
    with torch.no_grad():
        assert torch.equal(loaded(x, timestep=t, class_labels=y).sample, model(x, timestep=t, class_labels=y).sample)


def test_training_checkpoint_with_ema_is_read(tiny_original, tmp_path):
    model, path = tiny_original
    wrapped = tmp_path / "ckpt.pt"
    torch.save({"model": {}, "ema": torch.load(path, weights_only=True)}, wrapped)
    assert loading.load_transformer(str(wrapped), num_heads=2).config.num_layers == 2


def test_truncated_checkpoint_is_refused(tiny_original, tmp_path):
    _, path = tiny_original
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated"):
        loading.load_transformer(str(cut))


@pytest.mark.parametrize("damage", ["drop", "extra", "shape"])
def test_mismatched_checkpoint_is_refused(tiny_original, tmp_path, damage):
    _, path = tiny_original
    state = torch.load(path, weights_only=True)
    if damage == "drop":
        del state["blocks.1.mlp.fc2.bias"]
    elif damage == "extra":
        state["blocks.0.attn.gamma1"] = torch.ones(16)
    else:
        state["blocks.1.mlp.fc1.weight"] = torch.zeros(32, 15)
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    with pytest.raises(UserError):
        loading.load_transformer(str(bad), num_heads=2)


def test_not_a_dit_checkpoint_is_refused(tmp_path):
    path = tmp_path / "resnet.pt"
    torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3)}, path)
    with pytest.raises(UserError, match="original facebookresearch layout"):
        loading.load_transformer(str(path))


def test_pickled_objects_are_not_loaded(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"x": torch.zeros(1), "obj": argparse.Namespace(cmd="rm -rf /")}, path)
    with pytest.raises(UserError, match=r"holds Python objects besides tensors \(a pickle\), which cao2 does not execute"):
        loading.load_transformer(str(path))


def test_diffusers_folder_with_missing_weights_is_refused(tiny_world, tmp_path):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(tiny_world, broken)
    (broken / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(UserError, match="weights of this diffusers folder are missing"):
        loading.load_transformer(str(broken / "transformer"))


def test_reference_levels_index_the_samplers_respaced_grid():
    from cao2_dit import sampling
    kept = sampling.grid(50)[::-1]
    assert kept[:12] == [0, 20, 41, 61, 82, 102, 122, 143, 163, 183, 204, 224] and kept[-1] == 999 and len(kept) == 50
