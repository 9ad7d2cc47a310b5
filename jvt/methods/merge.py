"""`merge(model, params) -> (plain_model, merged_params)`: every method folded into the weights.

Each method merges itself (`Method.merge`): LoRA adds (alpha / r) A B to its kernels, SSF folds
its scale and shift into the preceding linear map or norm, `distill_proj` is dropped, methods
that only choose what trains (bitfit, layernorm, partial, full, linear) add nothing. A method
whose computation a plain ViT cannot hold (prompts, adapters) raises `NotMergeableError`
naming it. The result is the plain backbone's tree; it runs in `plain_model` (the same ViT
as `jvt.build_model` builds it without tuning: a linear probe) with the same logits and
exports with `jvt.checkpoints.save_npz`.
"""
from __future__ import annotations

from typing import Any

from jvt.methods.base import NotMergeableError
from jvt.methods.registry import resolve_tuning

PyTree = Any


def mergeable(model) -> bool:
  """Whether every method of `model` merges into a plain ViT."""
  return all(m.mergeable for m in model.methods)


def merge(model, params: PyTree) -> tuple[Any, dict]:
  """(plain ViT, params merged into its weights); see the module docstring."""
  blocked = [m.name for m in model.methods if not m.mergeable]
  if blocked:
    raise NotMergeableError(
        f"jvt.merge: method(s) {blocked} cannot be merged into a plain ViT: they add "
        "computation (prompts, adapters, ...) that the backbone's weights cannot hold. Keep "
        "such models with their plug-ins (checkpoints, export/trainable.npz); "
        "mergeable methods: LoRA, SSF, and those that only choose what trains.")
  merged = dict(params)
  for m in model.methods:
    merged = m.merge(merged)
  linear = resolve_tuning(dict(method="linear"), model.num_layers)
  return model.clone(methods=linear.methods, partition_rules=linear.rules), merged
