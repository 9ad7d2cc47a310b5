"""The PyTorch + timm side of the comparison: the same train steps as `benchmarks/run.py`.

    pip install -e ".[bench]"   # torch, timm
    python benchmarks/torch_step.py --variant S/16 --batch 8 --image-size 224 \
        --methods full,linear,vpt_deep,lora,adapter,adaptformer,bitfit,ssf --out DIR

Each method runs in a fresh subprocess that builds timm's `VisionTransformer` with the widths of
jvt's variant (random weights), adds the method the way the public PyTorch code does, and times
`--steps` SGD-momentum steps (cross-entropy, random images and labels) after `--warmup` steps,
then the eval forward under `torch.no_grad`. `--dtype bfloat16` wraps forward and loss in
`torch.autocast("cpu", torch.bfloat16)` with fp32 parameters (PyTorch's mixed precision).
`--device cuda` builds and runs everything on the GPU instead (autocast on "cuda", a
`torch.cuda.synchronize()` closing each timed step, timm's attention through PyTorch's fused
scaled-dot-product kernels as timm's default), and peak memory is the CUDA allocator's
`max_memory_allocated` over the child's life up to the end of the timed train steps, as run.py's
`peak_bytes_in_use` on a GPU.
`--profile-steps K` then profiles K more train steps and writes METHOD.torch_ops.md, PyTorch's
operations by self CPU time a step, to set beside `benchmarks/profile.py`'s table of jvt's.

How each method is written (so that its cost is the published code's cost):
  full        every parameter trains.
  linear      the head only.
  vpt_deep    VPT-Deep as KMnP/vpt and DA-VPT's code run it: N learnable prompts per block
              (uniform init in +-sqrt(6 / (3 * 16 * 16 + D))); before block 0 they are inserted
              after [CLS], before each later block the previous block's prompt outputs are
              replaced by that block's prompts; prompt dropout 0; head on the final normed [CLS].
  vpt_shallow prompts before block 0 only.
  da_vpt      optional: VPT-Deep plus a metric term of DA-VPT's shape (a proxy-anchor loss
              on [CLS] features against learnable class proxies, weight 0.05); the time of
              jvt's da_vpt is what it should be compared with, not its exact loss.
  lora        LoRA r=8, alpha=8 on the query and value slices of timm's fused qkv projection.
  adapter     sequential bottleneck adapters (dim 8, GELU, zero-init up) after attention and
              after the MLP of every block, as jvt's `adapter`.
  adaptformer AdaptFormer's parallel ReLU bottleneck (dim 8, scale 0.1) beside each MLP.
  bitfit      every bias (and the head).
  ssf         SSF scale and shift after every linear layer, layer norm and the patch embedding
              (forward hooks; the SSF repository edits timm's modules to the same effect).
  convpass    PETL-ViT's Convpass (dim 8, QuickGELU, 3x3 conv identity-initialised, [CLS] as
              a 1x1 image, dropout 0.1, scale 1) beside attention and MLP on the normed input.
  repadapter  RepAdapter's linear adapter (Conv1d down 8, group-wise Conv1d up in 2 groups,
              dropout 0.1, scale 1) after each block norm, as the authors' code on [B, D, T].
  fact        FacT-TT (rank 8, scale 1, dropout 0.1): U and V shared by all blocks, a core per
              projection; q, k, v increments on timm's fused qkv, the MLP in 4 D-wide slices.
  dora        DoRA r=8, alpha=8 on the query and value thirds of the fused qkv, the norm a
              constant (the authors' `dora_simple`), the frozen product computed once.
  difffit     every bias, every norm and a per-channel scale on each block's two branches.
  layernorm   every norm's weight and bias.
  partial     the last block and the final norm (partial-1).
  vp          a learnable pad-30 frame added to the image (visual_prompting's PadPrompter).
  e2vpt       VPT-Deep with 10 prompts (dropout 0.1) plus 5 key-value prompts per attention,
              prepended to keys and values.
  adapter_plus one bottleneck adapter after each block with a per-channel scale (Adapter+).
Every method trains as many parameters as jvt's method of the same name (compared with run.py's
rows on a 2-block S/16 at 64 px: `trainable_params`).

Writes `DIR/results.json` with the row keys of `benchmarks/run.py` (`backend` = "torch",
`framework` = "torch"), so `benchmarks/compare.py` joins the two on (method, variant, batch,
dtype). On CPU, peak memory is the child's resident high-water mark during the timed steps, taken
the same way as run.py's on CPU.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
METHODS = ("full", "linear", "vpt_deep", "vpt_shallow", "da_vpt", "lora", "adapter",
           "adaptformer", "bitfit", "ssf", "convpass", "repadapter", "fact", "dora", "difffit",
           "layernorm", "partial", "vp", "e2vpt", "adapter_plus")
DEFAULT_METHODS = "full,linear,vpt_deep,lora,adapter,adaptformer,bitfit,ssf"
DTYPES = ("float32", "bfloat16")
DEVICES = ("cpu", "cuda")
# jvt ViT override names -> the timm VisionTransformer argument they set.
OVERRIDES = ("hidden_size", "mlp_dim", "num_heads", "num_layers", "patch_size")
LORA_RANK, LORA_ALPHA = 8, 8.0
ADAPTER_DIM, ADAPTFORMER_SCALE = 8, 0.1
DAVPT_WEIGHT = 0.05
# The defaults of jvt's methods of the same names (jvt/methods/*.py), which run.py runs.
BYPASS_DIM, BYPASS_SCALE, BYPASS_DROPOUT = 8, 1.0, 0.1  # convpass, repadapter
REPADAPTER_GROUPS = 2
FACT_RANK, FACT_SCALE, FACT_DROPOUT = 8, 1.0, 0.1
VP_PAD = 30
E2VPT_PROMPTS, E2VPT_KV_PROMPTS, E2VPT_DROPOUT = 10, 5, 0.1


def _load(name: str, path: str):
  """A module from a file path, without importing its package (jvt's imports jax)."""
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def vit_dims(variant: str, overrides: dict) -> dict:
  """The ViT dims of a jvt variant name plus overrides (jvt field names)."""
  variants = _load("jvt_variants", os.path.join(REPO, "jvt", "models", "variants.py"))
  unknown = sorted(set(overrides) - set(OVERRIDES))
  if unknown:
    raise ValueError(f"--overrides: {unknown} have no timm equivalent here; allowed: "
                     f"{', '.join(OVERRIDES)}.")
  return {**variants.variant_config(variant), **overrides}


# ------------------------------------------------------------------------------ the child
def build(spec: dict):
  """(model, trainable parameters, loss function) of one method on timm's ViT."""
  import torch
  from torch import nn
  from timm.models.vision_transformer import VisionTransformer

  m = _torch_modules()
  d = vit_dims(spec["variant"], spec["overrides"])
  method, classes = spec["method"], spec["num_classes"]
  model = VisionTransformer(
      img_size=spec["image_size"], patch_size=d["patch_size"], num_classes=classes,
      embed_dim=d["hidden_size"], depth=d["num_layers"], num_heads=d["num_heads"],
      mlp_ratio=d["mlp_dim"] / d["hidden_size"], qkv_bias=True, global_pool="token")
  width, blocks = d["hidden_size"], list(model.blocks)
  for p in model.parameters():
    p.requires_grad_(method == "full")
  for p in model.head.parameters():
    p.requires_grad_(True)
  extra = nn.Module()  # holds the method's own parameters

  def prompts(depth, n):
    """VPT's prompts: `depth` tensors [1, n, D], uniform in +-sqrt(6 / (3 * patch^2 + D))."""
    bound = (6.0 / (3 * d["patch_size"] ** 2 + width)) ** 0.5
    return nn.ParameterList(
        [nn.Parameter(torch.empty(1, n, width).uniform_(-bound, bound)) for _ in range(depth)])

  if method in ("vpt_deep", "vpt_shallow", "da_vpt"):
    n = spec["num_prompts"]
    extra.prompts = prompts(len(blocks) if method != "vpt_shallow" else 1, n)
    model = m["PromptedViT"](model, extra.prompts, n)
  elif method == "lora":
    for blk in blocks:
      blk.attn.qkv = m["LoRAQV"](blk.attn.qkv, LORA_RANK, LORA_ALPHA)
  elif method == "adapter":
    for blk in blocks:
      blk.ls1 = m["Residual"](m["Bottleneck"](width, ADAPTER_DIM, nn.GELU()), blk.ls1)
      blk.ls2 = m["Residual"](m["Bottleneck"](width, ADAPTER_DIM, nn.GELU()), blk.ls2)
  elif method == "adaptformer":
    for blk in blocks:
      branch = m["Bottleneck"](width, ADAPTER_DIM, nn.ReLU())
      blk.mlp = m["Parallel"](blk.mlp, branch, ADAPTFORMER_SCALE)
  elif method == "bitfit":
    for name, p in model.named_parameters():
      if name.endswith(".bias"):
        p.requires_grad_(True)
  elif method == "ssf":
    extra.ssf = m["add_ssf"](model)
  elif method == "convpass":
    grid = spec["image_size"] // d["patch_size"]
    for i, blk in enumerate(blocks):
      model.blocks[i] = m["ConvpassBlock"](blk, width, grid)
  elif method == "repadapter":
    for blk in blocks:
      blk.norm1 = nn.Sequential(blk.norm1, m["RepAdapter"](width))
      blk.norm2 = nn.Sequential(blk.norm2, m["RepAdapter"](width))
  elif method == "fact":
    extra.fact = m["FacTShared"](width)
    for blk in blocks:
      blk.attn.qkv = m["FacTQKV"](blk.attn.qkv, extra.fact)
      blk.attn.proj = m["FacTLinear"](blk.attn.proj, extra.fact)
      blk.mlp.fc1 = m["FacTFc1"](blk.mlp.fc1, extra.fact)
      blk.mlp.fc2 = m["FacTFc2"](blk.mlp.fc2, extra.fact)
  elif method == "dora":
    for blk in blocks:
      blk.attn.qkv = m["DoRAQV"](blk.attn.qkv, LORA_RANK, LORA_ALPHA)
  elif method in ("difffit", "layernorm", "partial"):
    def is_norm(name):
      return name.startswith("norm.") or ".norm1." in name or ".norm2." in name
    trains = {"layernorm": is_norm,
              "difffit": lambda name: is_norm(name) or name.endswith(".bias"),
              "partial": lambda name: name.startswith((f"blocks.{len(blocks) - 1}.", "norm."))
              }[method]
    for name, p in model.named_parameters():
      p.requires_grad_(name.startswith("head.") or trains(name))
    if method == "difffit":
      for blk in blocks:
        blk.ls1, blk.ls2 = m["ChannelScale"](width), m["ChannelScale"](width)
  elif method == "vp":
    model = m["PadPrompted"](model, spec["image_size"], VP_PAD)
  elif method == "e2vpt":
    extra.prompts = prompts(len(blocks), E2VPT_PROMPTS)
    for blk in blocks:
      blk.attn = m["KVPromptAttention"](blk.attn, E2VPT_KV_PROMPTS)
    model = m["PromptedViT"](model, extra.prompts, E2VPT_PROMPTS, E2VPT_DROPOUT)
  elif method == "adapter_plus":
    for i, blk in enumerate(blocks):
      model.blocks[i] = nn.Sequential(blk, m["AdapterPlus"](width, ADAPTER_DIM))
  elif method not in ("full", "linear"):
    raise ValueError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}.")

  cross_entropy = nn.CrossEntropyLoss()
  if method == "da_vpt":
    extra.proxies = nn.Parameter(torch.randn(classes, width) * 0.02)

    def loss_fn(images, labels):
      logits, feats = model(images, return_features=True)
      return cross_entropy(logits, labels) + DAVPT_WEIGHT * m["proxy_anchor"](
          feats, labels, extra.proxies)
  else:
    def loss_fn(images, labels):
      return cross_entropy(model(images), labels)

  params = [p for p in list(model.parameters()) + list(extra.parameters()) if p.requires_grad]
  params = list({id(p): p for p in params}.values())  # prompts are in both
  return model, params, loss_fn


def _torch_modules():
  """The method modules (defined lazily: torch is imported only in the child)."""
  import torch
  from torch import nn
  import torch.nn.functional as F

  class Bottleneck(nn.Module):
    """up(act(down(x))), up zero-initialised (adapter, AdaptFormer)."""

    def __init__(self, width, dim, act):
      super().__init__()
      self.down, self.act, self.up = nn.Linear(width, dim), act, nn.Linear(dim, width)
      nn.init.zeros_(self.up.weight)
      nn.init.zeros_(self.up.bias)

    def forward(self, x):
      return self.up(self.act(self.down(x)))

  class Residual(nn.Module):
    """y = inner(x); y + adapter(y): a sequential adapter after a sublayer's output."""

    def __init__(self, adapter, inner):
      super().__init__()
      self.adapter, self.inner = adapter, inner

    def forward(self, x):
      y = self.inner(x)
      return y + self.adapter(y)

  class Parallel(nn.Module):
    """mlp(z) + scale * branch(z) (AdaptFormer)."""

    def __init__(self, mlp, branch, scale):
      super().__init__()
      self.mlp, self.branch, self.scale = mlp, branch, scale

    def forward(self, z):
      return self.mlp(z) + self.scale * self.branch(z)

  class LoRAQV(nn.Module):
    """timm's fused qkv Linear plus (alpha / r) * x A B on its query and value thirds."""

    def __init__(self, qkv, rank, alpha):
      super().__init__()
      self.qkv, self.scale = qkv, alpha / rank
      d = qkv.in_features
      self.a_q = nn.Parameter(torch.randn(d, rank) / d ** 0.5)
      self.b_q = nn.Parameter(torch.zeros(rank, d))
      self.a_v = nn.Parameter(torch.randn(d, rank) / d ** 0.5)
      self.b_v = nn.Parameter(torch.zeros(rank, d))

    def forward(self, x):
      out = self.qkv(x)  # [B, T, 3D]
      dq = (x @ self.a_q) @ self.b_q * self.scale
      dv = (x @ self.a_v) @ self.b_v * self.scale
      zeros = torch.zeros_like(dq)
      return out + torch.cat([dq, zeros, dv], dim=-1)

  class PromptedViT(nn.Module):
    """VPT on a timm ViT: prompts after [CLS] at block 0, replaced before each deep block
    (dropout on the prompts: E2VPT's)."""

    def __init__(self, vit, prompts, n, dropout=0.0):
      super().__init__()
      self.vit, self.prompts, self.n = vit, prompts, n
      self.drop = nn.Dropout(dropout)

    def forward(self, images, return_features=False):
      v = self.vit
      x = v.patch_embed(images)
      x = v._pos_embed(x)  # [B, 1 + N, D] with [CLS]
      x = v.norm_pre(x)
      b = x.shape[0]
      for i, blk in enumerate(v.blocks):
        if i < len(self.prompts):
          p = self.drop(self.prompts[i].expand(b, -1, -1)).to(x.dtype)
          rest = x[:, 1:] if i == 0 else x[:, 1 + self.n:]
          x = torch.cat([x[:, :1], p, rest], dim=1)  # [B, 1 + n + N, D]
        x = blk(x)
      x = v.norm(x)
      feats = x[:, 0]
      logits = v.head(v.fc_norm(feats))
      return (logits, feats) if return_features else logits

  def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)

  class Convpass(nn.Module):
    """PETL-ViT's Convpass: Up(drop(act(Conv3x3(act(Down z))))) on the token grid, [CLS]
    through the same convolution as a 1x1 image; conv identity at the centre tap."""

    def __init__(self, width, grid):
      super().__init__()
      self.grid = grid
      self.down, self.up = nn.Linear(width, BYPASS_DIM), nn.Linear(BYPASS_DIM, width)
      self.conv = nn.Conv2d(BYPASS_DIM, BYPASS_DIM, 3, 1, 1)
      nn.init.xavier_uniform_(self.down.weight)
      for t in (self.down.bias, self.up.weight, self.up.bias, self.conv.weight, self.conv.bias):
        nn.init.zeros_(t)
      with torch.no_grad():
        self.conv.weight[:, :, 1, 1] += torch.eye(BYPASS_DIM)
      self.drop = nn.Dropout(BYPASS_DROPOUT)

    def forward(self, z):
      b, t, _ = z.shape
      u = quick_gelu(self.down(z))  # [B, T, dim]
      n, g = self.grid * self.grid, self.grid
      patches = u[:, t - n:].reshape(b, g, g, -1).permute(0, 3, 1, 2)
      patches = self.conv(patches).permute(0, 2, 3, 1).reshape(b, n, -1)
      rest = u[:, :t - n].reshape(b * (t - n), -1, 1, 1)
      rest = self.conv(rest).reshape(b, t - n, -1)
      u = self.drop(quick_gelu(torch.cat([rest, patches], dim=1)))
      return self.up(u)

  class ConvpassBlock(nn.Module):
    """x + Attn(LN1 x) + s Convpass(LN1 x), then the same beside the MLP (PETL-ViT)."""

    def __init__(self, blk, width, grid):
      super().__init__()
      self.blk = blk
      self.attn_bypass, self.mlp_bypass = Convpass(width, grid), Convpass(width, grid)

    def forward(self, x):
      blk, z = self.blk, self.blk.norm1(x)
      x = x + blk.ls1(blk.attn(z)) + BYPASS_SCALE * self.attn_bypass(z)
      z = blk.norm2(x)
      return x + blk.ls2(blk.mlp(z)) + BYPASS_SCALE * self.mlp_bypass(z)

  class RepAdapter(nn.Module):
    """luogen1996/RepAdapter: z + s * Conv1d_groups(drop(Conv1d(z))) on [B, D, T]."""

    def __init__(self, width):
      super().__init__()
      self.down = nn.Conv1d(width, BYPASS_DIM, 1)
      self.up = nn.Conv1d(BYPASS_DIM, width, 1, groups=REPADAPTER_GROUPS)
      nn.init.xavier_uniform_(self.down.weight)
      for t in (self.down.bias, self.up.weight, self.up.bias):
        nn.init.zeros_(t)
      self.drop = nn.Dropout(BYPASS_DROPOUT)

    def forward(self, z):
      u = z.transpose(1, 2)  # [B, D, T]
      return (self.up(self.drop(self.down(u))) * BYPASS_SCALE + u).transpose(1, 2)

  class FacTShared(nn.Module):
    """FacT-TT's U [D -> r] and V [r -> D] (zero), shared by every block, and its dropout."""

    def __init__(self, width):
      super().__init__()
      self.u = nn.Linear(width, FACT_RANK, bias=False)
      self.v = nn.Linear(FACT_RANK, width, bias=False)
      nn.init.zeros_(self.v.weight)
      self.drop = nn.Dropout(FACT_DROPOUT)

    def delta(self, x, core):
      return self.v(self.drop(core(self.u(x)))) * FACT_SCALE

  class FacTQKV(nn.Module):
    """timm's fused qkv plus FacT's increments with a [r, r] core each for q, k and v."""

    def __init__(self, qkv, shared):
      super().__init__()
      self.qkv, self.shared = qkv, shared  # one module in every block: parameters() dedupes
      self.cores = nn.ModuleList([nn.Linear(FACT_RANK, FACT_RANK, bias=False) for _ in range(3)])

    def forward(self, x):
      f = self.shared
      return self.qkv(x) + torch.cat([f.delta(x, c) for c in self.cores], dim=-1)

  class FacTLinear(nn.Module):
    """A D -> D projection plus FacT's increment (the attention output projection)."""

    def __init__(self, linear, shared):
      super().__init__()
      self.linear, self.shared = linear, shared
      self.core = nn.Linear(FACT_RANK, FACT_RANK, bias=False)

    def forward(self, x):
      return self.linear(x) + self.shared.delta(x, self.core)

  class FacTFc1(nn.Module):
    """fc1 (D -> 4D) plus FacT's increment: a [r, 4r] core, V on each D-wide output slice."""

    def __init__(self, linear, shared):
      super().__init__()
      self.linear, self.shared = linear, shared
      self.core = nn.Linear(FACT_RANK, 4 * FACT_RANK, bias=False)

    def forward(self, x):
      f, (b, t, d) = self.shared, x.shape
      h = f.drop(self.core(f.u(x))).reshape(b, t, 4, FACT_RANK)
      return self.linear(x) + f.v(h).reshape(b, t, 4 * d) * FACT_SCALE

  class FacTFc2(nn.Module):
    """fc2 (4D -> D) plus FacT's increment: U on each D-wide input slice, a [4r, r] core."""

    def __init__(self, linear, shared):
      super().__init__()
      self.linear, self.shared = linear, shared
      self.core = nn.Linear(4 * FACT_RANK, FACT_RANK, bias=False)

    def forward(self, x):
      f, (b, t, d4) = self.shared, x.shape
      u = f.u(x.reshape(b, t, 4, d4 // 4)).reshape(b, t, 4 * FACT_RANK)
      return self.linear(x) + f.v(f.drop(self.core(u))) * FACT_SCALE

  class DoRAQV(nn.Module):
    """DoRA (the authors' `dora_simple`: the norm a constant) on the query and value thirds
    of timm's fused qkv: m * (W + s B A) / ||W + s B A|| per output feature, written on the
    fused output so that the frozen product runs once."""

    def __init__(self, qkv, rank, alpha):
      super().__init__()
      self.qkv, self.scale = qkv, alpha / rank
      d = qkv.in_features
      self.a = nn.ParameterList([nn.Parameter(torch.empty(rank, d).uniform_(
          -d ** -0.5, d ** -0.5)) for _ in range(2)])
      self.b = nn.ParameterList([nn.Parameter(torch.zeros(d, rank)) for _ in range(2)])
      w = qkv.weight.detach()
      self.m = nn.ParameterList([nn.Parameter(w[:d].norm(dim=1).clone()),
                                 nn.Parameter(w[2 * d:].norm(dim=1).clone())])

    def forward(self, x):
      out = self.qkv(x)  # [B, T, 3D]
      d = self.qkv.in_features
      parts = list(out.split(d, dim=-1))
      for j, i in enumerate((0, 2)):
        w = self.qkv.weight[i * d:(i + 1) * d]
        bias = self.qkv.bias[i * d:(i + 1) * d]
        norm = (w + self.scale * self.b[j] @ self.a[j]).norm(dim=1).detach()
        lora = (x @ self.a[j].T.to(x.dtype)) @ self.b[j].T.to(x.dtype) * self.scale
        parts[i] = (self.m[j] / norm) * (parts[i] - bias + lora) + bias
      return torch.cat(parts, dim=-1)

  class ChannelScale(nn.Module):
    """x * gamma, gamma [D] init 1 (DiffFit's branch scale, in timm's LayerScale slot)."""

    def __init__(self, width):
      super().__init__()
      self.gamma = nn.Parameter(torch.ones(width))

    def forward(self, x):
      return x * self.gamma

  class PadPrompted(nn.Module):
    """hjbahng/visual_prompting's PadPrompter before the ViT: images + a learnable frame."""

    def __init__(self, vit, size, pad):
      super().__init__()
      self.vit, self.size, self.pad = vit, size, pad
      self.pad_up = nn.Parameter(torch.randn(1, 3, pad, size))
      self.pad_down = nn.Parameter(torch.randn(1, 3, pad, size))
      self.pad_left = nn.Parameter(torch.randn(1, 3, size - 2 * pad, pad))
      self.pad_right = nn.Parameter(torch.randn(1, 3, size - 2 * pad, pad))

    def forward(self, images):
      base = self.pad_up.new_zeros(1, 3, self.size - 2 * self.pad, self.size - 2 * self.pad)
      frame = torch.cat([self.pad_left, base, self.pad_right], dim=3)
      frame = torch.cat([self.pad_up, frame, self.pad_down], dim=2)
      return self.vit(images + frame)

  class KVPromptAttention(nn.Module):
    """timm's attention with E2VPT's key-value prompts [H, M, Dh] prepended to the keys and
    to the values (shared), kaiming-uniform as the authors' ORIGIN_INIT=2."""

    def __init__(self, attn, m):
      super().__init__()
      self.attn = attn
      self.kv = nn.Parameter(torch.empty(attn.num_heads, m, attn.head_dim))
      nn.init.kaiming_uniform_(self.kv)

    def forward(self, x, attn_mask=None, is_causal=False):
      a, (b, n, c) = self.attn, x.shape
      qkv = a.qkv(x).reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
      q, k, v = qkv.unbind(0)  # [B, H, N, Dh]
      kv = self.kv.unsqueeze(0).expand(b, -1, -1, -1).to(k.dtype)
      k, v = torch.cat([kv, k], dim=2), torch.cat([kv, v], dim=2)
      x = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
      return a.proj(x)

  class AdapterPlus(nn.Module):
    """Adapter+ after the block: h + c * Up(gelu(Down h)), trunc-normal(0.01) weights."""

    def __init__(self, width, dim):
      super().__init__()
      self.down, self.up = nn.Linear(width, dim), nn.Linear(dim, width)
      for lin in (self.down, self.up):
        nn.init.trunc_normal_(lin.weight, std=0.01, a=-0.02, b=0.02)
        nn.init.zeros_(lin.bias)
      self.scale = nn.Parameter(torch.ones(width))

    def forward(self, h):
      return h + self.scale * self.up(F.gelu(self.down(h)))

  def add_ssf(model):
    """Scale/shift parameters after each Linear, LayerNorm and the patch conv, via hooks."""
    params = nn.ParameterList()

    def hook_for(scale, shift, channel_dim):
      def hook(module, inputs, output):
        shape = [1] * output.dim()
        shape[channel_dim] = -1
        return output * scale.view(shape).to(output.dtype) + shift.view(shape).to(output.dtype)
      return hook

    for name, m in model.named_modules():
      if name == "head":
        continue
      if isinstance(m, (nn.Linear, nn.LayerNorm, nn.Conv2d)):
        width = m.out_features if isinstance(m, nn.Linear) else (
            m.out_channels if isinstance(m, nn.Conv2d) else m.normalized_shape[0])
        scale = nn.Parameter(torch.ones(width))
        shift = nn.Parameter(torch.zeros(width))
        params.extend([scale, shift])
        m.register_forward_hook(hook_for(scale, shift, 1 if isinstance(m, nn.Conv2d) else -1))
    return params

  def proxy_anchor(feats, labels, proxies, alpha=32.0, delta=0.1):
    """Proxy-anchor loss (Kim et al. 2020) of features against class proxies."""
    cos = F.normalize(feats.float(), dim=-1) @ F.normalize(proxies, dim=-1).T  # [B, C]
    pos = F.one_hot(labels, proxies.shape[0]).float()
    pos_term = torch.log1p((torch.exp(-alpha * (cos - delta)) * pos).sum(0))
    neg_term = torch.log1p((torch.exp(alpha * (cos + delta)) * (1 - pos)).sum(0))
    with_pos = (pos.sum(0) > 0).float()
    return (pos_term * with_pos).sum() / with_pos.sum().clamp(min=1) + neg_term.mean()

  return dict(Bottleneck=Bottleneck, Residual=Residual, Parallel=Parallel, LoRAQV=LoRAQV,
              PromptedViT=PromptedViT, add_ssf=add_ssf, proxy_anchor=proxy_anchor,
              ConvpassBlock=ConvpassBlock, RepAdapter=RepAdapter, FacTShared=FacTShared,
              FacTQKV=FacTQKV, FacTLinear=FacTLinear, FacTFc1=FacTFc1, FacTFc2=FacTFc2,
              DoRAQV=DoRAQV, ChannelScale=ChannelScale, PadPrompted=PadPrompted,
              KVPromptAttention=KVPromptAttention, AdapterPlus=AdapterPlus)


def _cpu_model() -> str:
  """The CPU's model name (lscpu's), for the table's hardware line."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return "unknown cpu"


def measure(spec: dict) -> dict:
  """One row: builds the method on timm's ViT and times its train and eval steps."""
  import torch
  import timm  # noqa: F401 (resident before the model, as jax is in run.py's base_rss_mb)
  run = _load("benchmarks_run", os.path.join(HERE, "run.py"))  # the shared RSS helpers
  device = spec.get("device", "cpu")
  cuda = device == "cuda"
  if cuda and not torch.cuda.is_available():
    raise RuntimeError("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is "
                       "False); run on a machine with an NVIDIA GPU and a CUDA build of torch.")
  load_before = os.getloadavg()[0]
  base_rss = run._rss_mb()  # noqa: SLF001
  torch.manual_seed(spec["seed"])
  # The model and the methods' tensors are made on `device` (a device context only while
  # building: as a global default it would intercept every operation of the timed steps).
  with torch.device(device):
    model, params, loss_fn = build(spec)
  model.to(device)  # anything a method made outside the context (a no-op otherwise)
  b, size, classes = spec["batch"], spec["image_size"], spec["num_classes"]
  images = torch.randn(b, 3, size, size, device=device)
  labels = torch.randint(0, classes, (b,), device=device)
  opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
  bf16 = spec["dtype"] == "bfloat16"
  # A CUDA step returns before the GPU has finished it: each timed call waits for the GPU.
  finish = (lambda out: torch.cuda.synchronize()) if cuda else (lambda out: out)

  def train_call():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
      loss = loss_fn(images, labels)
    loss.backward()
    opt.step()
    return loss

  model.train()
  t0 = time.perf_counter()
  finish(train_call())  # the first step allocates gradients and momentum: torch's "compile"
  first_s = time.perf_counter() - t0
  rss_reset = run._reset_peak_rss()  # noqa: SLF001 (shared helper)
  train_times, train_faults, train_steal = run._time_calls(  # noqa: SLF001 (shared helper)
      train_call, spec["warmup"], spec["steps"], finish)
  if cuda:
    peak_mb, mem_source = torch.cuda.max_memory_allocated() / 2**20, "device max_memory_allocated"
  else:
    peak_mb = run._peak_rss_mb()  # noqa: SLF001
    mem_source = "peak RSS during steps" if rss_reset else "peak RSS of the process"
  model.eval()
  eb = spec["eval_batch"]
  eval_images = torch.randn(eb, 3, size, size, device=device)

  def eval_call():
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
      return model(eval_images).argmax(-1)

  eval_times, _, _ = run._time_calls(  # noqa: SLF001
      eval_call, max(1, spec["warmup"] // 2), spec["steps"], finish)
  rates = [b / t for t in train_times]
  if spec.get("profile_steps"):
    _profile_ops(train_call, spec["profile_steps"], spec["profile_out"], spec)
  import resource
  return {
      "method": spec["method"],
      "train_img_s": statistics.median(rates),
      "train_img_s_min": min(rates),
      "train_img_s_max": max(rates),
      "eval_img_s": statistics.median(eb / t for t in eval_times),
      "peak_mem_mb": peak_mb,
      "compile_s": first_s,
      "trainable_params": sum(p.numel() for p in params),
      "backend": "torch",
      "device_kind": torch.cuda.get_device_name() if cuda else _cpu_model(),
      "variant": spec["variant"],
      "batch": b,
      "image_size": size,
      "dtype": spec["dtype"],
      "remat": "none",
      "num_devices": 1,
      "framework": "torch",
      "torch_version": torch.__version__,
      "torch_threads": torch.get_num_threads(),
      "torch_device": device,
      "mem_source": mem_source,
      "page_faults_per_step": train_faults,
      "cpu_steal_frac": train_steal,
      "peak_rss_total_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
      "base_rss_mb": base_rss,
      "load_avg_1m": load_before,
  }


def ops_table(rows: Sequence[tuple[str, float, int]], steps: int, title: str,
              limit: int = 40) -> str:
  """Markdown of PyTorch's operations by self CPU time a step, the largest first.

  rows: (operation, self CPU microseconds over all `steps`, calls over all `steps`), as
  torch.profiler's key averages give them. The layout is that of benchmarks/profile.py's
  `.ops.md`, so that the two frameworks' steps can be read side by side.
  """
  rows = sorted(rows, key=lambda r: -r[1])
  total_ms = sum(r[1] for r in rows) / 1e3 / steps
  lines = [f"{title}: {total_ms:.1f} ms of operations per step (self CPU time)", "",
           "| ms / step | share | calls / step | operation |", "|---:|---:|---:|---|"]
  for name, self_us, calls in rows[:limit]:
    ms = self_us / 1e3 / steps
    lines.append(f"| {ms:.1f} | {100 * ms / total_ms:.1f}% | {calls / steps:g} | `{name}` |")
  return "\n".join(lines) + "\n"


def _profile_ops(train_call, steps: int, out: str, spec: dict) -> None:
  """Profiles `steps` more train steps and writes `{out}/{method}.torch_ops.md`."""
  from torch.profiler import ProfilerActivity, profile
  with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(steps):
      train_call()
  rows = [(e.key, e.self_cpu_time_total, e.count) for e in prof.key_averages()]
  title = (f"torch {spec['method']}, {spec['variant']}, batch {spec['batch']}, "
           f"{spec['dtype']}")
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, f"{spec['method']}.torch_ops.md"), "w") as f:
    f.write(ops_table(rows, steps, title))


# ------------------------------------------------------------------------------ the parent
def parse(argv: Sequence[str] | None) -> argparse.Namespace:
  """The CLI of benchmarks/run.py (less --remat), with CPU defaults."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--variant", default="S/16", help="ViT variant, e.g. S/16, B/16.")
  p.add_argument("--batch", type=int, default=8, help="Batch size.")
  p.add_argument("--eval-batch", type=int, default=None, help="Eval batch (default: --batch).")
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--methods", default=DEFAULT_METHODS,
                 help=f"Comma-separated, from: {', '.join(METHODS)}.")
  p.add_argument("--dtype", choices=DTYPES, default="float32",
                 help="float32, or bfloat16 autocast with fp32 parameters.")
  p.add_argument("--device", choices=DEVICES, default="cpu",
                 help="Where PyTorch runs the steps (cuda: the first GPU).")
  p.add_argument("--steps", type=int, default=5, help="Timed steps.")
  p.add_argument("--warmup", type=int, default=2, help="Untimed steps after the first one.")
  p.add_argument("--num-prompts", type=int, default=10, help="Prompts per block (VPT).")
  p.add_argument("--num-classes", type=int, default=100)
  p.add_argument("--overrides", default="{}",
                 help=f"JSON of ViT dims in jvt's names ({', '.join(OVERRIDES)}).")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--timeout", type=float, default=None, help="Seconds per method.")
  p.add_argument("--profile-steps", type=int, default=0,
                 help="After the timing, profile this many more train steps with "
                      "torch.profiler and write METHOD.torch_ops.md (self CPU time per "
                      "operation) beside results.json: the counterpart of profile.py's "
                      "table of jvt's operations.")
  p.add_argument("--out", required=True, help="Directory for results.json.")
  args = p.parse_args(argv)
  if args.profile_steps < 0:
    p.error(f"--profile-steps={args.profile_steps}: must be >= 0.")
  if args.profile_steps and args.device != "cpu":
    p.error("--profile-steps tables self CPU time per operation, which says nothing of a GPU "
            "step: use it with --device cpu.")
  methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  bad = [m for m in methods if m not in METHODS] or ([] if methods else ["(empty)"])
  if bad:
    p.error(f"--methods: unknown {bad}; allowed: {', '.join(METHODS)}.")
  try:
    overrides = json.loads(args.overrides)
  except json.JSONDecodeError as err:
    p.error(f"--overrides is not valid JSON ({err}): {args.overrides!r}")
  if not isinstance(overrides, dict) or set(overrides) - set(OVERRIDES):
    p.error(f"--overrides must be a JSON object of {', '.join(OVERRIDES)}; got "
            f"{args.overrides!r}.")
  args.methods, args.overrides = methods, overrides
  return args


def specs(args: argparse.Namespace) -> list[dict]:
  """One child spec per method."""
  base = dict(variant=args.variant, batch=args.batch, eval_batch=args.eval_batch or args.batch,
              image_size=args.image_size, dtype=args.dtype, steps=args.steps,
              warmup=args.warmup, num_prompts=args.num_prompts, num_classes=args.num_classes,
              overrides=args.overrides, seed=args.seed, device=args.device,
              profile_steps=args.profile_steps,
              profile_out=os.path.abspath(args.out))
  return [dict(base, method=m) for m in args.methods]


def run_child(spec: dict, timeout: float | None) -> dict:
  """Runs `measure(spec)` in a fresh interpreter and returns its row."""
  cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode != 0 or not lines:
    raise RuntimeError(f"torch benchmark of {spec['method']} failed with exit code "
                       f"{proc.returncode}:\n{proc.stderr[-3000:]}")
  return json.loads(lines[-1])


def main(argv: Sequence[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  # benchmarks/profile.py would shadow the standard library's `profile`, which torch imports.
  sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]
  if argv[:1] == ["--child"]:
    print(json.dumps(measure(json.loads(argv[1]))), flush=True)
    return 0
  args = parse(argv)
  if importlib.util.find_spec("torch") is None or importlib.util.find_spec("timm") is None:
    raise SystemExit("benchmarks/torch_step.py needs torch and timm: pip install -e \".[bench]\"")
  os.makedirs(args.out, exist_ok=True)
  rows, failed = [], False
  for spec in specs(args):
    try:
      row = run_child(spec, args.timeout)
    except (RuntimeError, subprocess.TimeoutExpired) as err:
      print(err, file=sys.stderr)
      failed = True
      continue
    rows.append(row)
    print(f"{spec['method']:>12} torch: train {row['train_img_s']:.2f} img/s, eval "
          f"{row['eval_img_s']:.2f} img/s, peak {row['peak_mem_mb']:.0f} MB", file=sys.stderr)
    with open(os.path.join(args.out, "results.json"), "w") as f:
      json.dump(rows, f, indent=1)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
