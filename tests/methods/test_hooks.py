"""The backbone's hook points carry what the methods to come need: every hook is called where
and with what the docs say (block index, prompt count, token grid, train flag), keys / values
can grow (key-value prompts), a kernel can be replaced (DoRA), the input image changed (pixel
prompts), and arrays created once reach every block, under remat too (factors shared by all
layers, as FacT's). Each toy method below is checked against a second computation."""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jvt
from jvt.methods import Method
from jvt.models.layers import Projection
from jvt.models.vit import MultiHeadDotProductAttention

from conftest import IMAGE, SMALL, flat, images, small_model, small_params, unflat

CALLS: list[tuple] = []


@dataclasses.dataclass(frozen=True)
class Recorder(Method):
  """Records (hook, layer, num_prompts, grid, name, train) at trace time."""
  name = "recorder"
  # Its `on_branch` reshapes the image tokens to the grid, so every block computes every row.
  rowwise = False

  def _log(self, hook, site):
    CALLS.append((hook, site.layer, site.num_prompts, site.grid, site.name, site.train))

  def on_image(self, scope, images, site):
    self._log("image", site)
    return images

  def on_patch_embedding(self, scope, x, site):
    self._log("patch_embedding", site)
    assert x.shape[1:3] == site.grid
    return x

  def on_tokens(self, shared, x, site):
    self._log("tokens", site)
    assert x.shape[1] == 1 + site.num_prompts + site.grid[0] * site.grid[1]
    return x

  def on_kernel(self, scope, kernel, site):
    self._log("kernel", site)
    return kernel

  def on_keys_values(self, scope, k, v, site):
    self._log("keys_values", site)
    return k, v

  def on_branch(self, scope, x, z, y, site):
    self._log("branch", site)
    n = site.grid[0] * site.grid[1]
    assert x.shape[1] == 1 + site.num_prompts + n  # image tokens reshape to the grid
    x[:, 1 + site.num_prompts:].reshape(x.shape[0], *site.grid, x.shape[-1])
    return y

  def on_norm(self, scope, x, y, site):
    self._log("norm", site)
    return y


def test_every_hook_is_told_where_it_runs():
  CALLS.clear()
  model = small_model([dict(method="vpt", num_prompts=2, deep=False), Recorder()])
  jax.eval_shape(lambda: model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)},
                                    jnp.zeros((1, IMAGE, IMAGE, 3)), train=True))
  grid = (IMAGE // SMALL["patch_size"],) * 2
  by_hook = {}
  for hook, *rest in CALLS:
    by_hook.setdefault(hook, []).append(tuple(rest))
  assert by_hook["image"] == [(-1, 0, (0, 0), "", True)]
  assert by_hook["patch_embedding"] == [(-1, 0, grid, "", True)]
  # VPT-Shallow (earlier in hook order) inserted 2 prompts before block 0; they are carried.
  assert by_hook["tokens"] == [(0, 2, grid, "", True), (1, 2, grid, "", True),
                               (2, 2, grid, "", True)]
  kernels = [(layer, name) for layer, _, _, name, _ in by_hook["kernel"]]
  assert kernels == [(l, n) for l in range(3)
                     for n in ("query", "key", "value", "out", "mlp_in", "mlp_out")]
  assert [(l, n) for l, _, _, n, _ in by_hook["branch"]] == [
      (l, n) for l in range(3) for n in ("attn", "mlp")]
  assert all(p == 2 and g == grid for _, p, g, _, _ in by_hook["branch"])
  norms = [(l, n) for l, _, _, n, _ in by_hook["norm"]]
  assert norms == [(l, n) for l in range(3) for n in ("LayerNorm_0", "LayerNorm_1")] + [
      (-1, "encoder_norm")]
  assert len(by_hook["keys_values"]) == 3


@dataclasses.dataclass(frozen=True)
class KVPrompts(Method):
  """Key-value prompts (E2VPT-like): P learnable keys and values appended in every attention."""
  name = "kv_prompts"
  num: int = 3

  def on_keys_values(self, scope, k, v, site):
    heads, dh = k.shape[2:]
    pk = scope.param("kv_key", nn.initializers.normal(1.0), (self.num, heads, dh))
    pv = scope.param("kv_value", nn.initializers.normal(1.0), (self.num, heads, dh))
    b = k.shape[0]
    k = jnp.concatenate([k, jnp.broadcast_to(pk, (b, *pk.shape))], axis=1)
    v = jnp.concatenate([v, jnp.broadcast_to(pv, (b, *pv.shape))], axis=1)
    return k, v


def _np_attention(x, p, extra_k=None, extra_v=None, mask=None):
  q = np.tensordot(x, p["query"]["kernel"], 1) + p["query"]["bias"]
  k = np.tensordot(x, p["key"]["kernel"], 1) + p["key"]["bias"]
  v = np.tensordot(x, p["value"]["kernel"], 1) + p["value"]["bias"]
  if extra_k is not None:
    k = np.concatenate([k, np.broadcast_to(extra_k, (x.shape[0], *extra_k.shape))], 1)
    v = np.concatenate([v, np.broadcast_to(extra_v, (x.shape[0], *extra_v.shape))], 1)
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
  if mask is not None:
    logits = np.where(mask, logits, -np.inf)
  logits = logits - logits.max(-1, keepdims=True)
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  y = np.einsum("bhqk,bkhd->bqhd", probs, v)
  return np.tensordot(y, p["out"]["kernel"], 2) + p["out"]["bias"]


@pytest.mark.parametrize("with_mask", [False, True])
def test_keys_values_can_grow_and_masks_follow(with_mask):
  d, heads, t = 16, 2, 5
  attn = MultiHeadDotProductAttention(heads, (KVPrompts(),))
  x = np.random.default_rng(0).standard_normal((2, t, d)).astype(np.float32)
  site = jvt.methods.Site(layer=0)
  mask = None
  if with_mask:  # query 1 may not see token 0 (as DA-VPT's prompt mask), new keys stay visible
    mask = np.ones((1, 1, t, t), bool)
    mask[..., 1, 0] = False
  params = attn.init(jax.random.key(0), x, mask, True, site)["params"]
  params = jax.tree.map(lambda a: np.asarray(a) + 0.1, params)  # non-zero biases
  got = attn.apply({"params": params}, x, mask, True, site)[0]
  full_mask = None if mask is None else np.concatenate([mask, np.ones((1, 1, t, 3), bool)], -1)
  want = _np_attention(x.astype(np.float64), params, params["kv_key"], params["kv_value"],
                       full_mask)
  np.testing.assert_allclose(got, want, atol=2e-5)
  assert np.abs(want - _np_attention(x.astype(np.float64), params, mask=mask)).max() > 1e-3


@dataclasses.dataclass(frozen=True)
class DoRA(Method):
  """DoRA-like: the kernel replaced by m * W / ||W||_col (m starts at the column norms)."""
  name = "dora"

  def on_kernel(self, scope, kernel, site):
    w = kernel.reshape(-1, math.prod(site.features))  # [in, out]
    norm = jnp.linalg.norm(w, axis=0)  # [out]
    m = scope.param("magnitude", lambda key, shape: norm, norm.shape)
    return (w * (m / norm)).reshape(kernel.shape)


def test_a_kernel_can_be_replaced():
  proj = Projection((4, 3), methods=(DoRA(),))
  x = np.random.default_rng(1).standard_normal((2, 6)).astype(np.float32)
  site = jvt.methods.Site(name="query")
  params = proj.init(jax.random.key(0), x, site)["params"]
  w = np.asarray(params["kernel"]).reshape(6, 12)
  np.testing.assert_allclose(params["magnitude"], np.linalg.norm(w, axis=0), rtol=1e-6)
  np.testing.assert_allclose(proj.apply({"params": params}, x, site),
                             (x @ w).reshape(2, 4, 3), atol=1e-5)  # identity at init
  scaled = dict(params, magnitude=params["magnitude"] * np.linspace(0.5, 2, 12))
  want = (x @ (w * np.linspace(0.5, 2, 12))).reshape(2, 4, 3)
  np.testing.assert_allclose(proj.apply({"params": scaled}, x, site), want, atol=1e-5)


@dataclasses.dataclass(frozen=True)
class PixelFrame(Method):
  """Pixel-space prompt (VP-like): a learnable image added to the input."""
  name = "pixel_frame"

  def on_image(self, scope, images, site):
    frame = scope.param("frame", nn.initializers.zeros, images.shape[1:])
    return images + frame


@dataclasses.dataclass(frozen=True)
class SharedDelta(Method):
  """FacT-like: one [D, D] delta created once at the root, scaled per block, added to every
  block's out-projection kernel."""
  name = "shared_delta"

  def on_model(self, scope, site):
    d = site.hidden_size
    return scope.param("delta", nn.initializers.normal(0.1), (d, d))

  def on_kernel(self, scope, kernel, site):
    if site.name != "out":
      return kernel
    scale = scope.param("delta_scale", nn.initializers.ones, ())
    delta = site.shared[self.name] * scale  # [D, D] -> the out kernel's [H, Dh, D]
    return kernel + delta.reshape(kernel.shape)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_root_and_shared_parameters_match_a_plain_model_with_edited_weights(remat):
  model = small_model([dict(method="linear"), PixelFrame(), SharedDelta()], remat=remat)
  params = small_params(model, seed=2)
  f = flat(params)
  assert f["frame"].shape == (IMAGE, IMAGE, 3) and f["delta"].shape == (32, 32)
  assert "Transformer/encoderblock_2/MultiHeadDotProductAttention_0/out/delta_scale" in f
  plain = small_model(remat=remat)
  edited = {k: v for k, v in f.items()
            if k not in ("frame", "delta") and not k.endswith("delta_scale")}
  for i in range(3):
    out = f"Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/out"
    edited[f"{out}/kernel"] = f[f"{out}/kernel"] + (
        f["delta"] * f[f"{out}/delta_scale"]).reshape(f[f"{out}/kernel"].shape)
  x = images()
  got = model.apply({"params": params}, x)[0]
  want = plain.apply({"params": unflat(edited)}, x + f["frame"])[0]
  np.testing.assert_allclose(got, want, atol=1e-5)
  grads = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x)[0] ** 2))(params)
  assert np.abs(flat(grads)["delta"]).max() > 0  # the shared array trains through every block
