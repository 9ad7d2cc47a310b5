"""Shared fixtures for the model / method / partition tests: a tiny ViT, random parameter trees
and an independent numpy transcription of the ViT equations (with every tuning plug-in).

The numpy reference reads a flat `/`-joined parameter dict and decides which plug-ins to apply
from the leaves present, so it shares no code with `jvt.models`.
"""
from __future__ import annotations

import functools
import math
import os
import tempfile

from jaxlib import version as jaxlib_version  # the version only: no backend starts

# Tests compile hundreds of small programs and run each a handful of times, so compile time is
# most of their time:
# - `--xla_backend_optimization_level=0`: XLA's backend optimisation passes cost more compile
#   time than they save at run time (tests/methods 317 -> 242 s on the 2-core CI CPU);
# - `--xla_cpu_use_fusion_emitters=false`: XLA:CPU's older loop-fusion emitters compile faster
#   than its MLIR fusion emitters (the default run 919 -> 759 s on a 2-core Zen 4, 2026-12-03;
#   tests/test_row_chunks.py 83 -> 54 s). Only for the jaxlib it was measured on: XLA aborts
#   on a flag it does not know, and a later jaxlib may drop the older emitters.
# Set before jax first builds its CPU backend (the flags are read then); the subprocesses the
# tests start inherit them through `xla_flags`. Training and benchmarks outside the tests keep
# XLA's defaults (the older emitters' train step is not faster: ViT-S/16 full fine-tuning
# 0.95x in two alternating pairs).
TEST_XLA_FLAGS = ["--xla_backend_optimization_level=0"]
if jaxlib_version.__version__.startswith("0.10."):
  TEST_XLA_FLAGS.append("--xla_cpu_use_fusion_emitters=false")


def xla_flags(devices: int | None = None) -> str:
  """XLA_FLAGS for a test subprocess: the tests' flags, plus `devices` fake CPU devices if given.

  Any device count already in the environment is dropped, so `devices` is the one that counts.
  """
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count=")]
  if devices is not None:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  return " ".join(flags)


_missing = [f for f in TEST_XLA_FLAGS if f not in os.environ.get("XLA_FLAGS", "").split()]
if _missing:
  os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *_missing]).strip()

import jax  # noqa: E402  (after XLA_FLAGS is set)
import numpy as np
import pytest
import scipy.special
from flax import traverse_util

import jvt


@pytest.fixture(autouse=True, scope="session")
def _temp_files_under_pytest(tmp_path_factory):
  """Temporary files the library names for the user (a checkpoint mismatch's full key listing)
  go under pytest's own temporary tree during the tests, which pytest prunes, not into the
  system's /tmp, where every test run would leave them; subprocesses get it through TMPDIR."""
  directory = str(tmp_path_factory.mktemp("tempfile"))
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(tempfile, "tempdir", directory)
    patch.setenv("TMPDIR", directory)
    yield directory


# A tiny ViT: 3 blocks of width 32 with 4 heads, 8x8 patches on 24x24 images (9 patches).
SMALL = dict(hidden_size=32, mlp_dim=64, num_heads=4, num_layers=3, patch_size=8)
IMAGE = 24
NUM_CLASSES = 5


def flat(tree) -> dict:
  return traverse_util.flatten_dict(tree, sep="/")


def unflat(d: dict) -> dict:
  return traverse_util.unflatten_dict(d, sep="/")


def random_like(shapes, seed: int = 0, scale: float = 0.2, keep_zero=()) -> dict:
  """Random fp32 values for every leaf of a parameter tree (of ShapeDtypeStructs or arrays).

  Norm and SSF scales are drawn around 1, everything else around 0 (head, [CLS], LoRA B and
  other zero-initialised leaves included), so every leaf matters in the forward pass.
  Leaves whose path ends with one of `keep_zero` are zeros.
  """
  rng = np.random.default_rng(seed)
  out = {}
  for path, leaf in flat(shapes).items():
    shape = tuple(leaf.shape)
    if path.endswith(tuple(keep_zero)):
      out[path] = np.zeros(shape, np.float32)
    elif path.endswith(("/scale", "ssf_scale")):
      out[path] = (1.0 + scale * rng.standard_normal(shape)).astype(np.float32)
    else:
      out[path] = (scale * rng.standard_normal(shape)).astype(np.float32)
  return unflat(out)


def images(batch: int = 2, size: int = IMAGE, seed: int = 1) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def jit_apply(model):
  """One jitted `model.apply` per (hashable) model: tests reuse its compilation."""
  return jax.jit(model.apply, static_argnames=("train", "capture", "capture_layers"))


def small_model(tuning=None, **overrides):
  """`build_model("B/16", NUM_CLASSES, tuning)` with the tiny dims of SMALL (and overrides)."""
  return jvt.build_model("B/16", NUM_CLASSES, tuning, **{**SMALL, **overrides})


def small_params(model, seed: int = 0, **kwargs) -> dict:
  """Random values (see `random_like`) for every leaf of a tiny model, without jitting init."""
  return random_like(jvt.param_shapes(model, IMAGE), seed=seed, **kwargs)


# ----------------------------------------------------------------------- numpy reference ViT
def _gelu(x):
  return 0.5 * x * (1.0 + scipy.special.erf(x / math.sqrt(2.0)))


def _softmax(z):
  z = z - z.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


class NumpyViT:
  """The ViT equations in float64 numpy, driven by the leaves present in `params`.

  Plug-ins: `lora_a`/`lora_b` (y += alpha/r * x A B), `ssf_scale`/`ssf_shift` (y*s + t),
  `adapter_attn`/`adapter_mlp` (h + Up(gelu(Down h))), `adaptformer` (+ s * Up(relu(Down u)),
  u = the residual stream x with adaptformer_norm="none", its normed z with "ln"),
  prompts `Transformer/prompts/block_i` (deep: the sequence entering block i is
  [cls, P_i, image tokens]; shallow: only block 0 inserts, later blocks carry them).
  """

  def __init__(self, params, *, pool="tok", fc_norm=False, eps=1e-6, deep=True,
               lora_alpha=8.0, adaptformer_scale=0.1, adaptformer_norm="none", prompt_l2norm=False,
               prompt_mask=False):
    self.p = {k: np.asarray(v, np.float64) for k, v in flat(params).items()}
    self.pool, self.fc_norm, self.eps = pool, fc_norm, eps
    self.deep, self.lora_alpha, self.adaptformer_scale = deep, lora_alpha, adaptformer_scale
    self.adaptformer_norm = adaptformer_norm
    self.prompt_l2norm, self.prompt_mask = prompt_l2norm, prompt_mask

  def _ssf(self, y, owner):
    key = f"{owner}/ssf_scale" if owner else "ssf_scale"
    if key not in self.p:
      return y
    return y * self.p[key] + self.p[key.replace("ssf_scale", "ssf_shift")]

  def _ln(self, x, name):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    y = (x - mu) / np.sqrt(var + self.eps) * self.p[f"{name}/scale"] + self.p[f"{name}/bias"]
    return self._ssf(y, name)

  def _proj(self, x, name, in_axes=1):
    y = np.tensordot(x, self.p[f"{name}/kernel"], axes=in_axes) + self.p[f"{name}/bias"]
    if f"{name}/lora_a" in self.p:
      a, b = self.p[f"{name}/lora_a"], self.p[f"{name}/lora_b"]
      y = y + self.lora_alpha / a.shape[-1] * np.tensordot(
          np.tensordot(x, a, axes=in_axes), b, axes=1)
    return self._ssf(y, name)

  def _dense(self, x, name):
    return x @ self.p[f"{name}/kernel"] + self.p[f"{name}/bias"]

  def _bottleneck(self, x, name, act):
    return self._dense(act(self._dense(x, f"{name}/down")), f"{name}/up")

  def _block(self, x, i, num_prompts, rec):
    pre = f"Transformer/encoderblock_{i}"
    att = f"{pre}/MultiHeadDotProductAttention_0"
    p = num_prompts
    y = self._ln(x, f"{pre}/LayerNorm_0")
    q = self._proj(y, f"{att}/query")  # [B, T, H, Dh]
    k = self._proj(y, f"{att}/key")
    v = self._proj(y, f"{att}/value")
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    if self.prompt_mask and p:  # prompt queries see image tokens only
      logits[:, :, 1:1 + p, :1 + p] = -np.inf
    probs = _softmax(logits)  # [B, H, T, T]
    o = self._proj(np.einsum("bhqk,bkhd->bqhd", probs, v), f"{att}/out", in_axes=2)
    rec["input_patch_mean"] = x[:, 1 + p:].mean(axis=1)
    rec["attn_out_mean"] = o[:, 1 + p:].mean(axis=1)
    rec["cls_query"] = q[:, 0].reshape(q.shape[0], -1)
    rec["prompt_query"] = q[0, 1:1 + p].reshape(p, q.shape[2] * q.shape[3])
    rec["attention"] = probs
    if f"{pre}/adapter_attn/down/kernel" in self.p:
      o = o + self._bottleneck(o, f"{pre}/adapter_attn", _gelu)
    x = x + o
    z = self._ln(x, f"{pre}/LayerNorm_1")
    m = self._proj(_gelu(self._proj(z, f"{pre}/MlpBlock_0/Dense_0")), f"{pre}/MlpBlock_0/Dense_1")
    if f"{pre}/adapter_mlp/down/kernel" in self.p:
      m = m + self._bottleneck(m, f"{pre}/adapter_mlp", _gelu)
    if f"{pre}/adaptformer/down/kernel" in self.p:
      u = x if self.adaptformer_norm == "none" else z
      m = m + self.adaptformer_scale * self._bottleneck(
          u, f"{pre}/adaptformer", lambda h: np.maximum(h, 0.0))
    rec["tokens"] = x + m
    return x + m

  def _prompts(self, i, d):
    key = f"Transformer/prompts/block_{i}"
    if key not in self.p:
      return np.zeros((0, d))
    prompt = self.p[key]
    if self.prompt_l2norm:
      prompt = prompt / np.sqrt((prompt ** 2).sum(-1, keepdims=True))
    if "Transformer/prompts/proj/kernel" in self.p:
      prompt = self._dense(prompt, "Transformer/prompts/proj")
    return prompt

  def __call__(self, images):
    """Returns (logits, aux): aux "cls", "pre_logits" and "blocks"[i] with the intermediates
    of block i named as the model's capture keys ("prompts" only where block i inserts)."""
    x = np.asarray(images, np.float64)
    kernel = self.p["embedding/kernel"]  # [ph, pw, 3, D]
    ph, pw, c, d = kernel.shape
    b, h, w, _ = x.shape
    patches = x.reshape(b, h // ph, ph, w // pw, pw, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(b, (h // ph) * (w // pw), ph * pw * c)  # [B, N, ph*pw*3]
    x = self._ssf(patches @ kernel.reshape(-1, d) + self.p["embedding/bias"], "")
    n = x.shape[1]
    cls = np.broadcast_to(self.p["cls"], (b, 1, d))
    x = np.concatenate([cls, x], axis=1) + self.p["Transformer/posembed_input/pos_embedding"]
    blocks = []
    num_layers = len({k.split("/")[1] for k in self.p if "encoderblock_" in k})
    for i in range(num_layers):
      rec = {}
      if self.deep or i == 0:
        prompt = self._prompts(i, d)
        if len(prompt):
          rec["prompts"] = prompt
        x = np.concatenate([x[:, :1], np.broadcast_to(prompt, (b, *prompt.shape)),
                            x[:, x.shape[1] - n:]], axis=1)  # [B, 1 + P_i + N, D]
      x = self._block(x, i, x.shape[1] - 1 - n, rec)
      blocks.append(rec)
    if self.pool == "tok":
      feat = self._ln(x, "Transformer/encoder_norm")[:, 0]
    elif self.fc_norm:
      feat = self._ln(x[:, -n:].mean(axis=1), "fc_norm")
    else:
      feat = self._ln(x, "Transformer/encoder_norm")[:, -n:].mean(axis=1)
    aux = dict(cls=feat, blocks=blocks)
    if "pre_logits/kernel" in self.p:
      feat = np.tanh(self._dense(feat, "pre_logits"))
    aux["pre_logits"] = feat
    return self._dense(feat, "head"), aux

