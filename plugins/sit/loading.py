"""Load SiT's ``SiT-XL-2-256.pt`` or REPA's published SiT-XL/2 (``last.pt``) in their original state-dict layouts.

Reading is ``weights_only`` (no pickle is executed) and loading is strict: every entry of the model must be there
with its shape, and nothing else may be. The one exception is REPA's projectors (``projectors.*``, the MLP heads
that align hidden states with DINOv2 features during training; ``forward`` computes them but sampling discards
them): they are set aside with one line naming them. A training checkpoint's ``{"ema": ...}`` is read as its EMA
weights (both codes sample with them); REPA's legacy layout (``decoder_blocks.i`` after the encoder blocks) is
renumbered as REPA's ``load_legacy_checkpoints`` does.

Which family a file is matters (the two run in opposite time directions): projector entries say REPA, a
learned-sigma output (2C channels, as ``SiT-XL-2-256.pt``) says SiT, and anything else needs ``--gen-opt family``.
"""
from __future__ import annotations

import math
import re
import sys
from pathlib import Path

from cao2core.errors import UserError
from cao2core.generators import weights

from .model import SiT, SiTConfig

FAMILIES = ("sit", "repa")
# heads are not in the weights; SiT's and REPA's S/B/L/XL by width, as their SiT_models tables build them
HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1152: 16}
DEPTH_BY_SIZE = {"S": 12, "B": 12, "L": 24, "XL": 28}
WIDTH_BY_SIZE = {"S": 384, "B": 768, "L": 1024, "XL": 1152}
ARCHS = tuple(f"SiT-{size}/{p}" for size in ("XL", "L", "B", "S") for p in (2, 4, 8))
PROJECTOR_PREFIX = "projectors."


def read_state_dict(path: Path) -> dict:
    """SiT's or REPA's weights (a training checkpoint's ``ema``), REPA's legacy block numbering made current."""
    state = weights.read_state_dict(path, "SiT-XL-2-256.pt, REPA's last.pt or a training checkpoint's 'ema'")
    return _renumber_legacy(dict(state))


def _renumber_legacy(state: dict) -> dict:
    """REPA's legacy layout: ``decoder_blocks.i`` is block i + (the number of encoder blocks)."""
    if not any(k.startswith("decoder_blocks.") for k in state):
        return state
    encoder_depth = _depth(state, "blocks")
    out = {}
    for key, value in state.items():
        m = re.match(r"decoder_blocks\.(\d+)\.(.*)", key)
        out[f"blocks.{int(m.group(1)) + encoder_depth}.{m.group(2)}" if m else key] = value
    return out


def _depth(state: dict, prefix: str = "blocks") -> int:
    idx = {int(m.group(1)) for k in state if (m := re.match(rf"{prefix}\.(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def family_of(state: dict, source, asked: str | None) -> str:
    has_projectors = any(k.startswith(PROJECTOR_PREFIX) for k in state)
    learned_sigma = _learned_sigma(state)
    if asked is not None:
        if asked == "sit" and has_projectors:
            raise UserError(f"{source} holds REPA's projector entries, so it is a REPA checkpoint (data at t = 0); "
                            "use --gen-opt family=repa (or a -repa preset)")
        if asked == "repa" and learned_sigma:
            raise UserError(f"{source} has a learned-sigma output (as SiT-XL-2-256.pt), which REPA's SiT does not "
                            "have; use --gen-opt family=sit (or a -sit preset)")
        return asked
    if has_projectors:
        return "repa"
    if learned_sigma:
        return "sit"
    raise UserError(f"{source}: a SiT-layout checkpoint without a learned-sigma output or REPA's projectors could be "
                    "either family, whose interpolants run in opposite directions; pass --gen-opt family=sit "
                    "(willisma/SiT, data at t = 1) or family=repa (sihyun-yu/REPA, data at t = 0)")


def _learned_sigma(state: dict) -> bool:
    try:
        w = state["x_embedder.proj.weight"]
        return state["final_layer.linear.weight"].shape[0] == 2 * w.shape[1] * w.shape[-1] ** 2
    except KeyError:
        return False


def infer_config(state: dict, source, arch: str | None = None, num_heads: int | None = None) -> SiTConfig:
    """The network an original-layout state dict describes; ``arch`` (e.g. SiT-XL/2) is checked against it."""
    try:
        w = state["x_embedder.proj.weight"]
        width, in_ch, patch = w.shape[0], w.shape[1], w.shape[-1]
        out_ch = state["final_layer.linear.weight"].shape[0] // (patch * patch)
        classes = state["y_embedder.embedding_table.weight"].shape[0] - 1
        tokens = state["pos_embed"].shape[1]
        mlp_hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    except KeyError as exc:
        raise UserError(f"{source} is not a SiT checkpoint in the original layout (willisma/SiT or sihyun-yu/REPA "
                        f"models): entry {exc.args[0]!r} is missing") from None
    grid = math.isqrt(tokens)
    depth = _depth(state)
    if arch is not None:
        size, p = arch.removeprefix("SiT-").split("/")
        expected = (DEPTH_BY_SIZE[size], WIDTH_BY_SIZE[size], int(p))
        if (depth, width, patch) != expected:
            raise UserError(f"{source} is depth {depth}, width {width}, patch {patch}, not {arch} "
                            f"(depth {expected[0]}, width {expected[1]}, patch {expected[2]})")
    heads = num_heads or HEADS_BY_WIDTH.get(width)
    if heads is None:
        raise UserError(f"{source}: width {width} is none of SiT's S/B/L/XL sizes, so its attention heads are "
                        "unknown; pass --gen-opt num_heads=N")
    if width % heads or grid * grid != tokens or out_ch not in (in_ch, 2 * in_ch):
        raise UserError(f"{source} does not describe a SiT (width {width}, {heads} heads, {tokens} positions, "
                        f"{out_ch} output channels for {in_ch} input channels)")
    return SiTConfig(input_size=grid * patch, patch_size=patch, in_channels=in_ch, hidden_size=width, depth=depth,
                     num_heads=heads, num_classes=classes, learn_sigma=out_ch == 2 * in_ch, mlp_hidden=mlp_hidden,
                     qk_norm="blocks.0.attn.q_norm.weight" in state)


def load_model(source: str, family: str | None = None, arch: str | None = None,
               num_heads: int | None = None) -> tuple[SiT, str, list[str]]:
    """(model in eval mode, family, the projector entries set aside)."""
    path = Path(source).expanduser()
    if not path.is_file():
        raise UserError(f"SiT checkpoint {source} not found; give SiT-XL-2-256.pt, REPA's last.pt or a training "
                        "checkpoint of either code")
    state = read_state_dict(path)
    family = family_of(state, path, family)
    aside = sorted(k for k in state if k.startswith(PROJECTOR_PREFIX)) if family == "repa" else []
    if aside:
        print(f"cao2: {path}: setting aside {len(aside)} entries of REPA's training-only projectors "
              f"({', '.join(aside[:2])}{', ...' if len(aside) > 2 else ''}): sampling does not use them",
              file=sys.stderr)
        state = {k: v for k, v in state.items() if not k.startswith(PROJECTOR_PREFIX)}
    model = SiT(infer_config(state, path, arch, num_heads))
    problem = weights.strict_problem(model, state)
    if problem:
        raise UserError(f"checkpoint {path} does not fit the {family} network it describes: {problem}")
    weights.load_into(model, state)      # the (memory-mapped) checkpoint's tensors become the parameters
    return model.eval(), family, aside

