"""`train_and_evaluate(config, workdir)`: one training loop for every tuning method.

The flow: build the model from `config.model` + `config.tuning`, load the pretrained backbone,
split the parameters into a trainable and a frozen tree (gradients are taken of the trainable
tree only), build the `optax.partition` optimizer, and run a jitted, donated, data-parallel
train step over a mesh of all devices. The objective of the method (cross-entropy, DA-VPT's
metric losses, distillation) plugs in through `jvt.train.objectives`. Orbax checkpoints hold the
trainable tree, optimizer and method state, the data position and the config; running the same
command again resumes exactly (bit-identical on CPU).

Inside the loop the host reads device values only at log and checkpoint steps (`_fetch`); at
most `_MAX_IN_FLIGHT` steps are queued ahead of the device, which bounds the memory held by
queued batches without a device-to-host transfer.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jvt.train import objectives as objectives_lib
from jvt import partition, precision, scratch
from jvt.train import row_chunks, sharding
from jvt import protocols
from jvt.losses import classification
from jvt.methods.base import Method
from jvt.models import build_model, init_params
from jvt import files
from jvt.files import RunWriteError
from jvt.train.rundir import MetricWriter, RunDirectory, finished_steps

PyTree = Any
log = logging.getLogger("jvt.train")

# Train steps dispatched ahead of the device before the loop waits (no transfer, a readiness
# wait): enough to overlap input with compute, few enough to bound queued batches in memory.
_MAX_IN_FLIGHT = 2


class NonFiniteLossError(FloatingPointError):
  """The training loss (or the gradient / parameter norm) became NaN or inf."""


class RunPreempted(BaseException):
  """SIGTERM or SIGINT stopped the run; `step` is the step checkpointed for the rerun (None
  when it stopped before training started, with nothing written).

  A BaseException, like KeyboardInterrupt: code that carries on after `except Exception`
  (e.g. a sweep with keep_going) must not start the next run in a process asked to stop.
  """

  def __init__(self, message: str, step: int | None):
    super().__init__(message)
    self.step = step


class _StopSignals:
  """Within the block, SIGTERM (what TPU-pod and SLURM preemption send) and SIGINT (Ctrl-C)
  ask the loop to stop at the next step with a checkpoint; a second signal stops at once
  (KeyboardInterrupt). Only installed from the main thread; the previous handlers return
  afterwards.

  Multi-process runs stop together: the processes agree on a request at the next log or
  checkpoint step (one small all-gather), so all of them save the same step.
  """

  def __init__(self):
    self.signum = None
    self._old = {}

  def __enter__(self) -> _StopSignals:
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._old.items():
      signal.signal(sig, handler)

  def _handle(self, signum, frame) -> None:
    del frame
    if self.signum is not None:
      raise KeyboardInterrupt
    self.signum = signum

  @property
  def name(self) -> str:
    return signal.Signals(self.signum).name if self.signum else ""

  def requested(self, sync_point: bool) -> bool:
    """Whether to stop now (with several processes: only at sync points, all together)."""
    if jax.process_count() == 1:
      return self.signum is not None
    if not sync_point:
      return False
    from jax.experimental import multihost_utils
    signums = np.ravel(multihost_utils.process_allgather(np.int32(self.signum or 0)))
    if self.signum is None and signums.any():
      self.signum = int(signums[signums > 0][0])
    return bool(signums.any())


@flax.struct.dataclass
class TrainState:
  """What a train step changes; checkpointed whole (the frozen backbone is not in it)."""
  step: jax.Array  # [] int32, the number of finished steps
  trainable: PyTree
  opt_state: PyTree
  method_state: PyTree  # e.g. DA-VPT's class -> prompt mapping


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
  forward_chunks: int = 1  # sequential row chunks of each forward pass (jvt.train.row_chunks)
  # Whether `frozen`'s kernels are held in the compute dtype (`frozen_for_steps`);
  # `frozen_as_loaded` gives the loaded fp32 values back.
  frozen_cast: bool = False


def _dtype(name: str):
  try:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]
  except KeyError:
    raise ValueError(f"model.dtype={name!r}; allowed: float32, bfloat16, float16.") from None


def model_from_config(config, num_classes: int):
  """The ViT of `config.model` with the tuning of `config.tuning`, and the options its
  `pretrained.path` implies when that file exists (the trainer refuses a missing one first)."""
  overrides = dict(config.model.get("overrides", {}) or {})
  path = config.get("pretrained", {}).get("path") or ""
  return build_model(config.model.variant, num_classes, tuning=config.get("tuning"),
                     checkpoint=path if os.path.isfile(path) else None,
                     dtype=_dtype(config.model.dtype), remat=config.model.remat,
                     drop_path_rate=config.model.get("drop_path_rate", 0.0), **overrides)


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


def _optimizer_dict(config, warmup: int) -> dict:
  """`partition.make_optimizer`'s dict from `config.optimizer` (lr scaled by batch size)."""
  opt = config.optimizer
  lr = float(opt.lr)
  if opt.base_batch_size > 0:
    lr *= config.batch_size / opt.base_batch_size
  out = dict(name=opt.name, lr=lr, weight_decay=float(opt.weight_decay),
             schedule=opt.schedule, warmup_steps=warmup)
  for key, default in (("warmup_init_lr", 0.0), ("min_lr", 0.0), ("decay_cls", False)):
    value = opt.get(key, default)  # configs written before these fields existed lack them
    if value != default:
      out[key] = type(default)(value)
  if opt.name == "sgd":
    out["momentum"] = float(opt.momentum)
  else:
    out.update(b1=float(opt.b1), b2=float(opt.b2))
  if opt.clip_norm > 0:
    out["clip_norm"] = float(opt.clip_norm)
  if opt.clip_value > 0:
    out["clip_value"] = float(opt.clip_value)
  return out


def make_train_step(model, tx, objective, *, accum_steps: int = 1, seed: int = 0,
                    mesh=None, forward_chunks: int = 1):
  """The jitted train step `(state, frozen, constants, batch) -> (state, metrics)`.

  `state` is donated. The step's rng is `fold_in(key(seed), state.step)` (one more fold per
  microbatch), so nothing random is checkpointed and a resumed run draws the same numbers.
  Gradients are taken of `state.trainable` only; with `accum_steps > 1` the batch is cut into
  microbatches whose gradients are averaged before one optimizer update (the same update as
  the whole batch at once for a per-example-mean loss). Metrics: the objective's terms, loss,
  accuracy, grad_norm (before clipping) and param_norm. With a `mesh`, the outputs are
  replicated over it. With `forward_chunks > 1` each (micro)batch's forward runs as that
  many sequential chunks of strided rows (`jvt.train.row_chunks`: the same loss and gradients,
  faster on CPU for frozen backbones); the loss still sees the whole (micro)batch at once.
  Microbatches, like chunks, take strided rows (microbatch i = rows i, i + accum, ...), so each
  is spread over all devices of the "data" axis.
  """
  base_rng = jax.random.key(seed)

  def loss_fn(trainable, frozen, constants, method_state, batch, rng):
    params = partition.merge_params(trainable, frozen)

    def forward(images, rng):
      return model.apply({"params": params}, images, train=True, rngs={"dropout": rng},
                         capture=objective.capture, capture_layers=objective.capture_layers)

    logits, aux = row_chunks.chunked_forward(forward, batch["image"], rng, forward_chunks)
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
      def body(carry, inputs):
        grads_sum, method_state = carry
        i, mb = inputs
        (loss, (metrics, method_state)), g = grad_fn(
            state.trainable, frozen, constants, method_state, mb, jax.random.fold_in(rng, i))
        return (jax.tree.map(jnp.add, grads_sum, g), method_state), (loss, metrics)

      zeros = jax.tree.map(jnp.zeros_like, state.trainable)
      (grads, method_state), (losses, metrics) = jax.lax.scan(
          body, (zeros, state.method_state),
          (jnp.arange(accum_steps), row_chunks.split_rows(batch, accum_steps)))
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

  options = step_compiler_options()
  if mesh is None:
    return jax.jit(step, donate_argnums=(0,), compiler_options=options)
  return jax.jit(step, donate_argnums=(0,), out_shardings=sharding.replicated(mesh),
                 compiler_options=options)


def step_compiler_options() -> dict | None:
  """XLA options of the train step on CPU: keep its optimisation barriers (None elsewhere).

  XLA:CPU expands optimisation barriers before fusion and scheduling. Two things need them:
  jax.checkpoint's remat, whose recomputed forward is otherwise CSE'd into, or scheduled beside,
  the original one so it saves nothing (ViT-S/16 full fine-tuning, batch 8: 1080 MB of XLA
  temporaries with remat or without; kept, 152 MB with remat="full", 324 MB with "dots"), and
  the residual stream's cotangent barriers (`jvt.barrier`), without which each block's
  weight gradients recompute the backward chain of every block above it (full fine-tuning
  6.2 -> 8.7 img/s, docs/performance.md). Other backends keep the barriers already.
  """
  if jax.default_backend() != "cpu":
    return None
  return {"xla_disable_hlo_passes": "cse_barrier_expander"}


def make_eval_step(model):
  """(trainable, frozen, batch) -> (correct [], count []) over the masked-in examples."""

  def step(trainable, frozen, batch):
    params = partition.merge_params(trainable, frozen)
    logits, _ = model.apply({"params": params}, batch["image"], train=False)
    correct = classification.correct_predictions(logits, batch["label"], batch["mask"])
    return jnp.sum(correct), jnp.sum(batch["mask"].astype(jnp.float32))

  return jax.jit(step)


def _check_pretrained_path(path: str) -> None:
  from jvt.checkpoints import hub
  if hub.is_hub_name(path):
    hub.resolve(path)  # downloads into the cache, or says what to download, before the run
  elif path and "://" not in path and not os.path.isfile(path):
    raise FileNotFoundError(f"pretrained.path={path!r}: no such file (looked in "
                            f"{os.path.abspath(path)}). Pass the .npz / .safetensors checkpoint "
                            "with --config.pretrained.path=FILE, or '' for a random backbone.")


def _load_backbone(config, model, key, warn: bool = True) -> PyTree:
  path = config.pretrained.path
  _check_pretrained_path(path)
  params = init_params(model, key, image_size=config.model.image_size)
  if not path:
    if warn:
      log.warning("config.pretrained.path is empty: the backbone is randomly initialised.")
    return jax.device_get(params)
  from jvt.checkpoints import load_pretrained
  return load_pretrained(path, params, model, format=config.pretrained.format or None,
                         posemb_interpolation=config.pretrained.posemb_interpolation or None)


def _check_run_fields(config) -> None:
  """Fields that would otherwise be accepted silently or reported under another name."""
  for name in ("batch_size", "eval_batch_size", "max_to_keep"):
    value = config.get(name)
    if not isinstance(value, int) or value < 1:
      why = (" (the number of newest checkpoints kept; keep_checkpoints=False deletes them "
             "once the run finished)" if name == "max_to_keep" else "")
      raise ValueError(f"{name}={value!r} must be an integer >= 1{why}; pass "
                       f"--config.{name}=N.")


def _check_image_size(config, model) -> None:
  size, patch = int(config.model.image_size), int(model.patch_size)
  if size % patch:
    lower = size // patch * patch
    raise ValueError(
        f"model.image_size={size} is not a multiple of the patch size {patch}: "
        f"{size % patch} pixels would be cropped away. Use --config.model.image_size="
        f"{lower or patch} or {lower + patch}.")


def _check_batch_sizes(config, mesh) -> None:
  sharding.check_batch_size(config.batch_size, mesh)
  try:
    sharding.check_batch_size(config.eval_batch_size, mesh)
  except ValueError as err:
    raise ValueError(f"eval_{err}") from None
  per_device = config.batch_size // mesh.devices.size
  if config.grad_accum_steps < 1 or per_device % int(config.grad_accum_steps):
    raise ValueError(f"grad_accum_steps={config.grad_accum_steps} must be >= 1 and divide the "
                     f"per-device batch {per_device} (batch_size={config.batch_size} over "
                     f"{mesh.devices.size} devices).")
  row_chunks.check_rows(int(config.forward_chunk_rows),
                        per_device // int(config.grad_accum_steps))


def setup(config, *, num_classes: int, steps_per_epoch: int,
          class_examples=None) -> Setup:
  """Builds model, parameters, optimizer, objective, state and jitted steps for a config.

  class_examples: (images per class K) -> (images [N, S, S, 3] float32, labels [N] int32), up
  to K preprocessed training images per class, for objectives that set up from data (DA-VPT's
  class -> prompt mapping; it raises without one). `train_and_evaluate` builds it from
  `config.dataset`; other methods ignore it.
  """
  sharding.use_cpu_devices(config.cpu_devices)
  mesh = sharding.make_mesh()
  _check_batch_sizes(config, mesh)
  model = model_from_config(config, num_classes)
  _check_image_size(config, model)
  emulated = precision.emulated_bf16_message(config.model.dtype, jax.default_backend(),
                                             precision.cpu_flags())
  if emulated:
    log.warning(emulated)
  params = _load_backbone(config, model, jax.random.key(config.seed))
  rules = model.partition_rules
  mask = partition.trainable_mask(params, model)
  trainable, frozen = partition.split_params(params, mask)
  num_trainable = partition.count_params(trainable)
  # Rows of one device's (micro)batch: what each forward of the train step sees, before chunks.
  step_rows = config.batch_size // mesh.devices.size // int(config.grad_accum_steps)
  chunks = row_chunks.num_chunks(
      int(config.forward_chunk_rows), step_rows,
      trainable_share=num_trainable / max(1, num_trainable + partition.count_params(frozen)),
      patches=(int(config.model.image_size) // model.patch_size) ** 2,
      backend=jax.default_backend())
  total_steps, warmup = _durations(config, steps_per_epoch)
  opt = _optimizer_dict(config, warmup)
  tx = partition.make_optimizer(opt, rules, total_steps=total_steps,
                                groups=config.optimizer.groups.to_dict())
  schedule = partition.optimizer_schedule(opt, total_steps)
  objective = objectives_lib.make_objective(model, config)
  replicate = lambda tree: sharding.replicate_tree(tree, mesh)  # noqa: E731
  frozen_steps = frozen_for_steps(model, frozen)
  frozen_r, trainable_r = replicate(frozen_steps), replicate(trainable)
  # Set-up forwards (DA-VPT's class mapping) run as many images at a time as one forward of the
  # train step (a device's microbatch, or its row chunk), so their temporaries stay within the
  # step's: 64-image chunks left ViT-S/16 runs at batch 8 ~130 MB more resident memory for the
  # rest of the run, and whole 32-image batches beside 8-row chunks in bf16 ~150 MB, the XLA
  # threads' glibc heaps grown to fit them (docs/performance.md). The train batch, not the eval
  # batch: a resumed run may change eval_batch_size, not what set-up computes.
  setup_chunk = max(1, step_rows // chunks)
  ctx = objectives_lib.ObjectiveContext(
      model=model, params=params, config=config, num_classes=num_classes,
      class_examples=class_examples,
      apply_fn=functools.partial(objectives_lib.chunked_apply, chunk=setup_chunk))
  method_state = replicate(objective.init_state(ctx))
  constants = replicate(objective.constants(ctx))
  opt_state = jax.jit(tx.init, out_shardings=sharding.replicated(mesh))(trainable_r)
  state = TrainState(step=replicate(np.zeros((), np.int32)), trainable=trainable_r,
                     opt_state=opt_state, method_state=method_state)
  if config.release_setup_caches:
    release_setup_caches()
  # Set-up's large host buffers (DA-VPT's class examples) are freed by now, but jvt.scratch's
  # library, when preloaded, keeps freed buffers of 32 MiB or more for the steps to reuse:
  # sizes the steps never ask for would stay resident for the whole run.
  scratch.release()
  train_step = make_train_step(model, tx, objective, accum_steps=int(config.grad_accum_steps),
                               seed=int(config.seed), mesh=mesh, forward_chunks=chunks)
  return Setup(config=config, model=model, mesh=mesh, tx=tx, rules=rules, frozen=frozen_r,
               state=state, objective=objective, constants=constants, train_step=train_step,
               eval_step=make_eval_step(model), total_steps=total_steps,
               steps_per_epoch=steps_per_epoch, num_classes=num_classes,
               trainable_params=num_trainable, schedule=schedule, forward_chunks=chunks,
               frozen_cast=frozen_steps is not frozen)


def release_setup_caches() -> None:
  """Drops JAX's staging and compilation caches once a run is set up (`jax.clear_caches`).

  Set-up traces and compiles many one-off functions: `init_params`' lazy initialisers (flax's
  partial evaluation caches their jaxprs), the frozen-kernel casts, DA-VPT's mapping forward.
  JAX keeps them for the life of the process though no step calls them again: ViT-S/16 and
  B/16 runs held 80-95 MB more resident memory through training (docs/performance.md). The
  train and eval steps are compiled after this; a caller's own jitted functions compile again
  on their next call (`config.release_setup_caches=False` keeps them).
  """
  jax.clear_caches()


def frozen_for_steps(model, frozen: PyTree) -> PyTree:
  """The frozen tree the train and eval steps take: on CPU in bf16 (the mixed path), its
  kernels cast once to the compute dtype (`precision.cast_frozen_kernels`: the same products,
  without a cast at every use, in half the bytes). Unchanged (the same object) in fp32, off CPU,
  and when a method reads a kernel itself (an `on_kernel` hook, DoRA's fp32 weight norm), whose
  arithmetic would otherwise see rounded weights."""
  if any(type(m).on_kernel is not Method.on_kernel for m in model.methods):
    return frozen
  return precision.cast_frozen_kernels(frozen, model.dtype)


def frozen_as_loaded(s: Setup) -> PyTree:
  """The frozen parameters as loaded (fp32), on the host: `s.frozen` itself, or, where its
  kernels were cast for the steps, the backbone loaded again from `config.pretrained` (the same
  file, or the same seed's initialisation) and split as `setup` split it. For exports, which
  merge into and fingerprint the backbone at its stored precision."""
  if not s.frozen_cast:
    return jax.device_get(s.frozen)
  params = _load_backbone(s.config, s.model, jax.random.key(s.config.seed), warn=False)
  return partition.split_params(params, partition.trainable_mask(params, s.model))[1]


def _fetch(tree: PyTree) -> PyTree:
  """Device -> host copy of a pytree: the loop's only transfer, at log / checkpoint steps."""
  return jax.device_get(tree)


def evaluate(s: Setup, state: TrainState, batches) -> float:
  """Exact top-1 accuracy over every example of `batches` (padded batches are masked)."""
  correct = jnp.zeros(())
  count = jnp.zeros(())
  for batch in batches:
    c, n = s.eval_step(state.trainable, s.frozen, sharding.shard_batch(batch, s.mesh))
    correct, count = correct + c, count + n
  correct, count = (float(x) for x in jax.device_get((correct, count)))
  return correct / count if count else float("nan")


def _check_finite(metrics_host: dict, first_step: int, last_step: int, ckpt_step) -> None:
  """Raises NonFiniteLossError if the loss, gradient norm or parameter norm is NaN / inf."""
  bad = {k: metrics_host[k] for k in ("loss", "grad_norm", "param_norm")
         if k in metrics_host and not np.isfinite(metrics_host[k])}
  if not bad:
    return
  what = ", ".join(f"{k}={v}" for k, v in bad.items())
  where = (f"The last good checkpoint (step {ckpt_step}) is intact and a rerun resumes from it"
           if ckpt_step is not None else "No checkpoint was written before it")
  raise NonFiniteLossError(
      f"Training diverged: the loss or its gradients became NaN or inf between steps "
      f"{first_step} and {last_step} ({what} at step {last_step}). {where}; lower optimizer.lr, "
      "enable gradient clipping "
      "(optimizer.clip_norm) or use float32 compute (model.dtype), then run again (a changed "
      "config needs a new --workdir or --config.overwrite=True).")


def _class_examples_fn(config):
  """(K) -> up to K preprocessed training images per class (deterministic), for objectives."""
  from jvt.data import preprocess as preprocess_mod
  from jvt.data import sources as sources_mod

  def fetch(k: int):
    source = sources_mod.get_source(config.dataset, config.dataset.train_split)
    labels = sources_mod.known_labels(source)
    if labels is None:
      labels = np.asarray([source[i]["label"] for i in range(len(source))])
    fn = preprocess_mod.get_preprocess(config.dataset.preprocess, config.model.image_size,
                                       train=False)
    chosen = np.concatenate([np.flatnonzero(labels == c)[:k] for c in np.unique(labels)])
    rng = np.random.default_rng(0)
    images = np.stack([fn(source[int(i)]["image"], rng) for i in chosen]).astype(np.float32)
    return images, labels[chosen].astype(np.int32)

  return fetch


def _check_label_range(ds, split: str, num_classes: int) -> None:
  """Fails before training when a split holds labels >= the configured num_classes.

  Only needed when `dataset.num_classes` is below the source's own class count (a source's
  labels lie in its own range); uses the labels a source offers without decoding images.
  """
  from jvt.data import sources as sources_mod
  source = sources_mod.get_source(ds, split)
  if not 0 < num_classes < int(source.num_classes):
    return
  labels = sources_mod.known_labels(source)
  if labels is None:
    return  # checked per example while reading
  bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
  if bad.size:
    raise ValueError(
        f"Split {split!r} of {ds.name} has labels outside [0, {num_classes}) (e.g. label "
        f"{int(labels[bad[0]])} of example {int(bad[0])}; {bad.size} examples in all): "
        f"dataset.num_classes={num_classes} is too small for this data, whose source has "
        f"{source.num_classes} classes. Set --config.dataset.num_classes="
        f"{int(labels.max()) + 1} or more (or -1 to use the source's count).")


def _abstract_batch(config, mesh) -> dict:
  s = int(config.model.image_size)
  spec = sharding.batch_sharded(mesh)
  b = int(config.batch_size)
  return {"image": jax.ShapeDtypeStruct((b, s, s, 3), jnp.float32, sharding=spec),
          "label": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=spec)}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
  """Trains and evaluates one run; returns (final TrainState, final metrics dict).

  Every check of the config, the data and the checkpoint runs before the workdir is claimed
  (config.json written), so a bad input changes nothing there (and a workdir it had to create
  is removed again). The workdir is locked for the whole run (`jvt.train.rundir.WorkdirLock`).
  Resumes from the newest checkpoint in `workdir` that restores (damaged newer ones are moved
  to `checkpoints_damaged/`) when the config matches the one stored there; refuses a workdir
  holding a run of a different config unless `config.overwrite`.

  SIGTERM / SIGINT stop the run at the next step with a checkpoint there and raise
  `RunPreempted`; a failed write (disk full, permission) raises `RunWriteError` naming the
  file, the cause and the intact checkpoint to resume from.
  """
  sharding.use_cpu_devices(config.cpu_devices)  # before anything starts JAX's backend
  protocols.check_selection(config.protocol, config.dataset.val_split,
                            config.dataset.test_split)
  _check_run_fields(config)
  _check_pretrained_path(config.pretrained.path)
  with _StopSignals() as stop, RunDirectory(workdir, config) as run_dir:
    try:
      return _train_and_evaluate(config, run_dir, stop)
    except RunWriteError as err:
      raise _with_resume_hint(err, run_dir) from None


def _train_and_evaluate(config, run_dir: RunDirectory, stop: _StopSignals):
  """`train_and_evaluate` in a locked workdir."""
  from jvt.data import pipeline
  ds = config.dataset
  pi, pc = jax.process_index(), jax.process_count()
  num_classes = None if ds.num_classes <= 0 else int(ds.num_classes)
  splits = [("train", ds.train_split)] + [(n, sp) for n, sp in (("val", ds.val_split),
                                                                 ("test", ds.test_split)) if sp]
  if num_classes is not None:
    for _, split in splits:
      _check_label_range(ds, split, num_classes)
  loader = pipeline.make_train_loader(
      ds, ds.train_split, global_batch_size=config.batch_size,
      image_size=config.model.image_size, preprocess=ds.preprocess, seed=config.seed,
      process_index=pi, process_count=pc, sampler=ds.sampler,
      images_per_class=ds.images_per_class, num_classes=num_classes)
  ckpt = None
  failed = True
  try:
    num_classes = loader.num_classes
    s = setup(config, num_classes=num_classes, steps_per_epoch=loader.steps_per_epoch,
              class_examples=_class_examples_fn(config))
    eval_sets = {name: pipeline.make_eval_batches(
        ds, split, global_batch_size=config.eval_batch_size,
        image_size=config.model.image_size, preprocess=ds.preprocess, process_index=pi,
        process_count=pc, num_classes=num_classes) for name, split in splits[1:]}
    # Trace now: an error in the objective or model surfaces before the workdir is claimed.
    s.train_step.trace(s.state, s.frozen, s.constants, _abstract_batch(config, s.mesh))
    if stop.requested(sync_point=True):
      raise RunPreempted(f"stopped by {stop.name} before training started; nothing was "
                         "written. Run the same command again to start.", None)
    run_dir.start()
    if pi == 0:
      for name, record in s.objective.records().items():
        files.atomic_write_text(os.path.join(run_dir.path, name), json.dumps(record, indent=1))
    from jvt.train.checkpointing import RunCheckpointer
    ckpt = RunCheckpointer(run_dir.checkpoint_dir, max_to_keep=config.max_to_keep)
    state, history, start = s.state, [], None
    restored = ckpt.restore_newest(
        check=_check_ckpt_meta, damaged_dir=run_dir.damaged_dir,
        restore_fn=lambda step: _restore(ckpt, step, s.state, s.objective))
    if restored is not None:
      start, state, meta = restored
      loader.set_state(meta["data"])
      history = meta.get("history", [])
      log.info("Resumed from step %d in %s", start, run_dir.path)
    writer = MetricWriter(run_dir.path, enabled=pi == 0, resume_step=start or 0)
    writer.write_header(trainable_params=s.trainable_params, summary=partition.summary(
        partition.merge_params(jax.device_get(state.trainable), jax.device_get(s.frozen)),
        s.model))
    try:
      state, history = _loop(s, state, loader, eval_sets, ckpt, writer, history,
                             int(start or 0), stop)
      ckpt.wait_until_finished()
    finally:
      writer.close()
    failed = False
  finally:
    loader.close()
    if ckpt is not None:
      try:
        ckpt.close()
      except RunWriteError:
        if not failed:
          raise  # otherwise the error in flight is the one to report
  selection = protocols.check_selection(config.protocol, config.dataset.val_split,
                                        config.dataset.test_split)
  final = protocols.final_metrics(history, selection)
  final.update(protocol=selection, trainable_params=s.trainable_params,
               total_steps=s.total_steps, methods=list(_methods(config)),
               num_classes=num_classes)
  if pi == 0:
    run_dir.write_final(final, history)
    run_dir.export(s.model, jax.device_get(state.trainable), frozen_as_loaded(s))
    if config.write_plots:
      run_dir.plot_curves()
    if not config.keep_checkpoints:
      shutil.rmtree(run_dir.checkpoint_dir, ignore_errors=True)
  return state, final


def _check_ckpt_meta(meta) -> None:
  """A restored checkpoint's metadata must hold the data position (else it is damaged)."""
  if not isinstance(meta, dict) or not isinstance(meta.get("data"), dict):
    raise ValueError("its metadata has no data-loader position")


def _with_resume_hint(err: RunWriteError, run_dir: RunDirectory) -> RunWriteError:
  """`err` with the newest intact checkpoint, from which a rerun resumes."""
  steps = finished_steps(run_dir.checkpoint_dir)
  where = (f"The newest intact checkpoint is {os.path.join(run_dir.checkpoint_dir, str(steps[-1]))}"
           "; once that is fixed, run the same command again to resume from it."
           if steps else "No checkpoint was written yet; run again once that is fixed.")
  text = str(err).rstrip(".")
  return RunWriteError(f"{text}. {where}", err.errno)


def _restore(ckpt, step: int, state: TrainState, objective):
  """Restores `step` into `state`'s layout, or into the method-state layout of runs saved
  before loss-term states were kept under their method's name."""
  try:
    return ckpt.restore(step, target=state)
  except ValueError:
    legacy = objective.legacy_state(state.method_state)
    if legacy is None:
      raise
  restored, meta = ckpt.restore(step, target=state.replace(method_state=legacy))
  return restored.replace(method_state=objective.from_legacy_state(restored.method_state)), meta


def _loop(s: Setup, state, loader, eval_sets, ckpt, writer, history, step, stop=None):
  """Steps `step` .. total_steps, evaluations, checkpoints; returns (state, history).

  With `stop` (a `_StopSignals`), a SIGTERM / SIGINT checkpoints the step reached and raises
  RunPreempted.
  """
  config = s.config
  log_every = max(int(config.log_every_steps), 1)
  ckpt_every = max(int(config.checkpoint_every_steps), 1)
  eval_every = (int(round(config.eval_every_epochs * s.steps_per_epoch))
                if config.eval_every_epochs > 0 else 0)
  last_ckpt = step if step > 0 else None
  progress = writer.progress(s.total_steps, initial=step, enabled=config.progress_bar)
  t_window, wait_window, steps_window, unchecked_from = time.perf_counter(), 0.0, 0, step + 1
  in_flight = collections.deque()  # the losses of queued steps
  metrics = None
  try:
    while step < s.total_steps:
      # Input wait counts only while the device has nothing queued (it is then idle).
      device_idle = metrics is None or metrics["loss"].is_ready()
      t0 = time.perf_counter()
      batch = sharding.shard_batch(next(loader), s.mesh)
      if device_idle:
        wait_window += time.perf_counter() - t0
      state, metrics = s.train_step(state, s.frozen, s.constants, batch)
      in_flight.append(metrics["loss"])
      if len(in_flight) > _MAX_IN_FLIGHT:
        in_flight.popleft().block_until_ready()
      step += 1
      steps_window += 1
      if step % s.steps_per_epoch == 0:
        epoch = step // s.steps_per_epoch
        state = state.replace(method_state=sharding.replicate_tree(
            s.objective.end_of_epoch(jax.device_get(state.method_state), epoch), s.mesh))
      is_log = step % log_every == 0 or step == s.total_steps
      is_ckpt = step % ckpt_every == 0 and step < s.total_steps
      if is_log or is_ckpt:
        host = {k: float(v) for k, v in _fetch(metrics).items()}
        _check_finite(host, unchecked_from, step, last_ckpt)
        unchecked_from = step + 1
        if is_log:
          dt = max(time.perf_counter() - t_window, 1e-9)
          host.update(lr=float(jax.device_get(s.schedule(step - 1))),
                      img_per_s=steps_window * config.batch_size / dt,
                      input_wait_frac=wait_window / dt)
          error = None
          try:  # a failed background save, or this write, stops the run here
            ckpt.check_for_errors()
            writer.write_scalars(step, {f"train/{k}": v for k, v in host.items()})
          except RunWriteError as err:
            error = err
          _raise_on_every_process(error)
          progress.update_metrics(host)
          t_window, wait_window, steps_window = time.perf_counter(), 0.0, 0
      if eval_every and step % eval_every == 0 and step < s.total_steps:
        history.append(_eval_all(s, state, eval_sets, step, writer))
      if is_ckpt:
        ckpt.save(step, state, _ckpt_meta(config, loader, history))
        last_ckpt = step
      progress.advance(step)
      if (stop is not None and step < s.total_steps
          and stop.requested(sync_point=is_log or is_ckpt)):
        _stop_with_checkpoint(s, state, metrics, loader, ckpt, history, step, last_ckpt,
                              unchecked_from, stop)
    if not history or history[-1]["step"] != step:
      history.append(_eval_all(s, state, eval_sets, step, writer))
    if ckpt.latest_step() != step:
      ckpt.save(step, state, _ckpt_meta(config, loader, history))
  finally:
    progress.close()
  return state, history


def _raise_on_every_process(error: RunWriteError | None) -> None:
  """Raises `error`; with several processes, every process raises when one failed (process 0
  alone writes the logs), so none waits forever in the next collective."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    failed = np.ravel(multihost_utils.process_allgather(np.int32(error is not None)))
    if error is None and failed.any():
      raise RunWriteError(f"process {int(np.argmax(failed))} could not write the run's files "
                          "(its message names the file and the cause).")
  if error is not None:
    raise error


def _stop_with_checkpoint(s: Setup, state, metrics, loader, ckpt, history, step, last_ckpt,
                          unchecked_from, stop) -> None:
  """Checkpoints `step` (if not saved already; finite values only), waits for it to be on
  disk and raises RunPreempted saying where to resume."""
  if last_ckpt != step:
    if unchecked_from <= step:
      _check_finite({k: float(v) for k, v in _fetch(metrics).items()}, unchecked_from, step,
                    last_ckpt)
    ckpt.save(step, state, _ckpt_meta(s.config, loader, history))
  ckpt.wait_until_finished()
  raise RunPreempted(
      f"stopped by {stop.name} at step {step} of {s.total_steps}; checkpoint saved in "
      f"{os.path.join(ckpt.directory, str(step))}. Run the same command again to resume.",
      step)


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
