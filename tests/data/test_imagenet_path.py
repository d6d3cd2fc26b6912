"""The ImageNet code path with tiny stand-ins: original-layout DiT .pt with learned sigma and 1000 classes,
a separate VAE folder, an ImageNet subset (wnid folders), and a classifier whose outputs are ImageNet wnids."""
from __future__ import annotations

import json
import os

import pytest
import timm
import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel
from safetensors.torch import save_file

from cao2core.cli import main
from cao2core.errors import UserError
from cao2core.data.labels import imagenet1k, label_space
from dit_files import to_original


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory):
    root = tmp_path_factory.mktemp("in1k")
    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=1000)
    for blk in dit.transformer_blocks[1:]:
        blk.norm1.emb.load_state_dict(dit.transformer_blocks[0].norm1.emb.state_dict())
    torch.save(to_original(dit), root / "DiT-tiny-256.pt")
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 3,
                  up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 8, 8), layers_per_block=1,
                  norm_num_groups=4, sample_size=32).save_pretrained(root / "vae")
    clf = timm.create_model("mnist_cnn", num_classes=1000, in_chans=3)
    save_file(clf.state_dict(), str(root / "clf.safetensors"),
              metadata={"arch": "mnist_cnn", "num_classes": "1000", "classes": json.dumps(imagenet1k()[0])})
    return root


def test_woof_run_with_original_checkpoint(imagenet_like, tmp_path):
    out = tmp_path / "woof"
    assert main(["run", "--model", str(imagenet_like / "DiT-tiny-256.pt"), "--gen-opt", "num_heads=2",
                 "--vae", str(imagenet_like / "vae"), "--classifier", str(imagenet_like / "clf.safetensors"),
                 "--dataset", "woof", "--classes", "0,9", "--ipc", "2", "--pool-factor", "2", "--clo-iters", "2",
                 "--sample-steps", "4", "--out", str(out), "--no-progress"]) == 0
    woof = label_space("woof")
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted([woof.ids[0], woof.ids[9]])
    m = json.loads((out / "manifest.json").read_text())
    assert m["generator_labels"] == [woof.generator_labels[0], woof.generator_labels[9]]
    assert m["generator"]["guidance"] == 2.7 and m["generator"]["null_label"] == 1000
    assert m["generator"]["transformer"]["config"]["out_channels"] == 8          # learned sigma
    from PIL import Image
    assert Image.open(out / "images" / woof.ids[0] / "0.png").mode == "RGB"


def test_hub_id_without_network_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="DiT transformer facebook/DiT-XL-2-256 is not in the Hugging Face cache .* pass --model"):
        from cao2_dit import loading
        loading.load_transformer(loading.resolve("facebook/DiT-XL-2-256", None, None)[0])


@pytest.mark.checkpoint
@pytest.mark.skipif(not os.environ.get("CAO2_DIT_XL"), reason="set CAO2_DIT_XL to a DiT-XL-2-256x256.pt")
def test_real_dit_xl2_checkpoint_loads_strictly():
    from cao2_dit import loading
    model = loading.load_transformer(os.environ["CAO2_DIT_XL"])
    assert sum(p.numel() for p in model.parameters()) == 749_826_464


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_run_matches_cpu(tiny_args, tmp_path):
    from safetensors.torch import load_file
    cpu_out = tmp_path / "out"
    assert main(["run", *tiny_args]) == 0
    args = list(tiny_args)
    args[args.index("--out") + 1] = str(tmp_path / "gpu")
    args[args.index("--device") + 1] = "cuda"
    assert main(["run", *args]) == 0
    a, b = (load_file(str(d / "latents" / "3.safetensors")) for d in (cpu_out, tmp_path / "gpu"))
    torch.testing.assert_close(a["latents"], b["latents"], rtol=1e-3, atol=1e-3)
