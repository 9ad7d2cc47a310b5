"""DoRA (Liu et al., ICML 2024, NVlabs/DoRA): a weight-decomposed low-rank update of chosen
projections, `W' = m * (W + s A B) / ||W + s A B||`, s = alpha / r.

The norm is taken per output feature over the input axes, the column norm of jvt's [in, out]
kernel, as the authors' code computes it (torch's `norm(dim=1)` of an [out, in] weight): `m`
holds one magnitude per output feature, initialised to ||W||, so with B = 0 the model starts at
the pretrained function. jvt stores it as `m = ||W|| + dora_dm` with `dora_dm` initialised to
0: the pretrained kernel is loaded after initialisation (`jvt.load_pretrained`), so an `m`
drawn at init would hold the norm of the random kernel; the offset has the same gradient as m,
so training is unchanged. As the authors' default (`dora_simple`), the norm is a constant for
the gradient (`stop_gradient`), which saves the memory of its backward pass;
`detach_norm=False` lets the gradient through it. A is drawn as loralib draws it
(uniform(+-1/sqrt(fan_in))), B is zero.

Leaves `<projection>/dora_a` [*in, r], `dora_b` [r, *out] and `dora_dm` [*out] beside the
frozen kernel, label `dora`; `targets` as `lora`'s. Mergeable: the kernel becomes W'. A
projection takes one low-rank method: LoRA together with DoRA is refused.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jvt.methods.base import Method
from jvt.methods.lora import check_low_rank


def _column_norm(w, in_axes):
  """||w|| over the input axes: [*out]."""
  return jnp.sqrt(jnp.sum(jnp.square(w), axis=tuple(range(in_axes))))


@dataclasses.dataclass(frozen=True)
class DoRA(Method):
  """rank r > 0, alpha (the low-rank update is scaled by alpha / r), targets from lora's
  TARGETS, detach_norm (the authors' default: the norm is a constant for the gradient)."""
  name = "dora"
  family = "parameter"
  summary = "DoRA: magnitude and low-rank direction updates of chosen projections"
  order = 10  # a kernel hook: before output-side plug-ins (SSF) and their merges
  rank: int = 8
  alpha: float = 8.0
  targets: tuple[str, ...] = ("query", "value")
  detach_norm: bool = True

  def resolve(self, num_layers):
    check_low_rank("dora", self.rank, self.targets)
    return self

  def claims(self, num_layers):
    # One low-rank update per projection: the same claim as lora's, with a different value.
    return {"lora_targets": ("dora",) + tuple(self.targets)}

  def partition_rules(self, num_layers):
    return ((r".*/dora_(a|b|dm)", "dora"),)

  def on_kernel(self, scope, kernel, site):
    if site.name not in self.targets:
      return kernel
    in_shape = kernel.shape[:site.in_axes]
    out_shape = kernel.shape[site.in_axes:]
    bound = 1.0 / np.sqrt(int(np.prod(in_shape)))
    a = scope.param("dora_a", lambda key, shape: jax.random.uniform(
        key, shape, jnp.float32, -bound, bound), (*in_shape, self.rank))
    b = scope.param("dora_b", nn.initializers.zeros, (self.rank, *out_shape))
    dm = scope.param("dora_dm", nn.initializers.zeros, tuple(out_shape))
    w = kernel.astype(jnp.float32)
    m = _column_norm(w, site.in_axes) + dm  # [*out]
    v = w + (self.alpha / self.rank) * jnp.tensordot(a, b, axes=1)  # [*in, *out]
    norm = _column_norm(v, site.in_axes)
    if self.detach_norm:
      norm = jax.lax.stop_gradient(norm)
    return (m / norm) * v

  def merge(self, params):
    return merge_dora(params, alpha=self.alpha, rank=self.rank)


def merge_dora(params: dict, *, alpha: float, rank: int) -> dict:
  """kernel <- m (W + s A B) / ||W + s A B||, m = ||W|| + dm, for every projection with DoRA
  leaves (in float64); the DoRA leaves are dropped."""
  flat = dict(traverse_util.flatten_dict(params, sep="/"))
  for key in [k for k in flat if k.endswith("/dora_a")]:
    prefix = key[: -len("/dora_a")]
    kernel = flat[f"{prefix}/kernel"]
    a = np.asarray(flat.pop(f"{prefix}/dora_a"), np.float64)
    b = np.asarray(flat.pop(f"{prefix}/dora_b"), np.float64)
    dm = np.asarray(flat.pop(f"{prefix}/dora_dm"), np.float64)
    axes = tuple(range(a.ndim - 1))  # the input axes
    w = np.asarray(kernel, np.float64)
    v = w + (alpha / rank) * np.tensordot(a, b, axes=1)
    m = np.sqrt(np.sum(w ** 2, axis=axes)) + dm
    norm = np.sqrt(np.sum(v ** 2, axis=axes))
    flat[f"{prefix}/kernel"] = (m / norm * v).astype(np.asarray(kernel).dtype)
  return traverse_util.unflatten_dict(flat, sep="/")
