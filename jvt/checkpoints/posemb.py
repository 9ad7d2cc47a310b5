"""Position-embedding resizing for a new image size or a different class-token layout.

A learned ViT position embedding is `[1, P + gh*gw, D]`: P prefix slots (0, or 1 for the cls
token) followed by a square grid in row-major order. Fine-tuning at another resolution keeps
the prefix and resamples the grid.

Interpolation:
- "linear" (default): separable linear interpolation with the corner samples aligned, the
  semantics of `scipy.ndimage.zoom(grid, (h/gh, w/gw, 1), order=1)` that
  google-research/vision_transformer uses; written in numpy (a [h, gh] weight matrix per axis).
- "bicubic": `jax.image.resize(..., method="cubic")`: Keys cubic (a=-0.5), half-pixel centres,
  antialiased when shrinking (the kernel widened by the scale, weights renormalised at the
  borders): the formula of torch's `interpolate(mode="bicubic", antialias=True)`, which timm,
  OpenCLIP and DINOv2's register models use.
- "dinov2": torch's `interpolate(mode="bicubic", antialias=False, scale_factor=(new + 0.1) /
  old)` as DINOv2's `interpolate_pos_encoding` calls it for its models without registers
  (interpolate_offset 0.1): cubic convolution with a=-0.75, half-pixel centres, source
  coordinates `(i + 0.5) * old / (new + 0.1) - 0.5`, border samples repeated. Written in
  numpy (a [new, old] weight matrix per axis).
"""
from __future__ import annotations

import math

import jax
import numpy as np

METHODS = ("linear", "bicubic", "dinov2")
DINOV2_OFFSET = 0.1  # DINOv2's interpolate_offset (models without registers)
_TORCH_CUBIC_A = -0.75


def num_prefix_tokens(num_tokens: int) -> int:
  """Prefix slots of a `[1, T, D]` position embedding: 0 if T is square, 1 if T-1 is."""
  if math.isqrt(num_tokens) ** 2 == num_tokens:
    return 0
  if num_tokens > 1 and math.isqrt(num_tokens - 1) ** 2 == num_tokens - 1:
    return 1
  raise ValueError(
      f"position embedding with {num_tokens} tokens is neither a square grid nor a cls slot "
      "plus a square grid; only square patch grids are supported."
  )


def _linear_weights(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] matrix of align-corners linear interpolation (scipy zoom order=1)."""
  scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
  pos = np.arange(n_out, dtype=np.float64) * scale  # input coordinate of each output sample
  lo = np.minimum(np.floor(pos).astype(np.int64), n_in - 1)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = pos - lo
  weights = np.zeros((n_out, n_in), np.float64)
  rows = np.arange(n_out)
  np.add.at(weights, (rows, lo), 1.0 - frac)
  np.add.at(weights, (rows, hi), frac)
  return weights


def _torch_cubic_weights(n_in: int, n_out: int, inv_scale: float) -> np.ndarray:
  """[n_out, n_in] matrix of torch's non-antialiased bicubic (a=-0.75, clamped borders)."""
  a = _TORCH_CUBIC_A
  src = (np.arange(n_out, dtype=np.float64) + 0.5) * inv_scale - 0.5
  base = np.floor(src)
  t = src - base
  coeffs = [((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,  # offset -1
            ((a + 2) * t - (a + 3)) * t * t + 1,  # offset 0
            ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,  # offset +1
            ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a]  # offset +2
  weights = np.zeros((n_out, n_in), np.float64)
  rows = np.arange(n_out)
  for offset, coeff in zip(range(-1, 3), coeffs):
    cols = np.clip(base.astype(np.int64) + offset, 0, n_in - 1)
    np.add.at(weights, (rows, cols), coeff)
  return weights


def resize_grid(grid: np.ndarray, size: tuple[int, int], method: str = "linear") -> np.ndarray:
  """Resamples a `[gh, gw, D]` grid to `[h, w, D]` (float32)."""
  if method not in METHODS:
    raise ValueError(f"unknown posemb_interpolation {method!r}; choose one of {METHODS}.")
  grid = np.asarray(grid, np.float32)
  h, w = size
  if grid.shape[:2] == (h, w):
    return grid
  if method == "linear":
    wh = _linear_weights(grid.shape[0], h)  # [h, gh]
    ww = _linear_weights(grid.shape[1], w)  # [w, gw]
    return np.einsum("hi,wj,ijd->hwd", wh, ww, grid.astype(np.float64)).astype(np.float32)
  if method == "dinov2":
    wh = _torch_cubic_weights(grid.shape[0], h, grid.shape[0] / (h + DINOV2_OFFSET))
    ww = _torch_cubic_weights(grid.shape[1], w, grid.shape[1] / (w + DINOV2_OFFSET))
    return np.einsum("hi,wj,ijd->hwd", wh, ww, grid.astype(np.float64)).astype(np.float32)
  resized = jax.image.resize(grid, (h, w, grid.shape[2]), method="cubic")
  return np.asarray(resized, np.float32)


def resize_posemb(posemb: np.ndarray, num_tokens: int, num_prefix: int,
                  method: str = "linear") -> np.ndarray:
  """`[1, T, D]` -> `[1, num_tokens, D]` with `num_prefix` (0 or 1) leading slots.

  The file's prefix count is read from T (square grid or one slot plus a square grid). A
  missing cls slot (big_vision, timm `no_embed_class`: position added before the cls token
  is concatenated) becomes zeros, which reproduces those models exactly; a cls slot the model
  does not have is dropped.
  """
  posemb = np.asarray(posemb, np.float32)
  if posemb.ndim != 3 or posemb.shape[0] != 1:
    raise ValueError(f"position embedding must be [1, T, D], got {list(posemb.shape)}.")
  file_prefix = num_prefix_tokens(posemb.shape[1])
  prefix, grid = posemb[:, :file_prefix], posemb[0, file_prefix:]  # [1, P, D], [N, D]
  if num_prefix > file_prefix:
    prefix = np.zeros((1, num_prefix, posemb.shape[2]), np.float32)
  prefix = prefix[:, :num_prefix]
  new_side = math.isqrt(num_tokens - num_prefix)
  if new_side * new_side != num_tokens - num_prefix:
    raise ValueError(
        f"model position embedding has {num_tokens} tokens with {num_prefix} prefix slots: "
        "the remaining tokens do not form a square grid."
    )
  side = math.isqrt(grid.shape[0])
  grid = resize_grid(grid.reshape(side, side, -1), (new_side, new_side), method)
  return np.concatenate([prefix, grid.reshape(1, new_side * new_side, -1)], axis=1)
