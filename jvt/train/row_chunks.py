"""The train step's forward pass over its batch in sequential row chunks.

Why: on XLA:CPU a frozen-backbone train step at 32 images runs slower per image than at 8
(ViT-S/16 VPT-Deep, fp32: 10.6 against 13.8 img/s), while PyTorch's stays flat. Running the
forward (and so its backward) as a `lax.map` over chunks of 8 rows brings batch 32 back to
batch 8's rate (13.2 img/s; LoRA and AdaptFormer +21%, partial-1 +12%) and lowers the step's
peak memory. It does not pay when most weights train: each chunk then computes its own weight
gradients over fewer rows and sums them (full fine-tuning 9.0 -> 6.8 img/s, partial-6 +1%;
fp32). In bf16 at batch 32 the picture is mixed: on a Zen 4 and a Xeon chunks ran full
fine-tuning 1.05-1.22x faster at +0.5 GB, and some frozen-backbone steps (BitFit, Convpass)
1.03-1.16x slower than one piece. Figures: docs/performance.md.

The chunked forward computes the same function: a ViT's forward is per example (no batch
statistics), so chunk outputs concatenate to the whole batch's, and a loss over the whole
batch (DA-VPT's metric losses pair examples across chunks) sees every row at once. Only
dropout draws differ: each chunk draws its own masks (rng folded with the chunk index).

Chunks take strided rows (chunk i = rows i, i + n, ...), like gradient accumulation's
microbatches, so every chunk is spread over all devices of the "data" axis.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

PyTree = Any

# "auto" (forward_chunk_rows=0) on CPU: rows per chunk on each device, the largest share of the
# parameters that may train and the fewest patches per image for chunking to pay (measured at
# 224 px with 16 px patches, docs/performance.md; small images run in one piece).
CPU_CHUNK_ROWS = 8
MAX_TRAINABLE_SHARE = 0.25
MIN_PATCHES = 196


def num_chunks(rows_setting: int, per_device_rows: int, *, trainable_share: float,
               patches: int, backend: str) -> int:
  """How many sequential chunks the forward of `per_device_rows` rows per device runs in.

  rows_setting: `config.forward_chunk_rows`. 0 ("auto"): chunks of `CPU_CHUNK_ROWS` rows on
  CPU when at most `MAX_TRAINABLE_SHARE` of the parameters train, each image has at least
  `MIN_PATCHES` patches and the rows split evenly into more than one chunk; one chunk
  otherwise and on every other backend (not measured there). N > 0: chunks of N rows per
  device (N must divide the rows; N >= the rows: one chunk).
  """
  check_rows(rows_setting, per_device_rows)
  if rows_setting == 0:
    if (backend != "cpu" or trainable_share > MAX_TRAINABLE_SHARE or patches < MIN_PATCHES
        or per_device_rows % CPU_CHUNK_ROWS or per_device_rows <= CPU_CHUNK_ROWS):
      return 1
    return per_device_rows // CPU_CHUNK_ROWS
  return max(1, per_device_rows // rows_setting)


def check_rows(rows_setting: int, per_device_rows: int) -> None:
  """Raises ValueError for a `config.forward_chunk_rows` the trainer cannot use (checked before
  any parameter is loaded)."""
  if rows_setting < 0:
    raise ValueError(f"forward_chunk_rows={rows_setting}: use 0 (auto: the backend's choice) "
                     "or the rows per device of each chunk (>= 1).")
  if 0 < rows_setting < per_device_rows and per_device_rows % rows_setting:
    raise ValueError(f"forward_chunk_rows={rows_setting} does not divide the {per_device_rows} "
                     "rows each device runs per forward pass (batch_size / devices / "
                     "grad_accum_steps): pick a divisor of it, or 0 for the backend's choice.")


def split_rows(tree: PyTree, n: int) -> PyTree:
  """[B, ...] -> [n, B / n, ...], part i holding rows i, i + n, i + 2n, ..."""
  def split(x):
    x = x.reshape(x.shape[0] // n, n, *x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return jax.tree.map(split, tree)


def _merge_leaf(path, part: jax.Array, whole: jax.ShapeDtypeStruct, n: int) -> jax.Array:
  """One output leaf of the n chunks ([n, ...]) as the whole batch's forward returns it."""
  if part.shape[1:] == whole.shape:  # no batch axis: the same value in every chunk
    return part[0]
  rows = part.shape[1]
  if whole.shape[:1] == (n * rows,) and part.shape[2:] == whole.shape[1:]:
    return jnp.swapaxes(part, 0, 1).reshape(whole.shape)  # inverse of split_rows
  raise ValueError(
      f"forward output {jax.tree_util.keystr(path)} has shape {whole.shape} for the whole "
      f"batch and {part.shape[1:]} per chunk: chunks can only merge outputs whose first axis "
      "is the batch, or that have no batch axis. Set forward_chunk_rows to the per-device "
      "batch to run the forward in one piece.")


def chunked_forward(forward: Callable[[jax.Array, jax.Array], PyTree], images: jax.Array,
                    rng: jax.Array, n: int) -> PyTree:
  """forward(images [B, ...], rng) computed as n sequential calls on strided row chunks.

  Returns what forward(images, rng) returns: leaves with a leading batch axis are the chunks'
  rows back in order; leaves without one (e.g. parameters the model returns) come from the
  first chunk. Chunk i draws its randomness from fold_in(rng, i).
  """
  if n == 1:
    return forward(images, rng)
  if images.shape[0] % n:
    raise ValueError(f"a batch of {images.shape[0]} rows does not split into {n} forward chunks: "
                     "use a chunk count that divides the (micro)batch.")
  whole = jax.eval_shape(forward, images, rng)
  parts = jax.lax.map(lambda a: forward(a[1], jax.random.fold_in(rng, a[0])),
                      (jnp.arange(n), split_rows(images, n)))
  return jax.tree_util.tree_map_with_path(
      lambda path, part, w: _merge_leaf(path, part, w, n), parts, whole)
