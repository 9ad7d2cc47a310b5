"""FacT (Jie & Deng, AAAI 2023, "FacT: Factor-Tuning for Lightweight Adaptation on Vision
Transformer", JieShibo/PETL-ViT `FacT/`): the weight increments of every block's projections,
tensorised into one [12 L, D, D] tensor, factorised with factors shared across layers.

Every projection gets `y <- y + s * V(drop(U(x) C))` with U [D, r] and V [r, D] shared by all
blocks (V zero-initialised, so training starts at the pretrained function) and a small core C
per projection:

  * `variant="tt"` (tensor-train): each projection has its own core, [r, r] for query, key,
    value and out, [r, 4r] for Dense_0 (its 4D outputs are four D-wide slices, each mapped by
    V) and [4r, r] for Dense_1 (its 4D inputs are four D-wide slices, each mapped by U);
  * `variant="tk"` (Tucker): the cores are C_l = G x_3 P[:, cols(l)] from one [r, r, r]
    tensor G and one [r, 12 L] matrix P (block l's columns: 4 for query, key, value, out, 8
    for the MLP, sliced and reshaped as the authors' code does).

Dropout 0.1 on the core's output in training (the authors' value); `scale` s (the authors
choose it per task, 0.01 to 100). Inits as the authors' torch defaults: U uniform(+-1/sqrt D)
(`nn.Linear`), TT cores uniform(+-1/sqrt fan_in), G and P xavier-uniform (torch's fans).
Needs mlp_dim = 4 D (the tensorisation splits the MLP into 4 D-wide slices).

Leaves `fact/{u, v}` (+ `g`, `p` for TK) and, for TT, `<projection>/fact_core`;
label `fact`. Mergeable: W <- W + s * dW, dW the factors' product (exact at evaluation, where
dropout is off).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jvt import barrier
from jvt import precision
from jvt.methods.base import Method

VARIANTS = ("tt", "tk")
TARGETS = ("query", "key", "value", "out", "mlp_in", "mlp_out")
# Within a block's 12 columns of P (TK), and a projection's param path.
_TK_COLUMN = {"query": 0, "key": 1, "value": 2, "out": 3}
_PATHS = {"query": "MultiHeadDotProductAttention_0/query",
          "key": "MultiHeadDotProductAttention_0/key",
          "value": "MultiHeadDotProductAttention_0/value",
          "out": "MultiHeadDotProductAttention_0/out",
          "mlp_in": "MlpBlock_0/Dense_0", "mlp_out": "MlpBlock_0/Dense_1"}


def _uniform(bound):
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound,
                                                                   bound)


def tt_core_shape(name: str, rank: int) -> tuple[int, int]:
  if name == "mlp_in":
    return (rank, 4 * rank)
  if name == "mlp_out":
    return (4 * rank, rank)
  return (rank, rank)


def tk_core(g, p, layer: int, name: str, xp=jnp):
  """Block `layer`'s core for projection `name` from G [r, r, r] and P [r, 12 L] (the authors'
  `FacTc @ FacTp[:, idx:idx + k]`, then their slicing and reshapes)."""
  r = g.shape[0]
  if name in _TK_COLUMN:
    c = g @ p[:, 12 * layer:12 * layer + 4]  # [r, r, 4]
    return c[:, :, _TK_COLUMN[name]]  # [r, r]
  c = g @ p[:, 12 * layer + 4:12 * layer + 12]  # [r, r, 8]
  if name == "mlp_in":
    return c[:, :, :4].reshape(r, 4 * r)  # [r, 4r], u @ core
  return xp.transpose(c[:, :, 4:].reshape(r, 4 * r))  # [4r, r], the authors' `@ fc2_FacTc.t()`


@dataclasses.dataclass(frozen=True)
class FacT(Method):
  """variant from VARIANTS; rank r (8; the authors use 8 or 16 for TT, 16 or 32 for TK);
  scale s; dropout on the cores' outputs in training (0.1)."""
  name = "fact"
  family = "parameter"
  summary = "FacT: tensor-factorised weight increments shared across layers"
  order = 20  # after DoRA's kernel update (its merge must come first), before SSF
  variant: str = "tt"
  rank: int = 8
  scale: float = 1.0
  dropout: float = 0.1

  def resolve(self, num_layers):
    if self.variant not in VARIANTS:
      raise ValueError(f"fact.variant={self.variant!r}; allowed: {VARIANTS}.")
    if self.rank <= 0:
      raise ValueError(f"fact.rank={self.rank}: must be a positive integer.")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"fact.dropout={self.dropout}: must be in [0, 1).")
    return self

  def partition_rules(self, num_layers):
    return ((r"fact/(u|v|g|p)|.*/fact_core", "fact"),)

  def on_model(self, scope, site):
    d, r = site.hidden_size, self.rank
    factors = _Factors(d, r, self.variant, 12 * site.num_layers, name="fact")
    return factors()

  def on_projection(self, scope, x, y, site):
    if site.name not in TARGETS:
      return y
    f = site.shared[self.name]
    d = f["u"].shape[0]
    r = self.rank
    if self.variant == "tt":
      core = scope.param("fact_core", _uniform(1.0 / np.sqrt(tt_core_shape(site.name, r)[0])),
                         tt_core_shape(site.name, r))
    else:
      core = tk_core(f["g"], f["p"], site.layer, site.name)
    u, v = f["u"], f["v"]
    # bf16 operands with fp32 sums on the mixed path, as the backbone's products (XLA:CPU
    # runs a bf16 x bf16 -> bf16 product in fp32 behind converts).
    mm = lambda a, b: precision.dense(a, b, None, 1, site.dtype, saveable=False)
    drop = nn.Dropout(self.dropout)
    lead = x.shape[:-site.in_axes]
    if site.name == "mlp_in":
      if y.shape[-1] != 4 * d:
        raise ValueError(f"fact needs mlp_dim = 4 * hidden_size (got {y.shape[-1]} and {d}).")
      c = drop(mm(mm(x, u), core), deterministic=not site.train)  # [..., 4r]
      delta = mm(c.reshape(*lead, 4, r), v).reshape(*lead, 4 * d)
    elif site.name == "mlp_out":
      if x.shape[-1] != 4 * d:
        raise ValueError(f"fact needs mlp_dim = 4 * hidden_size (got {x.shape[-1]} and {d}).")
      h = mm(x.reshape(*lead, 4, d), u).reshape(*lead, 4 * r)
      delta = mm(drop(mm(h, core), deterministic=not site.train), v)  # [..., D]
    else:
      c = drop(mm(mm(x.reshape(*lead, d), u), core), deterministic=not site.train)  # [..., r]
      delta = mm(c, v).reshape(y.shape)
    if site.name == "mlp_in":
      # The MLP's pre-activation. Its cotangent feeds Dense_0's input gradient, the bias's and,
      # through a transposed copy, V's. Without the barrier XLA:CPU scheduled that copy among
      # the products (29 ms a block at S/16 batch 8, against 2.7 ms with it) and kept 23% more
      # scratch; the step ran 1.15-1.31x faster with it (docs/performance.md, "FacT's MLP path").
      return barrier.materialize_cotangent(y + self.scale * delta)
    return y + self.scale * delta

  def merge(self, params):
    return merge_fact(params, variant=self.variant, scale=self.scale)


class _Factors(nn.Module):
  """The shared factors U [D, r], V [r, D] (and G [r, r, r], P [r, columns] for TK)."""
  hidden: int
  rank: int
  variant: str
  columns: int

  @nn.compact
  def __call__(self):
    d, r = self.hidden, self.rank
    out = {"u": self.param("u", _uniform(1.0 / np.sqrt(d)), (d, r)),
           "v": self.param("v", nn.initializers.zeros, (r, d))}
    if self.variant == "tk":
      # torch xavier_uniform_: G [r, r, r] has fans r * r and r * r; P [r, 12 L] has fans
      # 12 L (fan_in = size(1)) and r.
      out["g"] = self.param("g", _uniform(np.sqrt(6.0 / (2 * r * r))), (r, r, r))
      out["p"] = self.param("p", _uniform(np.sqrt(6.0 / (self.columns + r))), (r, self.columns))
    return out


def fact_delta(u, v, core, name: str, heads: int | None = None):
  """The increment dW (numpy float64) of projection `name` in jvt's kernel layout."""
  d, r = u.shape
  if name == "mlp_in":  # output a * D + e <- slice a of the core's 4r outputs, through V
    return ((u @ core).reshape(d, 4, r) @ v).reshape(d, 4 * d)
  if name == "mlp_out":  # input a * D + e -> U -> slot a * r + b of the core's 4r inputs
    w = (core @ v).reshape(4, r, d)  # [4, r, D]
    return np.einsum("eb,abo->aeo", u, w).reshape(4 * d, d)
  dw = u @ core @ v  # [D, D]
  if name == "out":
    return dw.reshape(heads, d // heads, d)
  return dw.reshape(d, heads, d // heads)


def merge_fact(params: dict, *, variant: str, scale: float) -> dict:
  """W <- W + s dW for every projection of every block; the FacT leaves are dropped."""
  flat = dict(traverse_util.flatten_dict(params, sep="/"))
  u = np.asarray(flat.pop("fact/u"), np.float64)
  v = np.asarray(flat.pop("fact/v"), np.float64)
  g = p = None
  if variant == "tk":
    g = np.asarray(flat.pop("fact/g"), np.float64)
    p = np.asarray(flat.pop("fact/p"), np.float64)
  blocks = sorted({k.split("/")[1] for k in flat if k.startswith("Transformer/encoderblock_")},
                  key=lambda b: int(b.rsplit("_", 1)[1]))
  for block in blocks:
    layer = int(block.rsplit("_", 1)[1])
    for name, path in _PATHS.items():
      prefix = f"Transformer/{block}/{path}"
      kernel = flat[f"{prefix}/kernel"]
      if variant == "tt":
        core = np.asarray(flat.pop(f"{prefix}/fact_core"), np.float64)
      else:
        core = tk_core(g, p, layer, name, xp=np)
      heads = np.asarray(kernel).shape[1] if name in ("query", "key", "value") else (
          np.asarray(kernel).shape[0] if name == "out" else None)
      dw = fact_delta(u, v, core, name, heads)
      flat[f"{prefix}/kernel"] = (np.asarray(kernel, np.float64) + scale * dw).astype(
          np.asarray(kernel).dtype)
  return traverse_util.unflatten_dict(flat, sep="/")
