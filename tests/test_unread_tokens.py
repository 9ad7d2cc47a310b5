"""Tests for `ViT.skip_unread_tokens`: blocks compute only the token rows read after them (the
last block's [CLS] for pool "tok", no prompt rows a deep-prompt method replaces next). The
reference is the same model computing every row (`skip_unread_tokens=False`), which
test_models checks against numpy; the FLOPs saved are counted by hand."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jvt
from jvt.losses.da_vpt import capture_keys
from jvt.methods.registry import registry
from jvt.models.vit import POOL_READS, Encoder, read_rows

from conftest import IMAGE, SMALL, images, small_model, small_params

D, MLP, L, PATCH = SMALL["hidden_size"], SMALL["mlp_dim"], SMALL["num_layers"], SMALL["patch_size"]
N = (IMAGE // PATCH) ** 2  # 9 image tokens

# Settings that fit the tiny model (SMALL, 24 px images) where a method's defaults do not.
SETTINGS = {
    "distill_proj": dict(dim=16),
    "vp": dict(pad=4),
}
MODEL_FIELDS = {"fact": dict(mlp_dim=4 * D)}  # FacT's tensor needs mlp_dim = 4 D


def both_paths(tuning, **fields):
  """(model computing only read rows, the same model computing every row), with two blocks:
  a middle one (deep prompts replaced next) and the last one (what the pooling reads)."""
  model = small_model(tuning, **{"num_layers": 2, **fields})
  assert model.skip_unread_tokens  # the default
  return model, model.clone(skip_unread_tokens=False)


def loss_and_grads(model, params, x, train=False, **apply_kwargs):
  def loss(p):
    logits, aux = model.apply({"params": p}, x, train=train, **apply_kwargs)
    weights = jnp.cos(jnp.arange(logits.size, dtype=jnp.float32)).reshape(logits.shape)
    return jnp.sum(logits * weights), (logits, aux)
  (value, (logits, aux)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return value, logits, aux, grads


def assert_trees_close(got, want, rel=2e-5):
  """Leaf by leaf within `rel` of the leaf's largest value (of 1% of the tree's largest for
  leaves that are zero up to rounding, such as the key bias's gradient)."""
  top = max(float(np.max(np.abs(b))) for b in jax.tree.leaves(want))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    scale = max(float(np.max(np.abs(b))), 1e-2 * top)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=rel * scale, rtol=0,
                               err_msg=jax.tree_util.keystr(path))


# ------------------------------------------------------------------ which rows a block computes
@pytest.mark.parametrize("read, k, p, n, want", [
    (("cls",), 1, 0, 9, ((0, 1),)),
    (("cls",), 5, 3, 9, ((0, 1),)),  # registers and prompts dropped with the image tokens
    (("prefix", "patches"), 1, 3, 9, ((0, 1), (4, 13))),  # the prompts dropped
    (("prefix", "patches"), 1, 0, 9, ()),  # no prompts: every row
    (("prefix", "prompts", "patches"), 1, 3, 9, ()),
    (("patches",), 1, 3, 9, ((4, 13),)),
    (("cls", "patches"), 2, 0, 9, ((0, 1), (2, 11))),
    (("cls", "prefix"), 2, 3, 9, ((0, 2),)),  # overlapping parts merged
    (("prefix", "prompts"), 0, 3, 9, ((0, 3),)),  # SigLIP: no prefix
])
def test_read_rows(read, k, p, n, want):
  assert read_rows(read, k, p, n) == want


def encoder(tuning=None, read=("cls",)):
  model = small_model(tuning)
  return Encoder(L, SMALL["num_heads"], MLP, PATCH, model.methods, read=read)


def test_block_rows_of_deep_and_shallow_prompts_and_the_last_block():
  k, p, t = 1, 3, 1 + 3 + N
  deep = encoder(dict(method="vpt", num_prompts=p))
  assert [deep.block_rows(i, (), k, p, N) for i in range(L)] == [
      ((0, 1), (1 + p, t)), ((0, 1), (1 + p, t)), ((0, 1),)]
  # Shallow prompts are carried on: every row but in the last block.
  shallow = encoder(dict(method="vpt", num_prompts=p, deep=False))
  assert [shallow.block_rows(i, (), k, p, N) for i in range(L)] == [(), (), ((0, 1),)]
  plain = encoder(read=("patches",))
  assert [plain.block_rows(i, (), k, 0, N) for i in range(L)] == [(), (), ((1, 1 + N),)]


def test_block_rows_keep_what_captures_read():
  k, p, t = 1, 3, 1 + 3 + N
  deep = encoder(dict(method="vpt", num_prompts=p))
  last = L - 1
  for capture in (("tokens",), ("attention",), ("prompt_query",)):
    assert deep.block_rows(last, capture, k, p, N) == (), capture
  assert deep.block_rows(last, ("attn_out_mean", "cls_query"), k, p, N) == (
      (0, 1), (1 + p, t))
  assert deep.block_rows(last, ("input_patch_mean", "prompts"), k, p, N) == ((0, 1),)
  gap = encoder(dict(method="vpt", num_prompts=p), read=("patches",))
  assert gap.block_rows(last, ("cls_query",), k, p, N) == ((0, 1), (1 + p, t))


class MixesEveryRow(jvt.methods.Method):
  """A method whose block hooks mix rows beyond the image grid (neither rowwise nor
  grid-local): its models compute every row."""
  name = "mixes_every_row"
  rowwise = False


def test_a_method_whose_block_hooks_mix_rows_computes_every_row():
  base = encoder(dict(method="vpt", num_prompts=2))
  mixing = Encoder(L, SMALL["num_heads"], MLP, PATCH, base.methods + (MixesEveryRow(),),
                   read=("cls",))
  assert [mixing.block_rows(i, (), 1, 2, N) for i in range(L)] == [(), (), ()]
  no_skip = Encoder(L, SMALL["num_heads"], MLP, PATCH, small_model().methods, read=("cls",),
                    skip_unread_tokens=False)
  assert no_skip.block_rows(L - 1, (), 1, 0, N) == ()


def test_a_grid_local_method_skips_rows_as_a_rowwise_one():
  # Convpass mixes only the image rows: a block computes every image row or none, so it skips
  # the rows a rowwise method would.
  assert registry()["convpass"].rowwise is False and registry()["convpass"].grid_local
  k, p, t = 1, 2, 1 + 2 + N
  conv = encoder([dict(method="convpass"), dict(method="vpt", num_prompts=p)])
  assert [conv.block_rows(i, (), k, p, N) for i in range(L)] == [
      ((0, 1), (1 + p, t)), ((0, 1), (1 + p, t)), ((0, 1),)]
  gap = encoder(dict(method="convpass"), read=("patches",))
  assert gap.block_rows(L - 1, (), k, 0, N) == ((1, 1 + N),)


@pytest.mark.parametrize("rows, want", [
    ((), N), (((0, 1),), 0), (((0, 1), (3, 12)), N), (((1, 12),), N), (((0, 3),), 0)])
def test_site_image_rows(rows, want):
  # 1 prefix token, 2 prompts, the 3 x 3 grid last: rows 3 .. 11 of 12.
  site = jvt.methods.Site(num_tokens=12, grid=(3, 3), rows=rows)
  assert site.image_rows() == want


def test_site_image_rows_refuses_part_of_the_grid():
  site = jvt.methods.Site(num_tokens=12, grid=(3, 3), rows=((0, 1), (6, 12)))
  with pytest.raises(ValueError, match="every image row or none"):
    site.image_rows()


# ------------------------------------------------------------------ the same function
# One method of each way a method meets the rows in the default run (prompts the next block
# replaces, kept prompts, key-value prompts, a projection plug-in, a kernel hook, a dense branch,
# an affine, a convolution over the grid, factors shared by all blocks); the rest under `-m slow`.
DEFAULT_RUN = ("full", "vpt", "da_vpt", "e2vpt", "lora", "dora", "adapter", "ssf", "convpass",
               "fact")


@pytest.mark.parametrize("name", [
    m if m in DEFAULT_RUN else pytest.param(m, marks=pytest.mark.slow) for m in sorted(registry())])
def test_every_method_same_logits_and_gradients(name):
  tuning = dict(method=name, **SETTINGS.get(name, {}))
  fast, every_row = both_paths(tuning, **MODEL_FIELDS.get(name, {}))
  params = small_params(fast)
  x = jnp.asarray(images(2))
  _, logits, _, grads = loss_and_grads(fast, params, x)
  _, want_logits, _, want_grads = loss_and_grads(every_row, params, x)
  assert np.abs(want_logits).max() > 0.1
  np.testing.assert_allclose(logits, want_logits, atol=2e-5 * np.abs(want_logits).max())
  assert_trees_close(grads, want_grads)


@pytest.mark.parametrize("pool, fields", [
    ("tok", {}), ("gap", {}), ("gap", dict(fc_norm=True)), ("tok_gap", {}),
    ("map", dict(class_token=False)), ("tok", dict(num_registers=2)),
])
def test_every_pooling_same_logits_and_gradients(pool, fields):
  tuning = [dict(method="vpt", num_prompts=2), dict(method="lora", rank=2)]
  fast, every_row = both_paths(tuning, pool=pool, **fields)
  params = small_params(fast)
  x = jnp.asarray(images(2))
  got, want = loss_and_grads(fast, params, x), loss_and_grads(every_row, params, x)
  np.testing.assert_allclose(got[1], want[1], atol=2e-5 * np.abs(want[1]).max())
  np.testing.assert_allclose(got[2]["pre_logits"], want[2]["pre_logits"], atol=1e-5)
  assert_trees_close(got[3], want[3])


@pytest.mark.parametrize("pool, tuning", [
    ("gap", dict(method="convpass")),  # the last block: the image rows alone
    ("gap", [dict(method="convpass"), dict(method="vpt", num_prompts=2, deep=False)]),
    ("tok_gap", [dict(method="convpass"), dict(method="vpt", num_prompts=2, deep=False)]),
])
def test_convpass_with_pools_reading_the_grid_same_logits_and_gradients(pool, tuning):
  # The last block computes the image rows ("gap"), or [CLS] and the image rows without the
  # carried prompts ("tok_gap"): the convolution sees the whole grid, [CLS] its centre tap.
  fast, every_row = both_paths(tuning, pool=pool)
  last = fast.num_layers - 1
  encoder = Encoder(fast.num_layers, SMALL["num_heads"], MLP, PATCH, fast.methods,
                    read=POOL_READS[pool])
  assert encoder.block_rows(last, (), 1, 2 if isinstance(tuning, list) else 0, N) != ()  # skips
  params = small_params(fast)
  x = jnp.asarray(images(2))
  got, want = loss_and_grads(fast, params, x), loss_and_grads(every_row, params, x)
  np.testing.assert_allclose(got[1], want[1], atol=2e-5 * np.abs(want[1]).max())
  assert_trees_close(got[3], want[3])


@pytest.mark.parametrize("tuning", [
    dict(method="vpt", num_prompts=2, deep=False),  # carried on: computed in the middle block
    dict(method="vpt", prompts_per_block=(0, 2)),  # none inserted before the last block
    dict(method="vpt", prompts_per_block=(2, 0)),  # block 1 drops block 0's prompts
    [dict(method="e2vpt", num_prompts=2, num_kv_prompts=2), dict(method="adapter")],
    [dict(method="vpt", num_prompts=2), dict(method="convpass")],  # grid kept, prompts not
])
def test_prompt_layouts_same_logits_and_gradients(tuning):
  fast, every_row = both_paths(tuning)
  params = small_params(fast)
  x = jnp.asarray(images(2))
  got, want = loss_and_grads(fast, params, x), loss_and_grads(every_row, params, x)
  np.testing.assert_allclose(got[1], want[1], atol=2e-5 * np.abs(want[1]).max())
  assert_trees_close(got[3], want[3])


def test_training_mode_and_remat_same_gradients():
  tuning = dict(method="vpt", num_prompts=2)
  fast, every_row = both_paths(tuning, remat="dots", num_layers=3)
  params = small_params(fast)
  x = jnp.asarray(images(2))
  got = loss_and_grads(fast, params, x, train=True, rngs={"dropout": jax.random.key(0)})
  want = loss_and_grads(every_row, params, x, train=True, rngs={"dropout": jax.random.key(0)})
  assert_trees_close(got[3], want[3])


@pytest.mark.parametrize("tuning", [dict(method="full"), dict(method="vpt", num_prompts=2)])
def test_fused_attention_same_logits_and_gradients(tuning):
  # `fused_attention` (XLA's implementation on CPU) with one query row in the last block.
  fast, every_row = both_paths(tuning, fused_attention=True)
  params = small_params(fast)
  x = jnp.asarray(images(2))
  got, want = loss_and_grads(fast, params, x), loss_and_grads(every_row, params, x)
  np.testing.assert_allclose(got[1], want[1], atol=2e-5 * np.abs(want[1]).max())
  assert_trees_close(got[3], want[3])


@pytest.mark.parametrize("preset, attention_mask", [("code", False), ("paper", True)])
def test_da_vpt_captures_are_those_of_every_row(preset, attention_mask):
  # Both presets' captures at a middle and the last block: "code" reads [CLS]'s query and the
  # input image tokens, "paper" the prompts' queries and the attention output's image tokens.
  tuning = dict(method="da_vpt", num_prompts=2, num_proxy_prompts=3, proxy_layers=(0, 1),
                preset=preset, attention_mask=attention_mask)
  fast, every_row = both_paths(tuning)
  keys = capture_keys(jvt.methods.find(fast, "da_vpt"))
  params = small_params(fast)
  x = jnp.asarray(images(2))
  kwargs = dict(capture=keys, capture_layers=(0, 1))
  got = loss_and_grads(fast, params, x, **kwargs)
  want = loss_and_grads(every_row, params, x, **kwargs)
  assert sorted(got[2]["blocks"]) == [0, 1]
  assert_trees_close(got[2]["blocks"], want[2]["blocks"])
  assert_trees_close(got[3], want[3])


# ------------------------------------------------------------------ the work saved
def forward_flops(model, params, x):
  cost = jax.jit(lambda p: model.apply({"params": p}, x)[0]).lower(params).compile()
  cost = cost.cost_analysis()
  return (cost[0] if isinstance(cost, list) else cost)["flops"]


def test_skipped_rows_are_not_computed():
  # Deep prompts (P per block) with pool "tok": blocks 0 .. L-2 skip the P prompt rows' queries,
  # attention, out projection and MLP; the last block computes [CLS] only (T - 1 rows skipped).
  # Dense FLOPs per skipped row: 2 (D^2 query + D^2 out + 2 D MLP), attention 2 * 2 T' D.
  p, b = 3, 2
  t = 1 + p + N
  fast, every_row = both_paths(dict(method="vpt", num_prompts=p))
  params = small_params(fast)
  x = jnp.asarray(images(b))
  per_row = 2 * (2 * D * D + 2 * D * MLP) + 2 * 2 * t * D
  skipped_rows = (fast.num_layers - 1) * p + (t - 1)
  want = b * skipped_rows * per_row
  saved = forward_flops(every_row, params, x) - forward_flops(fast, params, x)
  # The dense products are counted exactly; the row-wise norms, GELU and softmax of the same
  # rows add a few percent.
  assert want <= saved <= 1.25 * want, (saved, want)
