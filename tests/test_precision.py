"""jvt.precision: bf16 products with fp32 accumulation, forward and backward."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jvt import precision
from jvt.models import build_model, init_params

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu",
                                reason="the mixed path is taken on CPU only")


def _bf16(x):
  """x rounded to bf16, back in float64 (numpy): the operands the mixed path multiplies."""
  return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


def test_grad_specs_and_their_validation():
  assert precision._grad_specs("abc,cde->abde") == ("abde,cde->abc", "abde,abc->cde")
  assert precision._batched("bqhd,bkhd->bhqk") and not precision._batched("abc,cde->abde")
  with pytest.raises(ValueError, match="first operand"):
    precision._grad_specs("ij,jk->k")  # i is summed within the first operand alone


@pytest.mark.parametrize("x_shape,w_shape,n", [((2, 5, 6), (6, 3, 4), 1),
                                               ((2, 5, 3, 4), (3, 4, 6), 2)])
def test_tensordot_spec_matches_numpy(x_shape, w_shape, n):
  rng = np.random.default_rng(0)
  x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
  spec = precision.tensordot_spec(x.ndim, w.ndim, n)
  np.testing.assert_allclose(np.einsum(spec, x, w), np.tensordot(x, w, n), rtol=1e-12)


def test_mixed_einsum_values_and_gradients_against_float64():
  rng = np.random.default_rng(1)
  spec = "abc,cde->abde"  # a [B, T, D] activation times a [D, H, Dh] kernel
  a = rng.standard_normal((2, 5, 8)).astype(np.float32)  # an activation, passed as bf16
  b = rng.standard_normal((8, 3, 4)).astype(np.float32)  # an fp32 parameter
  g = rng.standard_normal((2, 5, 3, 4)).astype(np.float32)
  f = lambda a, b: precision.einsum(spec, a, b, jnp.bfloat16)  # noqa: E731
  out, vjp = jax.vjp(f, jnp.asarray(a, jnp.bfloat16), jnp.asarray(b))
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, np.einsum(spec, _bf16(a), _bf16(b)), rtol=1e-5, atol=1e-5)
  da, db = vjp(jnp.asarray(g))
  assert (da.dtype, db.dtype) == (jnp.bfloat16, jnp.float32)
  # Independent: the cotangent rounded to bf16, products of bf16 values summed in float64.
  want_da = np.einsum("abde,cde->abc", _bf16(g), _bf16(b))
  want_db = np.einsum("abde,abc->cde", _bf16(g), _bf16(a))
  np.testing.assert_allclose(np.asarray(da, np.float64), want_da, rtol=1e-2, atol=1e-2)
  np.testing.assert_allclose(db, want_db, rtol=1e-5, atol=1e-5)  # fp32 result, fp32 sums


@pytest.mark.parametrize("spec,a_shape,b_shape", [
    ("bqhd,bkhd->bhqk", (2, 5, 3, 4), (2, 7, 3, 4)),  # attention logits
    ("bhqk,bkhd->bqhd", (2, 3, 5, 7), (2, 7, 3, 4)),  # attention-weighted values
])
def test_batched_mixed_einsum_against_float64(spec, a_shape, b_shape):
  # Batched products go through explicit [batch, rows, contracted] layouts (_minor_product):
  # values and both gradients must still be the einsum's, for every axis order.
  rng = np.random.default_rng(3)
  a, b = rng.standard_normal(a_shape).astype(np.float32), rng.standard_normal(b_shape)
  b = b.astype(np.float32)
  out_shape = np.einsum(spec, a, b).shape
  g = rng.standard_normal(out_shape).astype(np.float32)
  f = lambda a, b: precision.einsum(spec, a, b, jnp.bfloat16)  # noqa: E731
  out, vjp = jax.vjp(f, jnp.asarray(a), jnp.asarray(b, jnp.bfloat16))
  assert out.dtype == jnp.float32 and out.shape == out_shape
  np.testing.assert_allclose(out, np.einsum(spec, _bf16(a), _bf16(b)), rtol=1e-5, atol=1e-5)
  da, db = vjp(jnp.asarray(g))
  assert (da.dtype, db.dtype) == (jnp.float32, jnp.bfloat16)
  spec_a, spec_b = precision._grad_specs(spec)
  np.testing.assert_allclose(da, np.einsum(spec_a, _bf16(g), _bf16(b)), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(db, np.float64), np.einsum(spec_b, _bf16(g), _bf16(a)),
                             rtol=1e-2, atol=1e-2)


def test_float32_unbatched_path_is_plain_einsum():
  rng = np.random.default_rng(2)
  a, b = rng.standard_normal((4, 6)), rng.standard_normal((6, 3))
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  got = precision.einsum("ij,jk->ik", a, b, jnp.float32)
  np.testing.assert_array_equal(got, jnp.einsum("ij,jk->ik", a, b))


@pytest.mark.parametrize("spec,a_shape,b_shape", [
    ("bhqd,bhkd->bhqk", (2, 3, 5, 4), (2, 3, 7, 4)),  # attention logits (rows < cols)
    ("bhqk,bhkd->bhqd", (2, 3, 5, 7), (2, 3, 7, 4)),  # attention-weighted values (rows > cols)
    ("bqhd,bkhd->bhqk", (2, 5, 3, 4), (2, 7, 3, 4)),  # another axis order
])
def test_float32_batched_einsum_values_and_gradients_against_float64(spec, a_shape, b_shape):
  # fp32 batched products take their own VJP on CPU (_threaded): the values and both
  # gradients must be the einsum's and its transposes', computed here in float64.
  rng = np.random.default_rng(4)
  a, b = rng.standard_normal(a_shape), rng.standard_normal(b_shape)
  g = rng.standard_normal(np.einsum(spec, a, b).shape)
  f = lambda a, b: precision.einsum(spec, a, b, jnp.float32)  # noqa: E731
  out, vjp = jax.vjp(f, jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
  da, db = vjp(jnp.asarray(g, jnp.float32))
  assert out.dtype == da.dtype == db.dtype == jnp.float32
  spec_a, spec_b = precision._grad_specs(spec)
  np.testing.assert_allclose(out, np.einsum(spec, a, b), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(da, np.einsum(spec_a, g, b), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(db, np.einsum(spec_b, g, a), rtol=1e-5, atol=1e-5)


def test_on_both_cores_keeps_finite_values_and_turns_a_row_with_inf_nan():
  rng = np.random.default_rng(5)
  c = rng.standard_normal((3, 6, 4)).astype(np.float32) * 1e30  # large, still finite
  c[0, 1, 2] = -0.0
  np.testing.assert_array_equal(precision._on_both_cores(jnp.asarray(c)), c)
  c[1, 2, 3] = np.inf  # the reduction runs along the shorter axis (4 columns): one row
  got = np.asarray(precision._on_both_cores(jnp.asarray(c)))
  assert np.isnan(got[1, 2]).all()
  mask = np.ones(c.shape, bool)
  mask[1, 2] = False
  np.testing.assert_array_equal(got[mask], c[mask])


def _fusions_with_dot_and_reduce(f, *args) -> int:
  """How many fused computations of f's compiled HLO hold both a dot and a reduce."""
  text = jax.jit(f).lower(*args).compile().as_text()
  return sum("dot(" in c and "reduce(" in c and not c.lstrip().startswith("ENTRY")
             for c in text.split("\n\n"))


@pytest.mark.parametrize("dtype,fused", [(jnp.float32, 2), (jnp.bfloat16, 3)])
def test_attention_products_are_fused_with_a_reduction(dtype, fused):
  # The reduction is what makes XLA:CPU run these products on every core (_on_both_cores).
  # At ViT-S/16's attention shape (batch 8), the logits, and in bf16 both gradients too, come
  # out of fusions that hold it (the fp32 key gradient is XLA's own two-core dot); a plain
  # einsum's VJP has none, so this fails if the reduction is dropped or XLA stops fusing it.
  q = jnp.ones((8, 6, 197, 64), dtype)
  k = jnp.ones((8, 6, 197, 64), dtype)
  g = jnp.ones((8, 6, 197, 197), jnp.float32)
  def vjp_of(product):
    def f(q, k, g):
      out, vjp = jax.vjp(product, q, k)
      return out, vjp(g.astype(out.dtype))
    return f
  ours = vjp_of(lambda q, k: precision.einsum("bhqd,bhkd->bhqk", q, k, dtype))
  plain = vjp_of(lambda q, k: jnp.einsum("bhqd,bhkd->bhqk", q, k,
                                         preferred_element_type=jnp.float32))
  assert _fusions_with_dot_and_reduce(ours, q, k, g) == fused
  assert _fusions_with_dot_and_reduce(plain, q, k, g) == 0


@pytest.mark.parametrize("saveable", [True, False])
def test_float32_dense_values_and_gradients_against_numpy(saveable):
  """fp32 `dense`, saveable or not (the unsaved product is a custom VJP): x . W + b and its
  gradients against numpy's formulas, for an x with two leading axes."""
  rng = np.random.default_rng(3)
  x, w = rng.standard_normal((2, 4, 6)), rng.standard_normal((6, 3))
  bias, g = rng.standard_normal(3), rng.standard_normal((2, 4, 3))
  f = lambda x, w, bias: precision.dense(x, w, bias, 1, jnp.float32, saveable=saveable)
  y, vjp = jax.vjp(f, *(jnp.asarray(v, jnp.float32) for v in (x, w, bias)))
  dx, dw, db = vjp(jnp.asarray(g, jnp.float32))
  np.testing.assert_allclose(y, x @ w + bias, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, g @ w.T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, np.einsum("abi,abo->io", x, g), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(db, g.sum((0, 1)), rtol=1e-5, atol=1e-5)


def _dot_ops(hlo: str) -> list[tuple[str, str, str]]:
  """(operand dtypes, result dtype, op name) of every dot in optimised HLO text (operand types
  are looked up from their definitions: fused computations print operands by name only)."""
  types = dict(re.findall(r"(%[\w.\-]+) = (\w+)\[", hlo))
  out = []
  for line in hlo.splitlines():
    m = re.search(r"= (\w+)\[[^\]]*\]\S* dot\((%[\w.\-]+), (%[\w.\-]+)\)", line)
    if m:
      name = re.search(r'op_name="([^"]*)"', line)
      out.append((f"{types[m.group(2)]}x{types[m.group(3)]}", m.group(1),
                  name.group(1) if name else ""))
  return out


def _dots(hlo: str) -> list[tuple[str, str]]:
  """(operand dtypes, result dtype) of every dot in optimised HLO text."""
  return [(operands, result) for operands, result, _ in _dot_ops(hlo)]


def _tiny_vit(tuning, dtype=jnp.bfloat16, **overrides):
  """A 2-block ViT computing in `dtype` with `tuning`, its parameters, and the loss
  sum(logits^2) of a batch [2, 16, 16, 3] of ones in training mode (dropout rng given)."""
  # Every block computes every row: the products counted below are whole blocks'. (With
  # `skip_unread_tokens` the last block's [CLS]-only attention products have one query row,
  # matrix-vector products XLA:CPU computes in fp32, as it does the weight gradients of a
  # contraction over this batch's 2 rows.)
  dims = dict(hidden_size=32, mlp_dim=64, num_heads=2, num_layers=2, patch_size=8,
              skip_unread_tokens=False)
  model = build_model("S/16", 5, tuning=tuning, dtype=dtype, **(dims | overrides))
  params = init_params(model, jax.random.key(0), image_size=16)
  images = jnp.ones((2, 16, 16, 3), jnp.float32)
  rngs = {"dropout": jax.random.key(1)}

  def loss(p):
    logits, _ = model.apply({"params": p}, images, train=True, rngs=rngs)
    return jnp.sum(logits ** 2)

  return params, loss


def test_bf16_vit_train_step_dots_take_bf16_operands():
  """The point of the module: XLA:CPU keeps every projection and attention product of a bf16
  ViT's gradient in bf16 x bf16 -> f32 (its fast path) instead of converting to fp32."""
  params, loss = _tiny_vit(dict(method="full"))
  hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
  dots = _dots(hlo)
  assert dots, "no dot found in the HLO"
  # 2 blocks x (6 projections (query, key, value, out, mlp in / out) + attention's 2 batched
  # products), forward and two gradients: 48 products bf16 x bf16 -> f32, plus the patch
  # embedding's forward and kernel gradient (the images take no gradient). The head (forward
  # and 2 gradients, fp32 by design) is the only fp32 one.
  bf16 = [d for d in dots if d == ("bf16xbf16", "f32")]
  assert len(bf16) == 2 * (6 + 2) * 3 + 2, dots
  assert len(dots) - len(bf16) == 3, dots
  jax.block_until_ready(jax.jit(jax.grad(loss))(params))  # and XLA:CPU runs it


def test_bf16_vit_gradients_follow_float32():
  kw = dict(tuning=dict(method="full"), hidden_size=32, mlp_dim=64, num_heads=2, num_layers=2,
            patch_size=8)
  m32 = build_model("S/16", 5, dtype=jnp.float32, **kw)
  m16 = build_model("S/16", 5, dtype=jnp.bfloat16, **kw)
  params = init_params(m32, jax.random.key(0), image_size=16)
  params["head"]["kernel"] = jax.random.normal(jax.random.key(1), params["head"]["kernel"].shape)
  images = jax.random.normal(jax.random.key(2), (4, 16, 16, 3))

  def loss(model, p):
    logits, _ = model.apply({"params": p}, images)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[:, 0])

  g32 = jax.jit(jax.grad(lambda p: loss(m32, p)))(params)  # jitted: one compilation each
  g16 = jax.jit(jax.grad(lambda p: loss(m16, p)))(params)
  assert all(b.dtype == jnp.float32 for b in jax.tree.leaves(g16))  # fp32 gradients
  flat32 = jnp.concatenate([x.ravel() for x in jax.tree.leaves(g32)])
  flat16 = jnp.concatenate([x.ravel() for x in jax.tree.leaves(g16)])
  err = float(jnp.linalg.norm(flat32 - flat16) / jnp.linalg.norm(flat32))
  assert err < 3e-2, err  # bf16 operands: relative errors of 1e-3 to 1e-2


def test_bf16_dots_remat_saves_the_projections_bf16_outputs(capsys):
  """Under model.remat="dots" a bf16 block keeps its projections' outputs for the backward
  pass: the bf16 values after the bias add (2 bytes each), not the fp32 products (4)."""
  from jax.ad_checkpoint import print_saved_residuals

  params, loss = _tiny_vit(dict(method="full"), remat="dots")
  print_saved_residuals(loss, params)  # one "<aval> <why>" line per residual
  named = [line.split()[0] for line in capsys.readouterr().out.splitlines()
           if precision.SAVEABLE_NAME in line]
  # 2 blocks x the 5 projections whose outputs the recomputed blocks need (query, key, value,
  # out, mlp in; the backward pass needs nothing of mlp out's output).
  assert len(named) == 2 * 5, named
  assert all(aval.startswith("bf16[") for aval in named), named


# (tuning, the plug-in dense layers' module names, how many there are in 2 blocks)
PLUG_IN_DENSE = [
    (dict(method="adapter"), ("down", "up"), 2 * 2 * 2),  # attn and mlp, per block
    (dict(method="adapter", placement="pfeiffer"), ("down", "up"), 2 * 2),
    (dict(method="adapter", placement="adapter_plus"), ("down", "up"), 2 * 2),
    (dict(method="adaptformer"), ("down", "up"), 2 * 2),
    (dict(method="convpass"), ("down", "up"), 2 * 2 * 2),  # attn and mlp, per block
    (dict(method="repadapter"), ("down",), 2 * 2),  # its up is a group-wise map
]


@pytest.mark.parametrize("tuning,names,layers", PLUG_IN_DENSE)
def test_bf16_plug_in_dense_products_take_bf16_operands(tuning, names, layers):
  """The adapters' own dense layers (`jvt.methods.dense.Dense`) take the backbone's bf16 x bf16
  -> f32 path: the forward product and both gradients of each are mixed (flax Dense's would be
  converted to fp32 by XLA:CPU)."""
  params, loss = _tiny_vit(tuning)
  ops = _dot_ops(jax.jit(jax.grad(loss)).lower(params).compile().as_text())
  plug_in = [(operands, result) for operands, result, name in ops
             if any(f"/{n}/" in name for n in names)]
  assert len(plug_in) == 3 * layers, ops  # forward and two gradients each
  assert all(d == ("bf16xbf16", "f32") for d in plug_in), plug_in
  jax.block_until_ready(jax.jit(jax.grad(loss))(params))  # and XLA:CPU runs it


LOW_RANK = [dict(method="lora"), dict(method="fact", variant="tt"),
            dict(method="fact", variant="tk")]
FACT_DIMS = dict(mlp_dim=4 * 32)  # FacT needs mlp_dim = 4 * hidden_size; LoRA runs at the same dims


@pytest.mark.parametrize("tuning", LOW_RANK[:2], ids=["lora", "fact_tt"])
def test_bf16_low_rank_products_take_bf16_operands(tuning):
  """LoRA's and FacT's products (x A, (x A) B; x U C V) take the mixed path too: every product
  of the gradient is bf16 x bf16 -> f32 but the head's three. Written as bf16 x bf16 -> bf16,
  XLA:CPU converted them to fp32 products (FacT's bf16 step 1.09-1.21x slower). FacT-TK runs
  the same projection code; its cores are fp32 products of the parameters G and P alone."""
  params, loss = _tiny_vit(tuning, **FACT_DIMS)
  dots = _dots(jax.jit(jax.grad(loss)).lower(params).compile().as_text())
  mixed = [d for d in dots if d == ("bf16xbf16", "f32")]
  assert len(dots) - len(mixed) == 3, dots
  jax.block_until_ready(jax.jit(jax.grad(loss))(params))


def _saved_products(tuning, dtype, capsys) -> list[str]:
  """The shapes of the per-image products a 2-block ViT keeps for its backward pass under remat
  "dots" (in bf16 the values `dense` tags, in fp32 the `dot_general` outputs the policy saves;
  per image: a leading batch axis of 2, so not FacT-TK's products of its parameters alone)."""
  from jax.ad_checkpoint import print_saved_residuals

  params, loss = _tiny_vit(tuning, dtype=dtype, remat="dots", **FACT_DIMS)
  capsys.readouterr()
  print_saved_residuals(loss, params)  # one "<aval> <why>" line per residual
  mark = precision.SAVEABLE_NAME if dtype == jnp.bfloat16 else "output of dot_general"
  return sorted(line.split()[0] for line in capsys.readouterr().out.splitlines()
                if mark in line and line.split("[", 1)[1].startswith("2,"))


DTYPES = [jnp.bfloat16, jnp.float32]


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp32"])
@pytest.mark.parametrize("tuning", LOW_RANK, ids=["lora", "fact_tt", "fact_tk"])
def test_dots_remat_keeps_no_low_rank_product(tuning, dtype, capsys):
  """Under remat "dots" a LoRA / FacT step keeps the products full fine-tuning's keeps (the
  projections' outputs) and no more: its own products are recomputed from their [..., r]
  operands. Kept, they are as large as the projections' outputs (FacT's bf16 step held 96 MB
  more XLA temporaries). In fp32 the policy would save every plain product: `dense(...,
  saveable=False)` hides them from it."""
  full = _saved_products(dict(method="full"), dtype, capsys)
  assert len(full) == 2 * 5, full  # 2 blocks x query, key, value, out, mlp in
  assert _saved_products(tuning, dtype, capsys) == full


# ---------------------------------------------------------------- bf16 on CPUs without bf16
_X86 = ("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\n"
        "flags\t\t: fpu sse2 avx2 fma {extra}\nbugs\t\t: sysret_ss_attrs\n\n"
        "processor\t: 1\nflags\t\t: fpu avx512_bf16\n")
_ARM = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd sve {extra}\nCPU part\t: 0xd40\n"


@pytest.mark.parametrize("text,extra,native", [
    (_X86, "", False), (_X86, "avx512f avx512_bf16", True), (_X86, "amx_bf16", True),
    (_ARM, "", False), (_ARM, "bf16 i8mm", True)])
def test_cpu_flags_reads_the_first_cpu_of_proc_cpuinfo(tmp_path, text, extra, native):
  path = tmp_path / "cpuinfo"
  path.write_text(text.format(extra=extra))
  flags = precision.cpu_flags(str(path))
  assert ("avx2" in flags or "asimd" in flags) and set(extra.split()) <= flags
  # Only the first CPU's line counts (x86's second processor here lists avx512_bf16).
  message = precision.emulated_bf16_message("bfloat16", "cpu", flags)
  assert (message is None) == native


def test_cpu_flags_claims_nothing_without_a_flags_line(tmp_path):
  assert precision.cpu_flags(str(tmp_path / "missing")) is None
  (tmp_path / "other").write_text("Hardware\t: unknown\n")
  assert precision.cpu_flags(str(tmp_path / "other")) is None
  assert precision.emulated_bf16_message("bfloat16", "cpu", None) is None


def test_emulated_bf16_message_only_for_16_bit_dtypes_on_cpu():
  plain = frozenset({"fpu", "avx2"})
  message = precision.emulated_bf16_message("bfloat16", "cpu", plain)
  assert "model.dtype='bfloat16'" in message and "model.dtype='float32'" in message
  assert precision.emulated_bf16_message("float16", "cpu", plain) is not None
  assert precision.emulated_bf16_message("float32", "cpu", plain) is None
  assert precision.emulated_bf16_message("bfloat16", "gpu", plain) is None
  assert precision.emulated_bf16_message("bfloat16", "tpu", plain) is None


def test_setup_warns_once_when_bf16_runs_on_a_cpu_without_it(monkeypatch, caplog):
  from helpers_train import small_method_setup
  for flags, expected in ((frozenset({"avx2"}), 1), (frozenset({"avx512_bf16"}), 0)):
    monkeypatch.setattr(precision, "cpu_flags", lambda flags=flags: flags)
    caplog.clear()
    with caplog.at_level("WARNING", logger="jvt.train"):
      small_method_setup("linear", dtype="bfloat16")
    hits = [r for r in caplog.records if "without native bf16" in r.getMessage()]
    assert len(hits) == expected, flags
