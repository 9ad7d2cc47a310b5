"""Proxy-Anchor loss (Kim et al., CVPR 2020) with prompts as proxies, as DA-VPT uses it.

For proxies p (the rows of `proxies`) and features f_i with positive proxy `proxy_ids[i]`:

  L = 1/Z * sum_{p in P+} log(1 + sum_{i in F+_p} exp(-alpha (s(p, f_i) - delta_pos)))
    + 1/M * sum_{p}       log(1 + sum_{j in F-_p} exp( alpha (s(p, f_j) - delta_neg)))

with s the cosine similarity times `scale_ratio`, P+ the proxies with at least one positive in
the batch, and Z = |P+| (paper) or M (the DA-VPT released code). See docs/losses.md.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jvt.losses.classification import compute_dtype

NORMALIZERS = ("with_positives", "all")


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps) along `axis`; zero vectors stay zero with finite gradients."""
  sq_norm = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq_norm, eps * eps))


def log1p_sum_exp(logits: jax.Array, axis: int = -1) -> jax.Array:
  """log(1 + sum(exp(logits))) along `axis`, stable; entries at -inf contribute nothing.

  Computed as a logsumexp with a 0 appended, so the running maximum is always finite and the
  gradient of a masked (-inf) entry is exactly 0.
  """
  zeros = jnp.zeros_like(jnp.take(logits, jnp.array([0]), axis=axis))
  return jax.nn.logsumexp(jnp.concatenate([zeros, logits], axis=axis), axis=axis)


def proxy_anchor_loss(
    features: jax.Array,
    proxies: jax.Array,
    proxy_ids: jax.Array,
    *,
    alpha: float = 32.0,
    delta_pos: float = 0.1,
    delta_neg: float = -0.1,
    normalize_positives: str = "with_positives",
    scale_ratio: float = 1.0,
    valid: jax.Array | None = None,
) -> jax.Array:
  """Scalar Proxy-Anchor loss of `features` [B, D] against `proxies` [M, D].

  Args:
    features: [B, D] sample embeddings (any scale; they are l2-normalised here).
    proxies: [M, D] proxy vectors (l2-normalised here).
    proxy_ids: [B] int in [0, M): the positive proxy of each sample. Several classes may share
      a proxy; that is resolved by the caller's class -> proxy mapping.
    alpha: the scale of the similarities inside the exponentials (32 in the paper).
    delta_pos: margin of the positive term, exp(-alpha (s - delta_pos)).
    delta_neg: margin of the negative term, exp(alpha (s - delta_neg)); Kim et al. use -0.1.
    normalize_positives: "with_positives" divides the positive term by the number of proxies
      with at least one positive in the batch (paper); "all" divides it by M (released code).
    scale_ratio: extra factor on the cosine similarity (DA-VPT's released `scale_ratio`).
    valid: optional [B] bool mask; False samples (padding) are neither positives nor negatives.

  Returns:
    Scalar loss in at least float32. Jit-friendly: no Python control flow on values.
  """
  if normalize_positives not in NORMALIZERS:
    raise ValueError(
        f"normalize_positives must be one of {NORMALIZERS}; got {normalize_positives!r}.")
  if features.ndim != 2 or proxies.ndim != 2 or features.shape[1] != proxies.shape[1]:
    raise ValueError(
        f"expected features [B, D] and proxies [M, D] with the same D; got features "
        f"{features.shape} and proxies {proxies.shape}.")
  if proxy_ids.shape != features.shape[:1]:
    raise ValueError(
        f"proxy_ids must have shape [B] = {features.shape[:1]}; got {proxy_ids.shape}.")
  if valid is not None and valid.shape != features.shape[:1]:
    raise ValueError(f"valid must have shape [B] = {features.shape[:1]}; got {valid.shape}.")

  num_proxies = proxies.shape[0]
  dtype = compute_dtype(features, proxies)
  f = l2_normalize(features.astype(dtype))  # [B, D]
  p = l2_normalize(proxies.astype(dtype))  # [M, D]
  sim = scale_ratio * (p @ f.T)  # [M, B]

  is_pos = jax.nn.one_hot(proxy_ids, num_proxies, dtype=jnp.bool_).T  # [M, B]
  is_neg = ~is_pos
  if valid is not None:
    keep = jnp.asarray(valid, jnp.bool_)[None, :]  # [1, B]
    is_pos = is_pos & keep
    is_neg = is_neg & keep

  pos_logits = jnp.where(is_pos, -alpha * (sim - delta_pos), -jnp.inf)  # [M, B]
  neg_logits = jnp.where(is_neg, alpha * (sim - delta_neg), -jnp.inf)  # [M, B]
  pos_terms = log1p_sum_exp(pos_logits)  # [M], 0 for proxies without positives
  neg_terms = log1p_sum_exp(neg_logits)  # [M]

  if normalize_positives == "with_positives":
    num_with_pos = jnp.sum(jnp.any(is_pos, axis=1)).astype(dtype)
    pos_norm = jnp.maximum(num_with_pos, 1.0)
  else:
    pos_norm = jnp.asarray(num_proxies, dtype)
  return jnp.sum(pos_terms) / pos_norm + jnp.sum(neg_terms) / num_proxies
