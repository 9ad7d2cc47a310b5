"""Weight remapping: initialise a shallower and/or narrower student ViT from a teacher's weights.

Both operations work on plain ViT trees (backbone + head: the leaves of a vision_transformer
checkpoint) and compose; `remap` applies them, `remap_teacher` writes the student as a
vision_transformer npz (`jvt.checkpoints.save_npz`) that a student run loads as its
`pretrained.path`.

Depth, `select_blocks(params, blocks)`: student block k is teacher block `blocks[k]`;
embedding, [CLS], position embedding, final norm and head are copied. Selecting every block
is the identity. `evenly_spaced_blocks(L, k)` picks round(linspace(0, L - 1, k)): the first
block (which reads the patch embedding) and the last (whose output the copied final norm and
head were trained on) are always kept; 12 -> 6 gives (0, 2, 4, 7, 9, 11).

Width, `narrow(params, hidden_size=d, num_heads=h, mlp_dim=m)`: consistent first-index
selection. The student keeps residual channels 0..d-1 in every leaf that reads or writes the
residual stream (patch embedding, [CLS], position embedding, layer norms, the input axis of
query/key/value/Dense_0/head and the output axis of out/Dense_1), heads 0..h-1 with the first
d/h dimensions of each, and MLP units 0..m-1. Nothing is rescaled. Why this projection:
  * the same channel subset everywhere keeps the student's residual stream a coordinate
    restriction of the teacher's, so every block reads the features the previous one wrote
    (selecting channels independently per layer scrambles them; "Initializing Models with
    Larger Ones", Xu et al., ICLR 2024, find consistent selection is what matters);
  * it needs no data and keeps the student an ordinary ViT: a PCA rotation of the residual
    stream does not commute with LayerNorm's mean subtraction and per-channel scale, so it
    would need the norms converted to RMSNorm first (as SliceGPT does), which a
    vision_transformer checkpoint cannot express;
  * it is exact where nothing is removed, and for B -> S (768 -> 384 channels, 12 -> 6 heads
    of 64) it keeps whole heads.
Each layer norm then normalises over the d kept channels instead of all D: the student is an
initialisation to train (with or without distillation), not a compressed copy.
"""
from __future__ import annotations

import argparse
import json
import os
import re
from typing import Any, Sequence

import numpy as np
from flax import traverse_util

PyTree = Any

_BLOCK = re.compile(r"Transformer/encoderblock_(\d+)/(.*)")
# Fields of the teacher the student keeps (everything but the remapped dims).
_KEPT_FIELDS = ("patch_size", "representation_size", "pool", "fc_norm", "layer_norm_eps",
                "gelu_approximate")


def _flat(params: PyTree) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}


def _num_layers(flat: dict) -> int:
  return len({m.group(1) for k in flat if (m := _BLOCK.fullmatch(k))})


def _check_plain(flat: dict) -> None:
  from jvt.checkpoints import formats
  extra = sorted(k for k in flat if not formats.is_backbone_leaf(k))
  if extra:
    raise ValueError(f"remapping works on plain ViT trees; these leaves have no place there: "
                     f"{extra[:8]}. Pass the tree through jvt.remap.plain_params first (it "
                     "merges LoRA / SSF; prompts and adapters cannot be remapped).")


def plain_params(params: PyTree, model: Any) -> dict:
  """`params` of a (tuned) jvt `model` as a plain ViT tree (`jvt.methods.merge`).

  LoRA and SSF are merged exactly into the weights; the feature-distillation projections
  (`distill_proj`, training-only) are dropped. A method that adds computation a plain ViT does
  not have (prompts, adapters) raises ValueError naming it.
  """
  from jvt.methods.merge import merge
  return traverse_util.unflatten_dict(_flat(merge(model, params)[1]), sep="/")


def evenly_spaced_blocks(num_teacher_layers: int, num_student_layers: int) -> tuple[int, ...]:
  """round(linspace(0, L - 1, k)): k distinct teacher blocks, first and last included."""
  if not 0 < num_student_layers <= num_teacher_layers:
    raise ValueError(f"num_student_layers={num_student_layers}: must be in "
                     f"1..{num_teacher_layers} (the teacher's blocks).")
  return tuple(int(i) for i in np.round(np.linspace(0, num_teacher_layers - 1,
                                                    num_student_layers)))


def select_blocks(params: PyTree, blocks: Sequence[int]) -> dict:
  """The student tree whose block k is the teacher's block `blocks[k]` (negative: from the
  end; a block may be repeated); every non-block leaf is copied."""
  flat = _flat(params)
  _check_plain(flat)
  num_layers = _num_layers(flat)
  bad = [b for b in blocks if not -num_layers <= int(b) < num_layers]
  if not blocks or bad:
    raise ValueError(f"blocks={tuple(blocks)}: give at least one block index in "
                     f"0..{num_layers - 1} (or negative from the end); out of range: {bad}.")
  out = {k: v for k, v in flat.items() if not _BLOCK.fullmatch(k)}
  for k, b in enumerate(int(b) % num_layers for b in blocks):
    prefix = f"Transformer/encoderblock_{b}/"
    for key, value in flat.items():
      if key.startswith(prefix):
        out[f"Transformer/encoderblock_{k}/{key[len(prefix):]}"] = value
  return traverse_util.unflatten_dict(out, sep="/")


def _narrow_leaf(path: str, v: np.ndarray, d: int, h: int, dh: int, m: int,
                 has_pre_logits: bool) -> np.ndarray:
  """One leaf restricted to the kept channels / heads / units (see the module docstring)."""
  block = _BLOCK.fullmatch(path)
  rest = block.group(2) if block else path
  attn = re.fullmatch(r"MultiHeadDotProductAttention_0/(query|key|value|out)/(kernel|bias)",
                      rest) if block else None
  if attn:
    which, kind = attn.groups()
    if which == "out":
      return v[:h, :dh, :d] if kind == "kernel" else v[:d]  # [H, Dh, D] / [D]
    return v[:d, :h, :dh] if kind == "kernel" else v[:h, :dh]  # [D, H, Dh] / [H, Dh]
  if rest == "MlpBlock_0/Dense_0/kernel":
    return v[:d, :m]  # [D, M]
  if rest == "MlpBlock_0/Dense_0/bias":
    return v[:m]
  if rest == "MlpBlock_0/Dense_1/kernel":
    return v[:m, :d]  # [M, D]
  if path == "pre_logits/kernel" or (path == "head/kernel" and not has_pre_logits):
    return v[:d]  # [D, R] / [D, C]: input axis
  if path in ("pre_logits/bias", "head/bias") or path == "head/kernel":
    return v  # representation / class axes are kept
  return v[..., :d]  # every other leaf ends with the residual axis D


def narrow(params: PyTree, *, hidden_size: int, num_heads: int, mlp_dim: int) -> dict:
  """The tree restricted to the first `hidden_size` residual channels, the first `num_heads`
  heads (first hidden_size // num_heads dims of each) and the first `mlp_dim` MLP units."""
  flat = _flat(params)
  _check_plain(flat)
  q = flat["Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel"]
  big_d, big_h, big_dh = q.shape
  big_m = flat["Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"].shape[1]
  if hidden_size % num_heads:
    raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}.")
  dh = hidden_size // num_heads
  too_big = [f"{name} {small} > teacher's {big}" for name, small, big in (
      ("hidden_size", hidden_size, big_d), ("num_heads", num_heads, big_h),
      ("head dim", dh, big_dh), ("mlp_dim", mlp_dim, big_m)) if small > big or small <= 0]
  if too_big:
    raise ValueError("narrow() only removes channels: " + "; ".join(too_big) + ".")
  has_pre = "pre_logits/kernel" in flat
  out = {k: np.ascontiguousarray(_narrow_leaf(k, v, hidden_size, num_heads, dh, mlp_dim,
                                              has_pre)) for k, v in flat.items()}
  return traverse_util.unflatten_dict(out, sep="/")


def remap(params: PyTree, *, blocks: Sequence[int] | None = None, hidden_size: int | None = None,
          num_heads: int | None = None, mlp_dim: int | None = None) -> dict:
  """`select_blocks` (when `blocks` is given) then `narrow` (when any width is given; the
  others default to the teacher's)."""
  out = select_blocks(params, blocks) if blocks is not None else dict(params)
  if hidden_size is None and num_heads is None and mlp_dim is None:
    return out
  q = _flat(out)["Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel"]
  m = _flat(out)["Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"].shape[1]
  return narrow(out, hidden_size=hidden_size or q.shape[0], num_heads=num_heads or q.shape[1],
                mlp_dim=mlp_dim or m)


def student_fields(teacher_model: Any, *, num_layers: int, hidden_size: int | None = None,
                   num_heads: int | None = None, mlp_dim: int | None = None) -> dict:
  """`build_model` overrides of the student a remap produces (other ViT fields as the
  teacher's), e.g. for `config.model.overrides`."""
  t = teacher_model
  fields = {name: getattr(t, name) for name in _KEPT_FIELDS}
  fields.update(num_layers=num_layers, hidden_size=hidden_size or t.hidden_size,
                num_heads=num_heads or t.num_heads, mlp_dim=mlp_dim or t.mlp_dim)
  return fields


def remap_teacher(teacher: Any, out_path: str | os.PathLike, *,
                  blocks: Sequence[int] | None = None, num_layers: int | None = None,
                  hidden_size: int | None = None, num_heads: int | None = None,
                  mlp_dim: int | None = None) -> dict:
  """Writes the student remapped from a `jvt.methods.distill.teacher.Teacher` to `out_path` (vision_transformer
  npz, head included) and returns its `build_model` overrides (see `student_fields`).

  blocks: the teacher blocks to keep; default `evenly_spaced_blocks(L, num_layers)`, or every
  block when `num_layers` is None too.
  """
  from jvt.checkpoints import save_npz
  from jvt.models import build_model
  model = teacher.model
  if blocks is None:
    blocks = evenly_spaced_blocks(model.num_layers, num_layers or model.num_layers)
  params = remap(plain_params(teacher.params, model), blocks=blocks, hidden_size=hidden_size,
                 num_heads=num_heads, mlp_dim=mlp_dim)
  fields = student_fields(model, num_layers=len(blocks), hidden_size=hidden_size,
                          num_heads=num_heads, mlp_dim=mlp_dim)
  student = build_model("B/16", teacher.num_classes, **fields)
  save_npz(out_path, params, model=student)
  return fields


def main(argv: Sequence[str] | None = None) -> dict:
  """`python -m jvt.remap`: a teacher (run workdir or checkpoint file) -> a student npz."""
  import ml_collections
  from jvt.methods.distill.teacher import load_teacher
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--teacher_workdir", default="", help="a finished jvt run")
  parser.add_argument("--teacher", default="", help="or a checkpoint file (.npz/.safetensors)")
  parser.add_argument("--variant", default="B/16", help="--teacher's variant")
  parser.add_argument("--overrides", default="{}",
                      help='--teacher\'s other ViT fields as JSON, e.g. \'{"num_layers": 6}\'')
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--blocks", default="", help="e.g. 0,2,4 (default: evenly spaced)")
  parser.add_argument("--num_layers", type=int, default=0)
  parser.add_argument("--hidden_size", type=int, default=0)
  parser.add_argument("--num_heads", type=int, default=0)
  parser.add_argument("--mlp_dim", type=int, default=0)
  parser.add_argument("--out", required=True, help="the student's .npz")
  a = parser.parse_args(argv)
  cfg = ml_collections.ConfigDict(dict(workdir=a.teacher_workdir, path=a.teacher, format="",
                                       variant=a.variant, overrides=json.loads(a.overrides)))
  teacher = load_teacher(cfg, image_size=a.image_size, default_variant=a.variant,
                         default_num_classes=1)
  blocks = tuple(int(b) for b in a.blocks.split(",")) if a.blocks else None
  fields = remap_teacher(teacher, a.out, blocks=blocks, num_layers=a.num_layers or None,
                         hidden_size=a.hidden_size or None, num_heads=a.num_heads or None,
                         mlp_dim=a.mlp_dim or None)
  print(f"wrote {a.out}; build the student with model.overrides={fields}")
  return fields


if __name__ == "__main__":
  main()
