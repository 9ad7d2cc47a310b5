"""Partition: which parameter leaves train, under which group, and the optimizer that follows.

Every leaf gets a label from a first-match list of `(regex, label[, required])` rules over its
`/`-joined path (`re.fullmatch`). The label "frozen" freezes a leaf; any other label is a
trainable group ("head", "prompt", "lora", "bias", ...) that may get its own lr / wd multipliers.
A leaf that no rule matches, or a user rule (required) that matches no leaf, is an error.

Training takes gradients of the trainable subtree only (`split_params` / `merge_params`), so XLA
never computes a frozen weight's gradient; the optimizer is an `optax.partition` whose frozen
branch is `optax.set_to_zero()` (no state), valid over the full tree and the trainable subtree.
"""
from __future__ import annotations

import collections
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import optax
from flax import traverse_util

from jvt.methods.leaves import BACKBONE_LEAVES, FROZEN
from jvt.methods.registry import resolve_tuning

PyTree = Any
Rule = tuple  # (regex, label) or (regex, label, required)


def _flat(params) -> dict[str, Any]:
  return traverse_util.flatten_dict(params, sep="/")


def rules_of(cfg_or_model, params: PyTree) -> tuple[Rule, ...]:
  """Rules from a model built by `jvt.build_model`, a tuning config, or a rule list."""
  rules = getattr(cfg_or_model, "partition_rules", None)
  if rules is not None:
    return tuple(rules)
  if (isinstance(cfg_or_model, Sequence) and cfg_or_model
      and all(isinstance(r, (tuple, list)) and len(r) in (2, 3) and isinstance(r[0], str)
              for r in cfg_or_model)):
    return tuple(tuple(r) for r in cfg_or_model)
  num_layers = len({k.split("/")[1] for k in _flat(params)
                    if k.startswith("Transformer/encoderblock_")})
  return resolve_tuning(cfg_or_model, num_layers).rules


def label_params(params: PyTree, cfg_or_model) -> PyTree:
  """A tree of string labels, one per leaf, by first matching rule."""
  rules = rules_of(cfg_or_model, params)
  compiled = [(re.compile(r[0]), r[1]) for r in rules]
  used = [False] * len(rules)
  labels, unmatched = {}, []
  for path in _flat(params):
    for i, (rx, label) in enumerate(compiled):
      if rx.fullmatch(path):
        labels[path] = label
        used[i] = True
        break
    else:
      unmatched.append(path)
  if unmatched:
    raise ValueError(
        f"No partition rule matches {len(unmatched)} parameter(s): {unmatched[:20]}. Every leaf "
        "needs a label: add a rule such as (regex, 'frozen') or (regex, '<group>') to the tuning "
        "config's `rules`, or use the method that owns these parameters.")
  unused = [r[0] for r, u in zip(rules, used) if len(r) > 2 and r[2] and not u]
  if unused:
    raise ValueError(f"Partition rule(s) {unused} match no parameter. Parameter paths look like "
                     f"{list(_flat(params))[:5]}; rules are re.fullmatch'ed against them.")
  return traverse_util.unflatten_dict(labels, sep="/")


def trainable_mask(params: PyTree, cfg_or_model) -> PyTree:
  """A tree of bools (True = trains) for a tuning config, a rule list or a built model."""
  return jax.tree.map(lambda label: label != FROZEN, label_params(params, cfg_or_model))


def split_params(params: PyTree, mask: PyTree) -> tuple[dict, dict]:
  """(trainable, frozen) nested dicts holding the leaves where mask is True / False."""
  flat, flat_mask = _flat(params), _flat(mask)
  trainable = {k: v for k, v in flat.items() if flat_mask[k]}
  frozen = {k: v for k, v in flat.items() if not flat_mask[k]}
  return (traverse_util.unflatten_dict(trainable, sep="/"),
          traverse_util.unflatten_dict(frozen, sep="/"))


def merge_params(trainable: PyTree, frozen: PyTree) -> dict:
  """Inverse of `split_params`."""
  flat = dict(_flat(frozen))
  flat.update(_flat(trainable))
  return traverse_util.unflatten_dict(flat, sep="/")


def count_params(tree: PyTree) -> int:
  return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))


def summary(params: PyTree, cfg_or_model) -> str:
  """Table of trainable parameters per group, the total, and its share of the backbone."""
  labels = _flat(label_params(params, cfg_or_model))
  flat = _flat(params)
  per_group = collections.Counter()
  leaves = collections.Counter()
  for path, label in labels.items():
    per_group[label] += int(np.prod(np.shape(flat[path])))
    leaves[label] += 1
  backbone = sum(int(np.prod(np.shape(v))) for k, v in flat.items()
                 if not k.startswith("head/") and _is_backbone(k))
  trainable = sum(n for g, n in per_group.items() if g != FROZEN)
  rows = [("group", "leaves", "parameters", "% of backbone")]
  for group in sorted(per_group, key=lambda g: (g == FROZEN, g)):
    rows.append((group, str(leaves[group]), f"{per_group[group]:,}",
                 f"{100 * per_group[group] / max(backbone, 1):.3f}"))
  rows.append(("trainable total", str(sum(leaves[g] for g in leaves if g != FROZEN)),
               f"{trainable:,}", f"{100 * trainable / max(backbone, 1):.3f}"))
  widths = [max(len(r[i]) for r in rows) for i in range(4)]
  lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                     enumerate(zip(r, widths))) for r in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  lines.append(f"(backbone without head: {backbone:,} parameters)")
  return "\n".join(lines)


def _is_backbone(path: str) -> bool:
  return re.fullmatch(BACKBONE_LEAVES, path) is not None


def _decay_mask(tree: PyTree) -> PyTree:
  """Weight decay applies to matrices/tensors only: not to biases, norms, 1-D leaves."""
  flat = _flat(tree)
  return traverse_util.unflatten_dict(
      {k: (np.ndim(v) > 1 and not k.endswith(("/bias", "/scale", "ssf_shift", "ssf_scale"))
           and k != "cls") for k, v in flat.items()}, sep="/")


def make_schedule(lr: float, total_steps: int, warmup_steps: int = 0,
                  kind: str = "cosine", end_factor: float = 0.0) -> optax.Schedule:
  """Linear warm-up then cosine / linear decay to `end_factor * lr`, or a constant."""
  if kind == "constant":
    main = optax.constant_schedule(lr)
  elif kind == "cosine":
    main = optax.cosine_decay_schedule(lr, max(total_steps - warmup_steps, 1), alpha=end_factor)
  elif kind == "linear":
    main = optax.linear_schedule(lr, lr * end_factor, max(total_steps - warmup_steps, 1))
  else:
    raise ValueError(f"schedule={kind!r}; allowed: 'cosine', 'linear', 'constant'.")
  if warmup_steps <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), main],
                              [warmup_steps])


OPTIMIZERS = ("sgd", "adamw", "adam", "lamb")


def make_optimizer(opt: Mapping[str, Any], rules: Sequence[Rule], *, total_steps: int,
                   groups: Mapping[str, Mapping[str, float]] | None = None
                   ) -> optax.GradientTransformation:
  """optax.partition: each trainable group gets the configured optimizer, "frozen" set_to_zero.

  opt: dict(name="sgd"|"adamw"|"adam"|"lamb", lr, weight_decay, momentum=0.9, b1, b2,
    schedule="cosine"|"linear"|"constant", warmup_steps=0, clip_norm=None, clip_value=None).
  rules: the partition rules (`model.partition_rules`).
  groups: per-group multipliers, e.g. {"head": dict(lr_mult=1.0, wd_mult=5.0)}.
  The labels are computed from each tree's paths, so the optimizer applies to the full tree and
  to the trainable subtree alike. Weight decay skips biases, norms and other 1-D leaves.
  """
  opt = dict(opt)
  name = opt.pop("name", "sgd")
  if name not in OPTIMIZERS:
    raise ValueError(f"optimizer.name={name!r}; allowed: {OPTIMIZERS}.")
  if "lr" not in opt:
    raise ValueError("optimizer.lr is required (the peak learning rate of the schedule).")
  lr, wd = float(opt.pop("lr")), float(opt.pop("weight_decay", 0.0))
  warmup = int(opt.pop("warmup_steps", 0))
  kind = opt.pop("schedule", "cosine")
  clip_norm, clip_value = opt.pop("clip_norm", None), opt.pop("clip_value", None)
  momentum = opt.pop("momentum", 0.9)
  b1, b2, eps = opt.pop("b1", 0.9), opt.pop("b2", 0.999), opt.pop("eps", 1e-8)
  nesterov = opt.pop("nesterov", False)
  if opt:
    raise ValueError(f"optimizer: unknown field(s) {sorted(opt)}; allowed: name, lr, "
                     "weight_decay, momentum, nesterov, b1, b2, eps, schedule, warmup_steps, "
                     "clip_norm, clip_value.")
  if name == "adam" and wd:
    raise ValueError(f"optimizer.name='adam' has no weight decay (weight_decay={wd}): use "
                     "name='adamw' or weight_decay=0.")
  # The optimizer may see a subtree: drop the "must match" flags of users' rules here.
  rules = tuple((r[0], r[1]) for r in rules)
  names = {r[1] for r in rules}
  groups = {k: dict(v) for k, v in (groups or {}).items()}
  unknown_groups = set(groups) - names
  if unknown_groups:
    raise ValueError(f"optimizer groups {sorted(unknown_groups)} are no label of this tuning; "
                     f"labels: {sorted(names - {FROZEN})}.")

  def group_tx(label: str) -> optax.GradientTransformation:
    mult = groups.get(label, {})
    bad = set(mult) - {"lr_mult", "wd_mult"}
    if bad:
      raise ValueError(f"optimizer groups[{label!r}]: unknown field(s) {sorted(bad)}; allowed: "
                       "lr_mult, wd_mult.")
    sched = make_schedule(lr * mult.get("lr_mult", 1.0), total_steps, warmup, kind)
    group_wd = wd * mult.get("wd_mult", 1.0)
    if name == "sgd":
      parts = []
      if group_wd:
        parts.append(optax.add_decayed_weights(group_wd, mask=_decay_mask))
      parts.append(optax.sgd(sched, momentum=momentum or None, nesterov=nesterov))
      return optax.chain(*parts)
    if name == "adamw":
      return optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=group_wd, mask=_decay_mask)
    if name == "adam":
      return optax.adam(sched, b1=b1, b2=b2, eps=eps)
    return optax.lamb(sched, b1=b1, b2=b2, eps=eps, weight_decay=group_wd, mask=_decay_mask)

  transforms = {label: group_tx(label) for label in names if label != FROZEN}
  transforms[FROZEN] = optax.set_to_zero()
  tx = optax.partition(transforms, lambda tree: label_params(tree, rules))
  clips = []
  if clip_value is not None:
    clips.append(optax.clip(float(clip_value)))
  if clip_norm is not None:
    clips.append(optax.clip_by_global_norm(float(clip_norm)))
  return optax.chain(*clips, tx) if clips else tx
