"""DA-VPT's metric-learning terms: L_ML(X, P) and L_ML(P, x_cls) at the proxy blocks.

At each proxy block l the prompts P_l [M, D] act as class proxies (class c -> prompt
mapping[c]) in a Proxy-Anchor loss:
  * patch term L_ML(X, P): features = a per-image patch feature of block l (paper: mean of the
    attention-output image tokens; released code: mean of the block's input image tokens),
    proxies = P_l;
  * cls term L_ML(P, x_cls): features = block l's [CLS] (paper: the block's output [CLS];
    released code: the query projection of norm1(x_cls)), proxies = P_l or, in the paper, the
    query projection of the prompts.
Both are averaged over the proxy blocks. Pure functions of the model's `aux`.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jvt.losses.proxy_anchor import proxy_anchor_loss


def capture_keys(spec) -> tuple[str, ...]:
  """What the model must capture at the proxy blocks for a DA-VPT spec."""
  keys = [spec.patch_feature, "prompts"]
  keys.append("cls_query" if spec.cls_query else "tokens")
  if spec.prompt_query:
    keys.append("prompt_query")
  return tuple(dict.fromkeys(keys))


def metric_terms(aux: dict, labels: jax.Array, mapping: jax.Array, spec: Any,
                 valid: jax.Array | None = None) -> dict[str, jax.Array]:
  """{"patch": L_ML(X, P), "cls": L_ML(P, x_cls)} averaged over `spec.proxy_layers`.

  aux: the model's aux with aux["blocks"][l] captured for every proxy layer l (see
  `capture_keys`); labels [B] int; mapping [C] int (class -> prompt).
  """
  proxy_ids = jnp.take(mapping, labels)  # [B]
  kw = dict(alpha=spec.alpha, delta_pos=spec.delta_pos, delta_neg=spec.delta_neg,
            normalize_positives=spec.normalize_positives, scale_ratio=spec.scale_ratio,
            valid=valid)
  patch, cls = [], []
  for layer in spec.proxy_layers:
    block = aux["blocks"][layer]
    prompts = block["prompts"]  # [M, D]
    patch.append(proxy_anchor_loss(block[spec.patch_feature], prompts, proxy_ids, **kw))
    cls_feature = block["cls_query"] if spec.cls_query else block["tokens"][:, 0]  # [B, D]
    cls_proxies = block["prompt_query"] if spec.prompt_query else prompts
    cls.append(proxy_anchor_loss(cls_feature, cls_proxies, proxy_ids, **kw))
  return {"patch": jnp.mean(jnp.stack(patch)), "cls": jnp.mean(jnp.stack(cls))}


def _settings(model):
  """The DA-VPT settings among the model's methods (by name: losses import no method)."""
  return next((m for m in getattr(model, "methods", ())
               if m.name in ("da_vpt", "da_vpt_plus")), None)


def da_vpt_terms(model, params, images, labels, mapping) -> dict[str, jax.Array]:
  """The unweighted DA-VPT terms of `model` (built with da_vpt / da_vpt_plus) on a batch.

  Deterministic (no dropout), differentiable wrt `params`, jit-compiled once per model and
  shape. Returns {"patch": L_ML(X, P), "cls": L_ML(P, x_cls)}, each averaged over the model's
  proxy layers. images [B, H, W, 3], labels [B] int in [0, C), mapping [C] int in [0, M).
  """
  spec = _settings(model)
  if spec is None:
    raise ValueError("da_vpt_terms needs a model built with tuning method 'da_vpt' or "
                     "'da_vpt_plus'.")
  labels, mapping = np.asarray(labels), np.asarray(mapping)
  c, m = model.num_classes, spec.num_proxy_prompts
  if m > c and spec.surplus_prompts != "unused":
    raise ValueError(f"da_vpt.num_proxy_prompts={m} is more than the model's {c} classes: "
                     "lower it or set surplus_prompts='unused'.")
  if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be int [B={len(images)}]; got {labels.dtype} {labels.shape}.")
  if labels.size and (labels.min() < 0 or labels.max() >= c):
    raise ValueError(f"labels must lie in [0, num_classes={c}); got values in "
                     f"[{labels.min()}, {labels.max()}].")
  if (mapping.shape != (c,) or not np.issubdtype(mapping.dtype, np.integer)
      or (c and (mapping.min() < 0 or mapping.max() >= m))):
    raise ValueError(f"mapping must be int [num_classes={c}] with values in "
                     f"[0, num_proxy_prompts={m}); got shape {mapping.shape}.")
  return _jitted_terms(model)(params, images, jnp.asarray(labels), jnp.asarray(mapping))


@functools.lru_cache(maxsize=8)
def _jitted_terms(model):
  """model -> jitted (params, images, labels, mapping) -> terms (one compilation per shape)."""
  spec = _settings(model)

  def terms(params, images, labels, mapping):
    _, aux = model.apply({"params": params}, images, train=False, capture=capture_keys(spec),
                         capture_layers=spec.proxy_layers)
    return metric_terms(aux, labels, mapping, spec)

  return jax.jit(terms)
