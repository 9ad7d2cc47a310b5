"""`train_and_evaluate(config, workdir)`: one training loop for every tuning method.

The flow: build the model from `config.model` + `config.tuning`, load the pretrained backbone,
split the parameters into a trainable and a frozen tree (gradients are taken of the trainable
tree only), build the `optax.partition` optimizer, and run a jitted, donated, data-parallel
train step over a mesh of all devices. The objective of the method (cross-entropy, DA-VPT's
metric losses, distillation) plugs in through `jvt.objectives`. Orbax checkpoints hold the
trainable tree, optimizer and method state, the data position and the config; running the same
command again resumes exactly.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jvt import objectives as objectives_lib
from jvt import partition, sharding
from jvt.config_lib import PROTOCOLS
from jvt.losses import classification
from jvt.models import build_model, init_params
from jvt.run_io import MetricWriter, RunDirectory

PyTree = Any
log = logging.getLogger("jvt.train")


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or inf."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  trainable: PyTree
  opt_state: PyTree
  method_state: PyTree


@dataclasses.dataclass
class Setup:
  """Everything built from the config before the loop (also used by the benchmark)."""
  config: ml_collections.ConfigDict
  model: Any
  mesh: Any
  tx: Any
  rules: tuple
  frozen: PyTree
  state: TrainState
  objective: Any
  constants: PyTree
  train_step: Any
  eval_step: Any
  total_steps: int
  steps_per_epoch: int
  num_classes: int
  trainable_params: int
  schedule: Any


def _dtype(name: str):
  try:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]
  except KeyError:
    raise ValueError(f"model.dtype={name!r}; allowed: float32, bfloat16, float16.") from None


def model_from_config(config, num_classes: int):
  """The ViT of `config.model` with the tuning of `config.tuning`."""
  overrides = dict(config.model.get("overrides", {}) or {})
  return build_model(config.model.variant, num_classes, tuning=config.get("tuning"),
                     dtype=_dtype(config.model.dtype), remat=config.model.remat, **overrides)


def _durations(config, steps_per_epoch: int) -> tuple[int, int]:
  """(total_steps, warmup_steps) from steps or epochs."""
  if config.total_steps > 0:
    total = int(config.total_steps)
  elif config.total_epochs > 0:
    total = int(math.ceil(config.total_epochs * steps_per_epoch))
  else:
    raise ValueError("Set config.total_steps or config.total_epochs to a positive value.")
  opt = config.optimizer
  warmup = int(opt.warmup_steps) if opt.warmup_steps >= 0 else int(
      round(opt.warmup_epochs * steps_per_epoch))
  return total, min(warmup, total)


def _optimizer_dict(config, total_steps: int, warmup: int) -> dict:
  opt = config.optimizer
  lr = float(opt.lr)
  if opt.base_batch_size > 0:
    lr *= config.batch_size / opt.base_batch_size
  out = dict(name=opt.name, lr=lr, weight_decay=float(opt.weight_decay),
             schedule=opt.schedule, warmup_steps=warmup)
  if opt.name == "sgd":
    out["momentum"] = float(opt.momentum)
  else:
    out.update(b1=float(opt.b1), b2=float(opt.b2))
  if opt.clip_norm > 0:
    out["clip_norm"] = float(opt.clip_norm)
  if opt.clip_value > 0:
    out["clip_value"] = float(opt.clip_value)
  del total_steps
  return out


def make_train_step(model, tx, objective, frozen_sharding, accum_steps: int, seed: int):
  """The jitted, donated train step: (state, frozen, constants, batch) -> (state, metrics)."""
  base_rng = jax.random.key(seed)

  def loss_fn(trainable, frozen, constants, method_state, batch, rng):
    params = partition.merge_params(trainable, frozen)
    logits, aux = model.apply({"params": params}, batch["image"], train=True,
                              rngs={"dropout": rng}, capture=objective.capture,
                              capture_layers=objective.capture_layers)
    loss, metrics, method_state = objective.loss(logits, aux, batch, method_state, constants)
    metrics = dict(metrics)
    metrics["accuracy"] = classification.accuracy(logits, batch["label"])
    return loss, (metrics, method_state)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state: TrainState, frozen, constants, batch):
    rng = jax.random.fold_in(base_rng, state.step)
    if accum_steps == 1:
      (loss, (metrics, method_state)), grads = grad_fn(
          state.trainable, frozen, constants, state.method_state, batch, rng)
    else:
      micro = jax.tree.map(
          lambda x: x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:]), batch)

      def body(carry, inputs):
        grads_acc, method_state = carry
        i, mb = inputs
        (loss, (metrics, method_state)), g = grad_fn(
            state.trainable, frozen, constants, method_state, mb, jax.random.fold_in(rng, i))
        grads_acc = jax.tree.map(jnp.add, grads_acc, g)
        return (grads_acc, method_state), (loss, metrics)

      zeros = jax.tree.map(jnp.zeros_like, state.trainable)
      (grads, method_state), (losses, metrics) = jax.lax.scan(
          body, (zeros, state.method_state), (jnp.arange(accum_steps), micro))
      grads = jax.tree.map(lambda g: g / accum_steps, grads)
      loss = jnp.mean(losses)
      metrics = jax.tree.map(jnp.mean, metrics)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), state.trainable, updates)
    metrics = dict(metrics, loss=loss, grad_norm=objectives_lib.global_norm(grads),
                   param_norm=objectives_lib.global_norm(trainable))
    new_state = TrainState(step=state.step + 1, trainable=trainable, opt_state=opt_state,
                           method_state=method_state)
    return new_state, metrics

  del frozen_sharding
  return jax.jit(step, donate_argnums=(0,))


def make_eval_step(model):
  """(trainable, frozen, batch) -> (correct [], count []) over the masked-in examples."""

  def step(trainable, frozen, batch):
    params = partition.merge_params(trainable, frozen)
    logits, _ = model.apply({"params": params}, batch["image"], train=False)
    correct = classification.correct_predictions(logits, batch["label"], batch["mask"])
    return jnp.sum(correct), jnp.sum(batch["mask"].astype(jnp.float32))

  return jax.jit(step)


def _load_backbone(config, model, key) -> PyTree:
  params = init_params(model, key, image_size=config.model.image_size)
  path = config.pretrained.path
  if not path:
    log.warning("config.pretrained.path is empty: the backbone is randomly initialised.")
    return jax.device_get(params)
  from jvt.checkpoints import load_pretrained
  return load_pretrained(path, params, model, format=config.pretrained.format or None,
                         posemb_interpolation=config.pretrained.posemb_interpolation)


def _data(config):
  from jvt.data import pipeline, sources
  return pipeline, sources


def setup(config, *, num_classes: int, steps_per_epoch: int,
          class_examples=None, workdir: str = "") -> Setup:
  """Builds model, parameters, optimizer, objective, state and jitted steps for a config."""
  mesh = sharding.make_mesh()
  sharding.check_batch_size(config.batch_size, mesh)
  if config.grad_accum_steps < 1 or (config.batch_size // mesh.devices.size) % int(
      config.grad_accum_steps):
    raise ValueError(f"grad_accum_steps={config.grad_accum_steps} must be >= 1 and divide the "
                     f"per-device batch {config.batch_size // mesh.devices.size}.")
  model = model_from_config(config, num_classes)
  params = _load_backbone(config, model, jax.random.key(config.seed))
  rules = model.partition_rules
  mask = partition.trainable_mask(params, model)
  trainable, frozen = partition.split_params(params, mask)
  total_steps, warmup = _durations(config, steps_per_epoch)
  opt = _optimizer_dict(config, total_steps, warmup)
  tx = partition.make_optimizer(opt, rules, total_steps=total_steps,
                                groups=config.optimizer.groups.to_dict())
  schedule = partition.make_schedule(opt["lr"], total_steps, warmup, opt["schedule"])
  objective = objectives_lib.make_objective(model, config)
  replicate = functools.partial(sharding.replicate_tree, mesh=mesh)
  frozen_r, trainable_r = replicate(frozen), replicate(trainable)
  apply_fn = _chunked_apply(model, mesh)
  ctx = objectives_lib.ObjectiveContext(
      model=model, params=params, config=config, num_classes=num_classes,
      class_examples=class_examples, apply_fn=apply_fn, workdir=workdir)
  method_state = replicate(objective.init_state(ctx))
  constants = replicate(objective.constants(ctx))
  opt_state = jax.jit(tx.init, out_shardings=sharding.replicated(mesh))(trainable_r)
  state = TrainState(step=replicate(np.zeros((), np.int32)), trainable=trainable_r,
                     opt_state=opt_state, method_state=method_state)
  train_step = make_train_step(model, tx, objective, None, int(config.grad_accum_steps),
                               int(config.seed))
  return Setup(config=config, model=model, mesh=mesh, tx=tx, rules=rules, frozen=frozen_r,
               state=state, objective=objective, constants=constants, train_step=train_step,
               eval_step=make_eval_step(model), total_steps=total_steps,
               steps_per_epoch=steps_per_epoch, num_classes=num_classes,
               trainable_params=partition.count_params(trainable), schedule=schedule)


def _chunked_apply(model, mesh, chunk: int = 64):
  """A forward over a large host batch in fixed-size chunks (for objective set-up)."""
  fwd = jax.jit(lambda params, images: model.apply({"params": params}, images, train=False))

  def apply(params, images):
    outs = []
    for i in range(0, len(images), chunk):
      part = np.asarray(images[i:i + chunk])
      pad = chunk - len(part)
      if pad:
        part = np.concatenate([part, np.zeros((pad, *part.shape[1:]), part.dtype)])
      logits, aux = fwd(params, part)
      outs.append(jax.tree.map(lambda x: np.asarray(x)[:chunk - pad] if np.ndim(x) and
                               np.shape(x)[0] == chunk else np.asarray(x), (logits, aux)))
    return jax.tree.map(lambda *xs: np.concatenate(xs) if np.ndim(xs[0]) else xs[0], *outs)

  del mesh
  return apply


def evaluate(s: Setup, state: TrainState, batches) -> float:
  """Exact top-1 accuracy over every example of `batches` (padded batches are masked)."""
  correct = jnp.zeros(())
  count = jnp.zeros(())
  for batch in batches:
    c, n = s.eval_step(state.trainable, s.frozen, sharding.shard_batch(batch, s.mesh))
    correct, count = correct + c, count + n
  count = float(count)
  return float(correct) / count if count else float("nan")


def _check_finite(metrics_host: dict, first_step: int, last_step: int, ckpt_step) -> None:
  loss = metrics_host.get("loss")
  if loss is not None and not np.isfinite(loss):
    raise NonFiniteLossError(
        f"The training loss became {loss} between steps {first_step} and {last_step}. "
        f"The last good checkpoint (step {ckpt_step}) is intact; lower the learning rate, enable "
        "gradient clipping (optimizer.clip_norm) or use float32 compute, then run again.")


def _class_examples_fn(config, pipeline_mod, sources_mod):
  """(K) -> up to K preprocessed training images per class (deterministic), for objectives."""
  from jvt.data import preprocess as preprocess_mod

  def fetch(k: int):
    source = sources_mod.get_source(config.dataset, config.dataset.train_split)
    labels = np.asarray(source.labels()) if hasattr(source, "labels") else np.asarray(
        [source[i]["label"] for i in range(len(source))])
    fn = preprocess_mod.get_preprocess(config.dataset.preprocess, config.model.image_size,
                                       train=False)
    chosen = np.concatenate([np.flatnonzero(labels == c)[:k] for c in np.unique(labels)])
    rng = np.random.default_rng(0)
    images = np.stack([fn(source[int(i)]["image"], rng) for i in chosen]).astype(np.float32)
    return images, labels[chosen].astype(np.int32)

  del pipeline_mod
  return fetch


def _history_choice(history: list[dict], protocol: str) -> dict:
  """Final metrics from the eval history under the protocol."""
  if not history:
    return {}
  last = history[-1]
  out = {"val_accuracy": last.get("val_accuracy"), "test_accuracy": last.get("test_accuracy"),
         "epoch": last.get("epoch"), "step": last.get("step")}
  if protocol == "best_val":
    with_val = [h for h in history if h.get("val_accuracy") is not None]
    if not with_val:
      raise ValueError("protocol='best_val' needs dataset.val_split.")
    best = max(with_val, key=lambda h: h["val_accuracy"])
    out = {"val_accuracy": best["val_accuracy"], "test_accuracy": best.get("test_accuracy"),
           "epoch": best.get("epoch"), "step": best.get("step")}
  elif protocol == "legacy_max_test":
    with_test = [h for h in history if h.get("test_accuracy") is not None]
    best = max(with_test, key=lambda h: h["test_accuracy"])
    out = {"val_accuracy": best.get("val_accuracy"), "test_accuracy": best["test_accuracy"],
           "epoch": best.get("epoch"), "step": best.get("step"),
           "note": "legacy (max test accuracy over epochs)"}
  return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
  """Trains and evaluates one run; returns (final TrainState, final metrics dict).

  Resumes from the newest checkpoint in `workdir` when the config matches the one stored
  there; refuses a workdir holding a different config unless `config.overwrite`.
  """
  if config.protocol not in PROTOCOLS:
    raise ValueError(f"protocol={config.protocol!r}; allowed: {PROTOCOLS}.")
  run_dir = RunDirectory(workdir, config)
  pipeline, sources_mod = _data(config)
  ds = config.dataset
  pi, pc = jax.process_index(), jax.process_count()
  num_classes = None if ds.num_classes <= 0 else int(ds.num_classes)
  loader = pipeline.make_train_loader(
      ds, ds.train_split, global_batch_size=config.batch_size,
      image_size=config.model.image_size, preprocess=ds.preprocess, seed=config.seed,
      process_index=pi, process_count=pc, sampler=ds.sampler,
      images_per_class=ds.images_per_class, num_classes=num_classes)
  num_classes = loader.num_classes
  s = setup(config, num_classes=num_classes, steps_per_epoch=loader.steps_per_epoch,
            class_examples=_class_examples_fn(config, pipeline, sources_mod),
            workdir=run_dir.path)
  eval_sets = {}
  for name, split in (("val", ds.val_split), ("test", ds.test_split)):
    if split:
      eval_sets[name] = pipeline.make_eval_batches(
          ds, split, global_batch_size=config.eval_batch_size,
          image_size=config.model.image_size, preprocess=ds.preprocess, process_index=pi,
          process_count=pc, num_classes=num_classes)
  from jvt.checkpoints.runs import RunCheckpointer
  run_dir.start()
  ckpt = RunCheckpointer(os.path.join(run_dir.path, "checkpoints"),
                         max_to_keep=config.max_to_keep)
  history: list[dict] = []
  state = s.state
  start = ckpt.latest_step()
  if start is not None:
    state, meta = ckpt.restore(start, target=state)
    loader.set_state(meta["data"])
    history = meta.get("history", [])
    log.info("Resumed from step %d in %s", start, run_dir.path)
  writer = MetricWriter(run_dir.path, enabled=pi == 0)
  writer.write_header(config=config, trainable_params=s.trainable_params,
                      summary=partition.summary(
                          partition.merge_params(jax.device_get(state.trainable),
                                                 jax.device_get(s.frozen)), s.model))
  step = int(start or 0)
  last_ckpt = start
  log_every = max(int(config.log_every_steps), 1)
  ckpt_every = max(int(config.checkpoint_every_steps), 1)
  eval_every = (int(round(config.eval_every_epochs * s.steps_per_epoch))
                if config.eval_every_epochs > 0 else 0)
  progress = writer.progress(s.total_steps, initial=step, enabled=config.progress_bar)
  t_window, wait_window, steps_window, first_in_window = time.perf_counter(), 0.0, 0, step + 1
  metrics = None
  try:
    while step < s.total_steps:
      t0 = time.perf_counter()
      batch = next(loader)
      wait_window += time.perf_counter() - t0
      state, metrics = s.train_step(state, s.frozen, s.constants,
                                    sharding.shard_batch(batch, s.mesh))
      step += 1
      steps_window += 1
      epoch_done = step % s.steps_per_epoch == 0
      if epoch_done:
        epoch = step // s.steps_per_epoch
        state = state.replace(method_state=sharding.replicate_tree(
            s.objective.end_of_epoch(jax.device_get(state.method_state), epoch), s.mesh))
      if step % log_every == 0 or step == s.total_steps or step % ckpt_every == 0:
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        _check_finite(host, first_in_window, step, last_ckpt)
        if step % log_every == 0 or step == s.total_steps:
          dt = time.perf_counter() - t_window
          host.update(lr=float(s.schedule(step - 1)),
                      img_per_s=steps_window * config.batch_size / max(dt, 1e-9),
                      input_wait_frac=wait_window / max(dt, 1e-9))
          writer.write_scalars(step, {f"train/{k}": v for k, v in host.items()})
          progress.update_metrics(host)
          t_window, wait_window, steps_window = time.perf_counter(), 0.0, 0
          first_in_window = step + 1
      if eval_every and step % eval_every == 0 and step < s.total_steps:
        history.append(_eval_all(s, state, eval_sets, step, writer))
      if step % ckpt_every == 0 and step < s.total_steps:
        ckpt.save(step, state, _ckpt_meta(config, loader, history))
        last_ckpt = step
      progress.advance(step)
    if not history or history[-1]["step"] != step:
      history.append(_eval_all(s, state, eval_sets, step, writer))
    ckpt.save(step, state, _ckpt_meta(config, loader, history))
    ckpt.wait_until_finished()
  finally:
    progress.close()
    loader.close()
    ckpt.close()
  final = _history_choice(history, config.protocol)
  final.update(protocol=config.protocol, trainable_params=s.trainable_params,
               total_steps=s.total_steps, methods=list(_methods(config)),
               num_classes=num_classes)
  if pi == 0:
    run_dir.write_final(final, history)
    run_dir.export(s.model, jax.device_get(state.trainable), jax.device_get(s.frozen))
    if config.write_plots:
      run_dir.plot_curves()
  writer.close()
  return state, final


def _methods(config):
  tuning = config.get("tuning")
  if tuning is None:
    return ("linear",)
  items = tuning if isinstance(tuning, (list, tuple)) else [tuning]
  return tuple(dict(t)["method"] for t in items)


def _eval_all(s: Setup, state, eval_sets, step, writer) -> dict:
  row = {"step": step, "epoch": step / s.steps_per_epoch}
  for name, batches in eval_sets.items():
    row[f"{name}_accuracy"] = evaluate(s, state, batches)
  writer.write_scalars(step, {f"{k.split('_')[0]}/accuracy": v for k, v in row.items()
                              if k.endswith("_accuracy")})
  return row


def _ckpt_meta(config, loader, history) -> dict:
  return {"config": config.to_json(), "data": loader.get_state(), "history": history}
