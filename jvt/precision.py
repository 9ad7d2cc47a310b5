"""Matrix products in low precision with fp32 accumulation, forward and backward.

With `model.dtype = "bfloat16"` the backbone computes in bf16 while its parameters stay fp32.
XLA:CPU runs a bf16 x bf16 -> bf16 dot by converting both operands to fp32 (about 290 GFLOP/s
on the 2-core Zen 5, no faster than fp32), but a bf16 x bf16 -> fp32 dot natively (644-654
GFLOP/s, docs/performance.md). `einsum` asks for the fp32 result in the forward pass, and its
custom VJP rounds the incoming cotangent to bf16 so the two backward products are bf16 x bf16
-> fp32 as well (JAX's own transpose would multiply the fp32 cotangent with the bf16 operand in
fp32). A fp32 operand (a parameter) gets its gradient in fp32, accumulated in fp32; a bf16
operand gets a bf16 gradient. This is what PyTorch's bf16 autocast does on the same CPU.

Only on CPU and only for 16-bit dtypes: elsewhere (fp32 anywhere; GPU / TPU, whose dots
accumulate in fp32 already) `einsum` is `jnp.einsum` on operands cast to `dtype` (on CPU a
batched one with the reduction described below).
XLA:CPU (jax 0.10) runs bf16 x bf16 -> f32 dots only inside its YNNPACK fusions; a batched dot
whose contracting axis is not minor (attention's backward) falls to a thunk that rejects that
type combination at run time. Batched products (attention's) are therefore laid out explicitly
as [batch, rows, contracted] x [batch, cols, contracted] (`_minor_product`), forward and
backward, which XLA:CPU runs natively (bf16 VPT-Deep, ViT-S/16: 14.5 -> 18.3 img/s).
XLA:CPU runs such a batched product alone on one core; every batched product on CPU, bf16 or
fp32, forward and backward, is therefore fused with a reduction of its result that leaves its
values as they are (`_on_both_cores`), which spreads it over all cores (fp32 products take
their own VJP for it, `_threaded`).
`dense` (the backbone's projections and the plug-ins' dense layers) tags its output
`checkpoint_name(..., SAVEABLE_NAME)` so the "dots" remat policy keeps saving it, after the
bias add and the cast to bf16, so that policy keeps 2 bytes a value, not 4. (The policy
recognises dot_general primitives, also inside a custom VJP's forward rule; `_mixed_fwd` and
`_recomputed_fwd` call their own custom-VJP function, so the policy sees a call, not a product,
and recomputes it unless tagged.) This module sits below `jvt.models` and `jvt.methods`: both
use it.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

# The name the "dots" remat policy saves besides dot_general outputs (jvt.models.vit).
SAVEABLE_NAME = "jvt_mixed_dot"


def uses_mixed(dtype) -> bool:
  """Whether unbatched products in `dtype` take the bf16-operand / fp32-accumulation path."""
  return jnp.dtype(dtype).itemsize < 4 and jax.default_backend() == "cpu"


def _batched(spec: str) -> bool:
  """Whether some index of "A,B->C" occurs in A, B and C (a batch index)."""
  inputs, out = spec.replace(" ", "").split("->")
  a, b = inputs.split(",")
  return bool(set(a) & set(b) & set(out))


def _grad_specs(spec: str) -> tuple[str, str]:
  """"A,B->C" -> ("C,B->A", "C,A->B"), the specs of the two operand gradients."""
  inputs, out = spec.replace(" ", "").split("->")
  a, b = inputs.split(",")
  for name, operand, other in (("first", a, b + out), ("second", b, a + out)):
    lone = sorted(set(operand) - set(other))
    if lone or len(set(operand)) != len(operand):
      raise ValueError(f"einsum {spec!r}: every index of the {name} operand must appear once "
                       f"in it and again in the other operand or the output (not {lone}).")
  return f"{out},{b}->{a}", f"{out},{a}->{b}"


def _minor_product(spec: str, a, b):
  """`einsum(spec, a, b)` -> fp32, as one batched product contracting the minor axis of both.

  The operands are laid out as [batch, rows, contracted] and [batch, cols, contracted] (explicit
  transposes), multiplied ("bmk,bnk->bmn", fp32 result) and the result put back in `spec`'s
  output order. XLA:CPU runs that form of a bf16 x bf16 -> fp32 batched dot in its YNNPACK
  fusion; other layouts of it fall to a thunk that rejects the type combination at run time.
  """
  inputs, out = spec.replace(" ", "").split("->")
  sa, sb = inputs.split(",")
  batch = [i for i in out if i in sa and i in sb]
  rows = [i for i in out if i in sa and i not in sb]
  cols = [i for i in out if i in sb and i not in sa]
  contracted = [i for i in sa if i in sb and i not in out]
  size = dict(zip(sa, a.shape)) | dict(zip(sb, b.shape))
  count = lambda idx: int(np.prod([size[i] for i in idx], dtype=np.int64))
  lay = lambda x, sx, idx: jnp.transpose(x, [sx.index(i) for i in idx])
  a3 = lay(a, sa, batch + rows + contracted).reshape(count(batch), count(rows), count(contracted))
  b3 = lay(b, sb, batch + cols + contracted).reshape(count(batch), count(cols), count(contracted))
  c3 = _on_both_cores(jnp.einsum("bmk,bnk->bmn", a3, b3, preferred_element_type=jnp.float32))
  c = c3.reshape([size[i] for i in batch + rows + cols])
  return jnp.transpose(c, [(batch + rows + cols).index(i) for i in out])


def _on_both_cores(c):
  """c, exactly where finite, computed so that XLA:CPU runs the product before it on every core.

  c: [..., rows, cols], a batched product's result. XLA:CPU (jax 0.10) runs a batched product
  alone in a YNNPACK kernel on one core, whatever the batch; fused with a reduction of its result
  it spreads over all of them. So the product gets one: c + 0 * max(c) along the shorter of its
  last two axes (along the longer, or over both, XLA left some layouts on one core). ViT-S/16's
  attention products, batch 8, on a 2-core Zen 4: bf16 41-112 -> 61-204 GFLOP/s, fp32 54-88 ->
  60-179 (docs/performance.md). Adding +-0 leaves a finite entry as it is; a row holding an inf
  turns NaN (0 * inf), as a NaN already would, and the trainer stops on the non-finite loss.
  """
  axis = -1 if c.shape[-1] <= c.shape[-2] else -2
  return c + 0.0 * jnp.max(c, axis=axis, keepdims=True)


def _threaded_einsum(spec: str, a, b):
  """`jnp.einsum(spec, a, b)` for a batched spec, its result through `_on_both_cores`."""
  return _on_both_cores(jnp.einsum(spec, a, b))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _threaded(spec, a, b):
  """A batched `jnp.einsum` whose forward and both gradient products use every core (CPU)."""
  return _threaded_einsum(spec, a, b)


def _threaded_fwd(spec, a, b):
  return _threaded_einsum(spec, a, b), (a, b)


def _threaded_bwd(spec, residuals, g):
  a, b = residuals
  spec_a, spec_b = _grad_specs(spec)
  return _threaded_einsum(spec_a, g, b), _threaded_einsum(spec_b, g, a)


_threaded.defvjp(_threaded_fwd, _threaded_bwd)


def _product(spec: str, a, b):
  """bf16 x bf16 -> fp32 `einsum(spec, a, b)`: batched specs through `_minor_product`."""
  if _batched(spec):
    return _minor_product(spec, a, b)
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def _mixed(spec, a, b, dtype):
  return _product(spec, a.astype(dtype), b.astype(dtype))


def _mixed_fwd(spec, a, b, dtype):
  return _mixed(spec, a, b, dtype), (a, b)


def _mixed_bwd(spec, dtype, residuals, g):
  a, b = residuals
  spec_a, spec_b = _grad_specs(spec)
  g = g.astype(dtype)
  da = _product(spec_a, g, b.astype(dtype))
  db = _product(spec_b, g, a.astype(dtype))
  return da.astype(a.dtype), db.astype(b.dtype)


_mixed.defvjp(_mixed_fwd, _mixed_bwd)


def einsum(spec: str, a, b, dtype):
  """`jnp.einsum(spec, a, b)` computed in `dtype`.

  Returns fp32 on the mixed path (`uses_mixed(dtype)`: the caller adds biases in fp32 and
  casts once), else `dtype`. Every index of an operand must also occur in the other operand or
  in the output (true of projections and attention). The output is not tagged for the "dots"
  remat policy: `dense` tags its value after the bias add and the cast back to `dtype`
  (`saveable_value`, half the bytes of the fp32 product); attention's batched products are
  recomputed under that policy. On CPU a batched spec (attention's) in any dtype computes each
  of its three products through `_on_both_cores`.
  """
  if not uses_mixed(dtype):
    if _batched(spec) and jax.default_backend() == "cpu":
      _grad_specs(spec)  # validate at trace time, as below
      return _threaded(spec, a.astype(dtype), b.astype(dtype))
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype))
  _grad_specs(spec)  # validate at trace time, not first in the backward pass
  return _mixed(spec, a, b, dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _recomputed(spec, a, b):
  """`jnp.einsum(spec, a, b)` that the "dots" remat policy recomputes rather than saves.

  The policy saves every `dot_general` without batch dimensions. The forward rule calls this
  function itself, as `_mixed_fwd` calls `_mixed`: the policy then sees a custom-VJP call, not a
  `dot_general`, and recomputes it. The backward pass is JAX's own transpose of the product.
  """
  return jnp.einsum(spec, a, b)


def _recomputed_fwd(spec, a, b):
  return _recomputed(spec, a, b), (a, b)


def _recomputed_bwd(spec, residuals, g):
  _, transpose = jax.vjp(functools.partial(jnp.einsum, spec), *residuals)
  return transpose(g)


_recomputed.defvjp(_recomputed_fwd, _recomputed_bwd)


def dense(x, kernel, bias, in_axes: int, dtype, saveable: bool = True):
  """x . kernel + bias over x's last `in_axes` axes, in `dtype` (bias None: none).

  x: [..., *in_shape]; kernel: [*in_shape, *features] (fp32 parameters); bias: [*features].
  Returns [..., *features] in `dtype`. On the mixed path the product takes bf16 operands with
  fp32 accumulation, the bias is added in fp32, and the one cast back to bf16 is tagged for the
  "dots" remat policy (2 bytes a saved value). Elsewhere it is flax `nn.Dense`'s arithmetic:
  operands and bias cast to `dtype`, one `dot_general`, which that policy saves.
  `saveable=False`: the "dots" policy recomputes the product on either path, which suits the
  low-rank plug-ins' products (LoRA, FacT: cheap to recompute from an [..., r] operand, as large
  as the projection's output to keep; with them saved FacT's bf16 step held 96 MB more XLA
  temporaries, its fp32 step at S/16 batch 32 1,130 MB more: 2,460 against 1,330 MB;
  docs/performance.md).
  """
  x = x.astype(dtype)
  mixed = uses_mixed(dtype)
  if mixed:
    y = einsum(tensordot_spec(x.ndim, kernel.ndim, in_axes), x, kernel, dtype)
  elif not saveable:
    y = _recomputed(tensordot_spec(x.ndim, kernel.ndim, in_axes), x, kernel.astype(dtype))
  else:
    contract = (tuple(range(x.ndim - in_axes, x.ndim)), tuple(range(in_axes)))
    y = jax.lax.dot_general(x, kernel.astype(dtype), (contract, ((), ())))
  if bias is not None:
    y = y + bias.astype(y.dtype)
  y = y.astype(dtype)
  return saveable_value(y) if mixed and saveable else y


def cast_frozen_kernels(frozen, dtype):
  """`frozen` with its kernels (leaves named "kernel", rank >= 2) in `dtype` on the mixed path.

  frozen: a nested dict of the parameters a run never updates. Returns it unchanged unless
  `uses_mixed(dtype)`. Why: on the mixed path every product casts its fp32 kernel to bf16 where
  it is used: in the forward pass, again in the backward pass (the input's gradient), and again
  where remat recomputes the forward; a frozen kernel never changes, so one cast at set-up
  gives the same bf16 operands without those per-step converts, and holds the frozen backbone in
  half the bytes (ViT-S/16, batch 8, on a 2-core Zen 4: eval +2 to +14% images/s, the train
  step within the noise; docs/performance.md). Only for kernels that every use casts to
  `dtype` (projections, the patch embedding, heads): the caller keeps fp32 where a method reads
  a kernel itself.
  """
  if not uses_mixed(dtype):
    return frozen
  def cast(path, leaf):
    name = getattr(path[-1], "key", None)
    if name == "kernel" and jnp.ndim(leaf) >= 2 and jnp.issubdtype(leaf.dtype, jnp.floating):
      return leaf.astype(dtype)
    return leaf
  return jax.tree_util.tree_map_with_path(cast, frozen)


def saveable_value(x):
  """`x` tagged for the "dots" remat policy, which keeps tagged values for the backward pass."""
  return checkpoint_name(x, SAVEABLE_NAME)


_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def tensordot_spec(x_ndim: int, w_ndim: int, n_axes: int) -> str:
  """The einsum spec contracting x's last `n_axes` axes with w's first `n_axes` axes."""
  lead, contract = x_ndim - n_axes, n_axes
  feats = w_ndim - n_axes
  if lead + contract + feats > len(_LETTERS) or n_axes < 1 or feats < 0 or lead < 0:
    raise ValueError(f"tensordot of ranks {x_ndim} and {w_ndim} over {n_axes} axes.")
  x = _LETTERS[:lead + contract]
  w = _LETTERS[lead:lead + contract] + _LETTERS[lead + contract:lead + contract + feats]
  return f"{x},{w}->{_LETTERS[:lead]}{w[contract:]}"


# CPU feature flags (Linux /proc/cpuinfo) that give native bf16 products: AVX-512 BF16 and AMX
# on x86, the BF16 extension ("bf16") on Arm.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str] | None:
  """The first CPU's feature flags ("flags" on x86, "Features" on Arm); None where the file
  is missing or has neither line (not Linux), so that nothing is claimed about the CPU."""
  try:
    with open(path) as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
          return frozenset(value.split())
  except OSError:
    return None
  return None


def emulated_bf16_message(dtype, backend: str, flags: frozenset[str] | None) -> str | None:
  """Why `dtype` will run slower than float32 here, or None.

  On a CPU without native bf16 instructions XLA emulates bf16 products, so a bf16 step runs
  slower than the fp32 one (2-core Zen 3: a [1576, 384] x [384, 1536] bf16 x bf16 -> fp32
  product at 82 against 122 GFLOP/s in fp32; ViT-S/16 VPT-Deep, batch 8, remat "dots": 3.0-3.4
  against 4.9 img/s)."""
  if jnp.dtype(dtype).itemsize >= 4 or backend != "cpu" or flags is None:
    return None
  if flags & NATIVE_BF16_FLAGS:
    return None
  return (f"model.dtype={jnp.dtype(dtype).name!r} on a CPU without native bf16 instructions "
          f"(no {', '.join(sorted(NATIVE_BF16_FLAGS))} in /proc/cpuinfo): XLA emulates its "
          "products, which runs slower than float32; set model.dtype='float32' on this "
          "machine.")
