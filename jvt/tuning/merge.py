"""Exact merging of LoRA and SSF parameters into the frozen weights (and LoRA unmerge).

After merging, the tree is the plain backbone's (plug-in leaves removed): it runs with a model
built without the plug-ins at zero inference overhead and exports with `save_npz`.
"""
from __future__ import annotations

import numpy as np
from flax import traverse_util


def _flat(params):
  return traverse_util.flatten_dict(params, sep="/")


def _lora_delta(flat, prefix, alpha, rank):
  a = np.asarray(flat[f"{prefix}/lora_a"], np.float64)  # [*in, r]
  b = np.asarray(flat[f"{prefix}/lora_b"], np.float64)  # [r, *out]
  return (alpha / rank) * np.tensordot(a, b, axes=1)  # [*in, *out]


def merge_lora(params: dict, *, alpha: float, rank: int) -> dict:
  """W <- W + (alpha / r) A B for every projection with LoRA leaves; drops the LoRA leaves."""
  flat = dict(_flat(params))
  for key in [k for k in flat if k.endswith("/lora_a")]:
    prefix = key[: -len("/lora_a")]
    kernel = flat[f"{prefix}/kernel"]
    merged = np.asarray(kernel, np.float64) + _lora_delta(flat, prefix, alpha, rank)
    flat[f"{prefix}/kernel"] = merged.astype(np.asarray(kernel).dtype)
    del flat[f"{prefix}/lora_a"], flat[f"{prefix}/lora_b"]
  return traverse_util.unflatten_dict(flat, sep="/")


def unmerge_lora(merged: dict, lora_params: dict, *, alpha: float, rank: int) -> dict:
  """Inverse of `merge_lora`: subtracts the update and restores the LoRA leaves.

  lora_params: a tree (e.g. the trainable subtree) holding the `lora_a` / `lora_b` leaves.
  """
  flat = dict(_flat(merged))
  lora = {k: v for k, v in _flat(lora_params).items() if k.endswith(("/lora_a", "/lora_b"))}
  for key in [k for k in lora if k.endswith("/lora_a")]:
    prefix = key[: -len("/lora_a")]
    kernel = flat[f"{prefix}/kernel"]
    restored = np.asarray(kernel, np.float64) - _lora_delta(lora, prefix, alpha, rank)
    flat[f"{prefix}/kernel"] = restored.astype(np.asarray(kernel).dtype)
  flat.update(lora)
  return traverse_util.unflatten_dict(flat, sep="/")


def merge_ssf(params: dict) -> dict:
  """Folds every `ssf_scale` / `ssf_shift` into the op it follows; drops the SSF leaves.

  Projection / Dense: kernel * scale (over output axes), bias * scale + shift, and a LoRA
  `lora_b` still present * scale (so `merge_ssf` and `merge_lora` commute).
  LayerNorm: scale * g, bias * g + shift. Patch embedding (top-level SSF): likewise on
  `embedding`.
  """
  flat = dict(_flat(params))
  for key in [k for k in flat if k.endswith("ssf_scale")]:
    owner = key[: -len("ssf_scale")].rstrip("/")
    scale = np.asarray(flat[key], np.float64)
    shift = np.asarray(flat[f"{owner}/ssf_shift" if owner else "ssf_shift"], np.float64)
    if not owner:  # the patch embedding's SSF lives at the root
      owner = "embedding"
    if f"{owner}/kernel" in flat:
      kernel = flat[f"{owner}/kernel"]
      flat[f"{owner}/kernel"] = (np.asarray(kernel, np.float64) * scale).astype(
          np.asarray(kernel).dtype)
      if f"{owner}/lora_b" in flat:  # an unmerged LoRA update is scaled too: (xW + xAB) * s
        lora_b = flat[f"{owner}/lora_b"]
        flat[f"{owner}/lora_b"] = (np.asarray(lora_b, np.float64) * scale).astype(
            np.asarray(lora_b).dtype)
      bias = flat[f"{owner}/bias"]
      flat[f"{owner}/bias"] = (np.asarray(bias, np.float64) * scale + shift).astype(
          np.asarray(bias).dtype)
    else:  # LayerNorm
      g = flat[f"{owner}/scale"]
      flat[f"{owner}/scale"] = (np.asarray(g, np.float64) * scale).astype(np.asarray(g).dtype)
      bias = flat[f"{owner}/bias"]
      flat[f"{owner}/bias"] = (np.asarray(bias, np.float64) * scale + shift).astype(
          np.asarray(bias).dtype)
    del flat[key], flat[key.replace("ssf_scale", "ssf_shift")]
  return traverse_util.unflatten_dict(flat, sep="/")
