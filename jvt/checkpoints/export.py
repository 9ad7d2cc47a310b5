"""`save_npz`: a jvt ViT parameter tree -> a google-research/vision_transformer `.npz`.

The file is flat `np.savez` with `/`-joined keys and the pre-Linen block names
(`MultiHeadDotProductAttention_1`, `LayerNorm_2`, `MlpBlock_3`), float32, so it loads back with
`load_pretrained` and with vision_transformer's own `checkpoint.load`. Only plain-ViT leaves
have a place in that layout: tuning parameters must be merged into the backbone first.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np

from jvt.checkpoints import formats
from jvt.checkpoints.pretrained import flatten_params, tree_geometry

PyTree = Any


def _pre_linen(key: str) -> str:
  parts = key.split("/")
  if len(parts) > 2 and parts[0] == "Transformer" and parts[1].startswith("encoderblock_"):
    parts[2] = formats.LINEN_TO_PRE_LINEN.get(parts[2], parts[2])
  return "/".join(parts)


def _check_model(flat: dict[str, Any], model: Any) -> None:
  """The tree's geometry must be the model's (catches exporting the wrong tree)."""
  expected = {"hidden size": model.hidden_size, "patch size": model.patch_size,
              "layers": model.num_layers, "heads": model.num_heads}
  geo = tree_geometry(flat)
  wrong = [f"{k} {geo.get(k)} in params vs {v} in model"
           for k, v in expected.items() if geo.get(k) != v]
  classes = np.shape(flat["head/kernel"])[-1] if "head/kernel" in flat else model.num_classes
  if classes != model.num_classes:
    wrong.append(f"{classes} classes in params vs {model.num_classes} in model")
  if wrong:
    raise ValueError("save_npz: params do not belong to this model: " + "; ".join(wrong) + ".")


def _write_atomically(path: str, arrays: dict[str, np.ndarray]) -> None:
  """np.savez into a temporary file next to `path`, then os.replace (never a half file)."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **arrays)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def save_npz(path: str | os.PathLike, params: PyTree, *, model: Any = None) -> None:
  """Writes `params` (a plain ViT tree) as a vision_transformer npz at `path`, atomically.

  Args:
    path: destination file (written as given; use a `.npz` suffix).
    params: backbone + head leaves only, fully addressable (gather sharded trees first).
    model: optional jvt ViT; when given, the tree's shapes are checked against it.

  Raises ValueError for tuning leaves (`jvt.merge` folds LoRA / SSF into the backbone first;
  prompts and adapters have no place in this layout) or a tree that does not fit `model`.
  """
  path = os.fspath(path)
  flat = flatten_params(params)
  extra = sorted(k for k in flat if not formats.is_backbone_leaf(k))
  if extra:
    raise ValueError(
        f"save_npz writes the plain vision_transformer layout, which has no place for {extra}. "
        "Merge the tuning methods into the backbone first (`plain_model, merged = "
        "jvt.merge(model, params)`) and pass the merged tree; prompts and adapters cannot be "
        "merged: keep such runs as RunCheckpointer checkpoints."
    )
  if model is not None:
    _check_model(flat, model)
  arrays = {}
  for key, value in flat.items():
    if not getattr(value, "is_fully_addressable", True):
      raise ValueError(f"save_npz: {key} is sharded across processes; gather it first "
                       "(jax.experimental.multihost_utils.process_allgather) on one process.")
    arrays[_pre_linen(key)] = np.asarray(value).astype(np.float32)
  _write_atomically(path, arrays)
