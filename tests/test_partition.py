"""Tests for jvt.partition: first-match rules, masks, the partitioned optimizer (frozen leaves
never move and hold no state) and the compiled cost of frozen-backbone gradients."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jvt
from jvt import partition
from jvt.methods import resolve_tuning

from conftest import IMAGE, NUM_CLASSES, flat, images, random_like, small_model, unflat

# A hand-made tree with the backbone's path shapes (values irrelevant to labelling).
TREE = unflat({
    "embedding/kernel": np.zeros((2, 2, 3, 4)), "embedding/bias": np.zeros(4),
    "cls": np.zeros((1, 1, 4)),
    "Transformer/encoderblock_0/LayerNorm_0/scale": np.zeros(4),
    "Transformer/encoderblock_0/LayerNorm_0/bias": np.zeros(4),
    "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel": np.zeros((4, 2, 2)),
    "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/bias": np.zeros((2, 2)),
    "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/lora_a": np.zeros((4, 1)),
    "head/kernel": np.zeros((4, 3)), "head/bias": np.zeros(3),
})
ATTN = "Transformer/encoderblock_0/MultiHeadDotProductAttention_0"

RULE_CASES = {
    "first_match_wins": (
        (("head/.*", "head"), ("head/kernel", "frozen"), (".*/lora_(a|b)", "lora"),
         (".*", "frozen")),
        {"head/kernel": "head", "head/bias": "head", f"{ATTN}/query/lora_a": "lora",
         "cls": "frozen", "embedding/bias": "frozen"}),
    "fullmatch_not_search": (  # "bias" alone matches no path: rules are re.fullmatch'ed
        (("bias", "bias"), (".*/bias", "bias"), (".*", "frozen")),
        {"embedding/bias": "bias", "cls": "frozen", f"{ATTN}/query/bias": "bias",
         "Transformer/encoderblock_0/LayerNorm_0/scale": "frozen"}),
    "order_matters": (
        ((".*", "frozen"), (".*/bias", "bias")),
        {"embedding/bias": "frozen", "head/bias": "frozen"}),
}


@pytest.mark.parametrize("case", list(RULE_CASES))
def test_label_rules_table(case):
  rules, expected = RULE_CASES[case]
  labels = flat(partition.label_params(TREE, rules))
  assert set(labels) == set(flat(TREE))
  for path, label in expected.items():
    assert labels[path] == label, path
  mask = flat(partition.trainable_mask(TREE, rules))
  assert {k for k, v in mask.items() if v} == {k for k, v in labels.items() if v != "frozen"}


def test_unmatched_leaves_are_named():
  rules = (("head/.*", "head"), ("embedding/.*", "frozen"))
  with pytest.raises(ValueError, match=r"No partition rule matches 6 parameter\(s\): .*'cls'.*"
                                       r"LayerNorm_0/scale"):
    partition.label_params(TREE, rules)


def test_required_rule_that_matches_nothing_is_an_error():
  rules = (("clz", "cls", True), (".*", "frozen"))
  with pytest.raises(ValueError, match=r"Partition rule\(s\) \['clz'\] match no parameter"):
    partition.label_params(TREE, rules)
  # Not required (a method's own rule): fine.
  assert flat(partition.label_params(TREE, (("clz", "cls"), (".*", "frozen"))))["cls"] == "frozen"


@pytest.fixture(scope="module")
def vpt_shapes():
  return jvt.param_shapes(small_model(dict(method="vpt", num_prompts=2)), IMAGE)


def test_user_rules_from_a_method_config(vpt_shapes):
  cfg = dict(method="vpt", num_prompts=2,
             rules=(("cls", "cls"), ("Transformer/prompts/block_0", "frozen")))
  labels = flat(partition.label_params(vpt_shapes, cfg))
  assert labels["cls"] == "cls"  # user rule: trains the [CLS] token
  assert labels["Transformer/prompts/block_0"] == "frozen"  # user rules come first
  assert labels["Transformer/prompts/block_1"] == "prompt"
  assert labels["head/bias"] == "head"
  assert labels["embedding/kernel"] == "frozen"
  with pytest.raises(ValueError, match=r"\['clz'\] match no parameter"):
    partition.label_params(vpt_shapes, dict(method="vpt", num_prompts=2, rules=(("clz", "c"),)))


@pytest.mark.parametrize("cfg", [
    dict(method="vpt", num_prompts=2), [dict(method="vpt", num_prompts=2),
                                        dict(method="bitfit", subset=("value",))],
    [dict(method="vpt", num_prompts=2), dict(method="partial", k=1)],
])
def test_mask_from_config_equals_mask_from_model(cfg):
  model = small_model(cfg)
  shapes = jvt.param_shapes(model, IMAGE)
  from_model = partition.trainable_mask(shapes, model)
  assert partition.trainable_mask(shapes, cfg) == from_model
  assert partition.trainable_mask(shapes, model.partition_rules) == from_model
  assert any(jax.tree.leaves(from_model)) and not all(jax.tree.leaves(from_model))


def test_split_and_merge_params_roundtrip(vpt_shapes):
  params = random_like(vpt_shapes)
  mask = partition.trainable_mask(params, dict(method="vpt"))
  trainable, frozen = partition.split_params(params, mask)
  assert set(flat(trainable)) == {"head/kernel", "head/bias", "Transformer/prompts/block_0",
                                  "Transformer/prompts/block_1", "Transformer/prompts/block_2"}
  assert not set(flat(trainable)) & set(flat(frozen))
  merged = partition.merge_params(trainable, frozen)
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, merged, params)


def test_summary_totals():
  model = jvt.build_model("B/16", 100, dict(method="vpt", num_prompts=50))
  text = partition.summary(jvt.param_shapes(model), model)
  rows = {line.split("  ")[0].strip(): line.split() for line in text.splitlines()}
  assert rows["head"][1:3] == ["2", "76,900"]
  assert rows["prompt"][1:3] == ["12", f"{12 * 50 * 768:,}"]
  assert rows["trainable total"][2:4] == ["14", "537,700"]
  backbone = 85_798_656  # B/16 at 224 without its head
  assert rows["frozen"][2] == f"{backbone:,}"
  assert f"{100 * 537_700 / backbone:.3f}" in rows["trainable total"]
  assert f"backbone without head: {backbone:,}" in text


# ------------------------------------------------------------------------------- optimizers
def _loss_fn(model, x, labels):
  def loss(params):
    logits, _ = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss


# Leaves whose gradient is exactly zero in any ViT (softmax is invariant to a per-query constant
# added to every key): they may or may not move by rounding, so "moved" is not asserted for them.
ZERO_GRAD = ("key/bias", "key/ssf_shift")
# Most kinds of trainable leaf at once (one compilation): prompts, LoRA, adapters, chosen
# biases, a user rule for [CLS], SSF, AdaptFormer and the final norm (a user rule); the
# block's weights, the embedding and the position embedding stay frozen.
COMPOSITION = [
    dict(method="vpt", num_prompts=2), dict(method="lora", rank=2),
    dict(method="adapter", dim=4), dict(method="bitfit", subset=("value", "mlp_out")),
    dict(method="linear", rules=(("cls", "cls"), ("Transformer/encoder_norm/.*", "norm"))),
    dict(method="ssf"), dict(method="adaptformer", dim=4)]


def _setup():
  model = small_model(COMPOSITION, num_layers=1)
  # Zero where the real init is zero (head, LoRA B, adapter up): gradients must still reach
  # every trainable leaf within a few steps.
  params = jax.tree.map(jnp.asarray, random_like(
      jvt.param_shapes(model, IMAGE), keep_zero=("head/kernel", "lora_b", "up/kernel")))
  x = jnp.asarray(images(4))
  labels = jnp.arange(4) % NUM_CLASSES
  return model, params, x, labels


def _check_moved_and_frozen(before, after, mask):
  before, after, mask = flat(before), flat(after), flat(mask)
  assert set(before) == set(after)
  frozen = {k for k, v in mask.items() if not v}
  assert "Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel" in frozen
  assert "Transformer/posembed_input/pos_embedding" in frozen
  assert "Transformer/encoder_norm/scale" not in frozen
  for path, trains in mask.items():
    if not trains:
      np.testing.assert_array_equal(after[path], before[path], err_msg=path)  # bitwise
    elif not path.endswith(ZERO_GRAD):
      assert not np.array_equal(after[path], before[path]), f"{path} did not move"


def _state_size(state):
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(state))


def test_full_tree_optimizer_freezes_and_trains():
  """The optimizer over the FULL tree with full gradients: optax.partition + set_to_zero."""
  model, params, x, labels = _setup()
  assert set(jax.tree.leaves(partition.label_params(params, model))) == {
      "frozen", "head", "prompt", "lora", "adapter", "bias", "cls", "norm", "ssf"}
  mask = partition.trainable_mask(params, model)
  tx = partition.make_optimizer(dict(name="sgd", lr=0.1), model.partition_rules,
                                total_steps=10)
  state = tx.init(params)
  trainable, _ = partition.split_params(params, mask)
  # No state for frozen leaves: momentum for the trainable leaves + one step count per group.
  assert _state_size(state) == _state_size(tx.init(trainable))
  momentum = [l for l in jax.tree.leaves(state) if l.ndim > 0]
  assert sum(l.size for l in momentum) == partition.count_params(trainable)
  loss = _loss_fn(model, x, labels)

  @jax.jit
  def step(params, state):
    grads = jax.grad(loss)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  new = params
  for _ in range(4):
    new, state = step(new, state)
  _check_moved_and_frozen(params, new, mask)


def test_trainer_style_subtree_gradients_adamw():
  """Gradients of the trainable subtree only; adamw with weight decay, groups and clipping."""
  model, params, x, labels = _setup()
  mask = partition.trainable_mask(params, model)
  trainable, frozen = partition.split_params(params, mask)
  tx = partition.make_optimizer(
      dict(name="adamw", lr=0.01, weight_decay=0.1, warmup_steps=2, clip_norm=1.0),
      model.partition_rules, total_steps=10, groups={"head": dict(lr_mult=2.0, wd_mult=5.0)})
  state = tx.init(trainable)
  adam_moments = [l for l in jax.tree.leaves(state) if l.ndim > 0]
  assert sum(l.size for l in adam_moments) == 2 * partition.count_params(trainable)
  loss = _loss_fn(model, x, labels)

  @jax.jit
  def step(trainable, state):
    grads = jax.grad(lambda t: loss(partition.merge_params(t, frozen)))(trainable)
    updates, state = tx.update(grads, state, trainable)
    return optax.apply_updates(trainable, updates), state

  new = trainable
  for _ in range(4):
    new, state = step(new, state)
  _check_moved_and_frozen(params, partition.merge_params(new, frozen), mask)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_weight_decay_masks_and_group_multipliers(name):
  """Zero gradients at step 0: the update is the decoupled weight decay alone, -lr * wd * p
  (sgd adds wd * p to the gradient, then -lr * that), for matrices only."""
  tree = {"cls": np.ones((1, 1, 4), np.float32), "prompt": np.ones((2, 4), np.float32),
          "head": {"kernel": np.ones((4, 3), np.float32), "bias": np.ones(3, np.float32)},
          "embedding": {"kernel": np.ones((2, 2, 3, 4), np.float32)}}
  rules = (("head/.*", "head"), ("cls", "cls"), ("prompt", "prompt"), (".*", "frozen"))
  tx = partition.make_optimizer(dict(name=name, lr=0.1, weight_decay=0.5, momentum=0.0), rules,
                                total_steps=10, groups={"head": dict(lr_mult=2.0, wd_mult=3.0)})
  zeros = jax.tree.map(np.zeros_like, tree)
  updates, _ = tx.update(zeros, tx.init(tree), tree)
  np.testing.assert_allclose(updates["head"]["kernel"], -(0.1 * 2.0) * (0.5 * 3.0), rtol=1e-6)
  np.testing.assert_allclose(updates["prompt"], -0.1 * 0.5, rtol=1e-6)
  for leaf in (updates["head"]["bias"], updates["cls"], updates["embedding"]["kernel"]):
    np.testing.assert_array_equal(leaf, 0.0)  # no decay for biases / [CLS]; frozen


def test_schedule_warmup_then_cosine():
  sched = partition.make_schedule(1.0, total_steps=12, warmup_steps=2, kind="cosine")
  np.testing.assert_allclose(sched(0), 0.0)
  np.testing.assert_allclose(sched(1), 0.5)
  np.testing.assert_allclose(sched(2), 1.0)
  for t in (5, 7, 12):
    np.testing.assert_allclose(sched(t), 0.5 * (1 + math.cos(math.pi * (t - 2) / 10)), atol=1e-6)
  linear = partition.make_schedule(1.0, total_steps=10, kind="linear", end_factor=0.1)
  np.testing.assert_allclose(linear(5), 1.0 - 0.9 * 0.5, atol=1e-6)
  np.testing.assert_allclose(partition.make_schedule(0.3, 10, kind="constant")(7), 0.3)


@pytest.mark.parametrize("opt,kwargs,match", [
    (dict(name="rmsprop", lr=0.1), {}, r"optimizer.name='rmsprop'; allowed: \('sgd', 'adamw'"),
    (dict(name="sgd", lr=0.1, beta=0.9), {},
     r"optimizer: unknown field\(s\) \['beta'\]; allowed: name, lr"),
    (dict(name="adam", lr=0.1, weight_decay=0.1), {}, r"'adam' has no weight decay.*adamw"),
    (dict(name="sgd"), {}, r"optimizer.lr is required"),
    (dict(name="sgd", lr=0.1), dict(groups={"prompts": {}}),
     r"groups \['prompts'\] are no label of this tuning; labels: \['head', 'prompt'\]"),
    (dict(name="sgd", lr=0.1), dict(groups={"head": dict(lr=2.0)}),
     r"groups\['head'\]: unknown field\(s\) \['lr'\]; allowed: lr_mult, wd_mult"),
    (dict(name="sgd", lr=0.1, schedule="step"), {}, r"schedule='step'; allowed"),
])
def test_make_optimizer_bad_input(opt, kwargs, match):
  rules = resolve_tuning(dict(method="vpt"), 12).rules
  with pytest.raises(ValueError, match=match):
    partition.make_optimizer(opt, rules, total_steps=10, **kwargs)


# ----------------------------------------------------------------------------- compiled cost
def test_frozen_backbone_gradients_cost_less_than_full_finetuning():
  x = jnp.asarray(images(2))
  labels = jnp.arange(2)

  def grad_flops(cfg):
    model = small_model(cfg, num_layers=1)
    params = random_like(jvt.param_shapes(model, IMAGE))
    trainable, frozen = partition.split_params(params, partition.trainable_mask(params, model))
    loss = _loss_fn(model, x, labels)
    grad_fn = jax.grad(lambda t, f: loss(partition.merge_params(t, f)))
    cost = jax.jit(grad_fn).lower(trainable, frozen).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return cost["flops"]

  full = grad_flops(dict(method="full"))
  linear = grad_flops(dict(method="linear"))
  vpt = grad_flops(dict(method="vpt", num_prompts=1))
  # Linear probe: a forward pass and the head's gradient (~1/3 of full); VPT: no weight
  # gradients of the backbone (~2/3 of full).
  assert linear < 0.5 * full
  assert vpt < 0.85 * full
  assert linear < vpt
