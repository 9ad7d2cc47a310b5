"""Tests of jvt.distill: the distillation objective, teacher loading, the frozen teacher inside
the jitted step (bitwise and by compiled FLOPs), a learning test and bad-input messages.

References are independent: the KD loss and its gradient in numpy, teacher and student
forwards through conftest's float64 numpy ViT.
"""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import IMAGE, NUM_CLASSES, NumpyViT, flat, images, small_model, small_params, unflat
from helpers_train import train_data_dir  # noqa: F401  (session fixture)

import jvt
from jvt import distill, partition
from jvt.train import objectives, sharding
from jvt import train as train_lib
from jvt.checkpoints import save_npz
from jvt.config_lib import base_config

STUDENT = dict(hidden_size=16, mlp_dim=32, num_heads=2, num_layers=2, patch_size=8)
TEACHER = dict(hidden_size=32, mlp_dim=64, num_heads=4, num_layers=3, patch_size=8)


@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory):
  """Teacher checkpoints: a 5-class one (the student's classes) and a 7-class one."""
  root = tmp_path_factory.mktemp("teachers")
  out = {}
  for classes in (NUM_CLASSES, 7):
    model = jvt.build_model("B/16", classes, **TEACHER)
    params = small_params(model, seed=3)
    out[classes] = (str(root / f"teacher_{classes}.npz"), params)
    save_npz(out[classes][0], params, model=model)
  return out


def _load(path):
  cfg = ml_collections.ConfigDict(dict(path=path, variant="B/16", overrides=TEACHER))
  return distill.load_teacher(cfg, image_size=IMAGE, default_variant="B/16",
                              default_num_classes=NUM_CLASSES)


@pytest.fixture(scope="module")
def teacher(teacher_files):
  """The 5-class teacher, loaded once through the `path` source."""
  return _load(teacher_files[NUM_CLASSES][0])


def config(teacher_path="", tuning=None, **fields):
  c = base_config()
  c.model.variant = "B/16"
  c.model.image_size = IMAGE
  c.model.overrides = STUDENT
  c.tuning = tuning
  c.distill.enabled = True
  c.distill.teacher.path = teacher_path
  c.distill.teacher.variant = "B/16"
  c.distill.teacher.overrides = TEACHER
  for key, value in fields.items():
    c.distill[key] = value
  return c


def objective(teacher, tuning=None, label_smoothing=0.0, **fields):
  model = small_model(tuning, **STUDENT)
  return model, distill.DistillationObjective(model, config(tuning=tuning, **fields),
                                              label_smoothing=label_smoothing, teacher=teacher)


# ------------------------------------------------------------------------------ numpy reference
def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_kd(s, t, y, w, temp, eps=0.0):
  """((1 - w) CE_eps + w T^2 KL, d/ds) for logits s, t [B, C] in float64."""
  s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
  b, c = s.shape
  q = (1 - eps) * np.eye(c)[y] + eps / c
  ce = -(q * _log_softmax(s)).sum(-1).mean()
  log_pt, log_ps = _log_softmax(t / temp), _log_softmax(s / temp)
  kl = (np.exp(log_pt) * (log_pt - log_ps)).sum(-1).mean()
  grad = ((1 - w) * (np.exp(_log_softmax(s)) - q)
          + w * temp * (np.exp(log_ps) - np.exp(log_pt))) / b
  return (1 - w) * ce + w * temp**2 * kl, grad


# ------------------------------------------------------------------------------------ the loss
@pytest.mark.parametrize("w,temp,eps", [(0.7, 3.0, 0.0), (0.3, 1.0, 0.0), (0.5, 2.0, 0.1),
                                        (1.0, 4.0, 0.0)])
def test_logit_loss_and_gradient_match_numpy(teacher, w, temp, eps):
  _, obj = objective(teacher, label_smoothing=eps, weight=w, temperature=temp)
  x = images(4)
  y = np.array([0, 3, 1, 4])
  s = np.random.default_rng(0).normal(size=(4, NUM_CLASSES)).astype(np.float32) * 2
  t = NumpyViT(flat(teacher.params))(x)[0]  # the teacher, independently
  consts = {"teacher": teacher.params}
  batch = {"image": jnp.asarray(x), "label": jnp.asarray(y)}

  def loss(logits):
    return obj.loss(logits, {}, batch, consts)[0]

  value, grad = jax.jit(jax.value_and_grad(loss))(jnp.asarray(s))
  want, want_grad = np_kd(s, t, y, w, temp, eps)
  np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6)
  _, metrics = jax.jit(obj.loss)(jnp.asarray(s), {}, batch, consts)
  np.testing.assert_allclose(metrics["teacher_accuracy"], np.mean(t.argmax(-1) == y))


def test_limits_weight_to_zero_is_cross_entropy_and_temperature_one(teacher):
  x, y = images(3), np.array([1, 2, 0])
  s = np.random.default_rng(1).normal(size=(3, NUM_CLASSES)).astype(np.float32)
  t = NumpyViT(flat(teacher.params))(x)[0]
  batch = {"image": jnp.asarray(x), "label": jnp.asarray(y)}
  consts = {"teacher": teacher.params}
  ce = -_log_softmax(s.astype(np.float64))[np.arange(3), y].mean()
  ce_grad = (np.exp(_log_softmax(s.astype(np.float64))) - np.eye(NUM_CLASSES)[y]) / 3
  _, tiny_w = objective(teacher, weight=1e-9, temperature=5.0)
  value, grad = jax.jit(jax.value_and_grad(lambda z: tiny_w.loss(z, {}, batch, consts)[0]))(s)
  np.testing.assert_allclose(value, ce, rtol=1e-6)
  np.testing.assert_allclose(grad, ce_grad, rtol=1e-5, atol=1e-7)
  # T -> 1: the loss is continuous at T = 1, where it is (1 - w) CE + w KL(p_t || p_s).
  kl = (np.exp(_log_softmax(t)) * (_log_softmax(t) - _log_softmax(s.astype(np.float64)))).sum(
      -1).mean()
  for temp in (1.0, 1.0 + 1e-4):
    _, obj = objective(teacher, weight=0.4, temperature=temp)
    np.testing.assert_allclose(jax.jit(obj.loss)(s, {}, batch, consts)[0],
                               0.6 * ce + 0.4 * kl, rtol=2e-4)


@pytest.mark.parametrize("token,kind,prompts", [("cls", "cosine", False), ("mean", "l2", False),
                                                ("patches", "cosine", False),
                                                ("mean", "cosine", True)])
def test_feature_loss_matches_numpy(teacher, token, kind, prompts):
  tuning = [dict(method="vpt", num_prompts=2) if prompts else dict(method="linear"),
            dict(method="distill_proj", dim=TEACHER["hidden_size"], num=2)]
  w, temp, beta = 0.3, 2.0, 0.7
  model, obj = objective(teacher, tuning, weight=w, temperature=temp, feature_weight=beta,
                         feature_kind=kind, feature_token=token, student_layers=(0, -1),
                         teacher_layers=(2, 0))
  assert obj.capture == ("tokens",) and obj.capture_layers == (0, 1)
  params = small_params(model, seed=5)
  x, y = images(3, seed=4), np.array([4, 0, 2])
  batch = {"image": jnp.asarray(x), "label": jnp.asarray(y)}

  def loss(prm):
    logits, aux = model.apply({"params": prm}, batch["image"], capture=obj.capture,
                              capture_layers=obj.capture_layers)
    total, metrics = obj.loss(logits, aux, batch, {"teacher": teacher.params})
    return total, metrics

  (total, metrics), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  p = flat(params)
  s_logits, s_aux = NumpyViT(params)(x)
  t_logits, t_aux = NumpyViT(flat(teacher.params))(x)
  n = (IMAGE // 8) ** 2

  def pick(tokens):
    return {"cls": tokens[:, 0], "mean": tokens[:, -n:].mean(1), "patches": tokens[:, -n:]}[token]

  def unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)

  feats = []
  for k, (ls, lt) in enumerate(((0, 2), (1, 0))):
    fs = pick(s_aux["blocks"][ls]["tokens"]) @ p["distill_proj/kernel"][k] + p[
        "distill_proj/bias"][k]
    ft = pick(t_aux["blocks"][lt]["tokens"])
    feats.append(np.mean(1 - (unit(fs) * unit(ft)).sum(-1)) if kind == "cosine"
                 else np.mean((fs - ft) ** 2))
  want_feat = np.mean(feats)
  want = np_kd(s_logits, t_logits, y, w, temp)[0] + beta * want_feat
  np.testing.assert_allclose(metrics["feature_loss"], want_feat, rtol=2e-4, atol=1e-6)
  np.testing.assert_allclose(total, want, rtol=2e-4, atol=1e-6)

  # The projection is a trainable leaf of the student and receives a gradient.
  assert np.abs(flat(grads)["distill_proj/kernel"]).max() > 0
  labels = flat(partition.label_params(params, model))
  assert labels["distill_proj/kernel"] == "distill" and labels["distill_proj/bias"] == "distill"


# ------------------------------------------------------------------------ teacher in the step
def _setup(teacher_path, enabled=True, **fields):
  c = config(teacher_path, tuning=dict(method="full"), **fields)
  c.distill.enabled = enabled
  c.batch_size = 4
  c.total_steps = 3
  c.optimizer.lr = 0.05
  return train_lib.setup(c, num_classes=NUM_CLASSES, steps_per_epoch=3)


def _batch(s, seed):
  rng = np.random.default_rng(seed)
  return sharding.shard_batch({"image": images(4, seed=seed),
                               "label": rng.integers(0, NUM_CLASSES, 4).astype(np.int32)}, s.mesh)


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def test_teacher_is_bitwise_unchanged_and_gets_no_gradient(teacher_files):
  path, file_params = teacher_files[NUM_CLASSES]
  s = _setup(path, weight=0.5, temperature=2.0)
  before = jax.tree.map(lambda a: np.array(a, copy=True), jax.device_get(s.constants))
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, before["teacher"], file_params)))
  start = jax.tree.map(np.asarray, jax.device_get(s.state.trainable))
  batch = _batch(s, 0)
  step = s.train_step.lower(s.state, s.frozen, s.constants, batch).compile()
  # The same trainer step with plain cross-entropy (no teacher), lowered for the same state.
  ce_step = train_lib.make_train_step(s.model, s.tx, objectives.CrossEntropy(), mesh=s.mesh)
  ce_flops = _flops(ce_step.lower(s.state, s.frozen, {}, batch).compile())
  state = s.state
  for i in range(3):
    state, metrics = step(state, s.frozen, s.constants, _batch(s, i))
  after = jax.device_get(s.constants)
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, before, after)))
  assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, start,
                                              jax.device_get(state.trainable))))
  assert set(metrics) >= {"ce_loss", "kd_loss", "teacher_accuracy", "loss"}

  # Compiled cost: the distillation step is the cross-entropy step plus one teacher forward;
  # a trainable teacher would add its backward pass (about twice its forward).
  step_flops = _flops(step)
  tmodel, student = s.objective.task.teacher.model, s.model
  x, y = batch["image"], batch["label"]
  fwd_flops = _flops(jax.jit(lambda p, im: tmodel.apply({"params": p}, im)[0]).lower(
      s.constants["teacher"], x).compile())
  assert abs(step_flops - (ce_flops + fwd_flops)) < 0.03 * step_flops

  def kd(sp, tp):  # the same loss with nothing stopped: gradients for both models
    sl = student.apply({"params": sp}, x)[0]
    tl = tmodel.apply({"params": tp}, x)[0]
    ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(sl), y[:, None], 1))
    kl = jnp.sum(jax.nn.softmax(tl / 2) * (jax.nn.log_softmax(tl / 2)
                                           - jax.nn.log_softmax(sl / 2)), -1)
    return 0.5 * ce + 0.5 * 4 * jnp.mean(kl)

  sp = partition.merge_params(start, jax.device_get(s.frozen))
  both = _flops(jax.jit(jax.grad(kd, argnums=(0, 1))).lower(sp, s.constants["teacher"]).compile())
  assert both > step_flops + fwd_flops


# ------------------------------------------------------------------------------------ sources
def test_workdir_teacher_is_the_run_it_names(tmp_path):
  """A run's workdir: config.json builds the model (LoRA teacher), its pretrained.path gives
  the frozen backbone, export/trainable.npz the trained leaves (LoRA + head)."""
  tuning = dict(method="lora", rank=2, alpha=4.0)
  model = jvt.build_model("B/16", NUM_CLASSES, tuning, **TEACHER)
  params = flat(small_params(model, seed=7))
  trained = {k: v for k, v in params.items() if "lora" in k or k.startswith("head/")}
  backbone = {k: v for k, v in params.items() if k not in trained}
  save_npz(tmp_path / "backbone.npz", unflat(backbone), model=model)  # records erf GELU
  run_cfg = base_config()
  run_cfg.model.variant = "B/16"
  run_cfg.model.overrides = TEACHER
  run_cfg.model.image_size = IMAGE
  run_cfg.tuning = tuning
  run_cfg.pretrained.path = str(tmp_path / "backbone.npz")
  run = tmp_path / "run"
  (run / "export").mkdir(parents=True)
  (run / "config.json").write_text(run_cfg.to_json())
  np.savez(run / "export" / "trainable.npz", **trained)

  cfg = ml_collections.ConfigDict(dict(workdir=str(run)))
  t = distill.load_teacher(cfg, image_size=IMAGE, default_variant="", default_num_classes=-1)
  assert t.num_classes == NUM_CLASSES and t.has_head
  assert t.source["backbone"] == str(tmp_path / "backbone.npz")
  got = flat(t.params)
  assert set(got) == set(params)
  for k in params:
    np.testing.assert_array_equal(got[k], params[k], err_msg=k)
  x = images(2)
  np.testing.assert_allclose(jax.jit(t.model.apply)({"params": t.params}, x)[0],
                             NumpyViT(params, lora_alpha=4.0)(x)[0], rtol=1e-4, atol=1e-5)
  # Student images of another size: the position embedding follows (cls slot kept).
  big = distill.load_teacher(cfg, image_size=2 * IMAGE, default_variant="",
                             default_num_classes=-1)
  pos = flat(big.params)["Transformer/posembed_input/pos_embedding"]
  assert pos.shape == (1, 1 + (2 * IMAGE // 8) ** 2, TEACHER["hidden_size"])
  np.testing.assert_array_equal(pos[:, 0], params["Transformer/posembed_input/pos_embedding"][:, 0])

  # The objective's record for <workdir>/teacher.json names the source (the trainer writes it
  # once the run has started: test_run_writes_teacher_json_once_started).
  student = small_model(None, **STUDENT)
  c = config()
  c.distill.teacher.path = ""
  c.distill.teacher.workdir = str(run)
  obj = distill.DistillationObjective(student, c, teacher=t)
  record = obj.records()["teacher.json"]
  assert record["kind"] == "workdir" and record["workdir"] == str(run)
  assert record["tuning"]["method"] == "lora" and len(record["trainable_sha256"]) == 64


# ---------------------------------------------------------------------------------- bad input
def test_bad_inputs_name_the_field(teacher, teacher_files, tmp_path):
  student = small_model(None, **STUDENT)
  teacher7 = _load(teacher_files[7][0])

  def make(tuning=None, source=teacher, **fields):
    model = small_model(tuning, **STUDENT)
    return distill.DistillationObjective(model, config(fields.pop("path", ""), tuning=tuning,
                                                       **fields), teacher=source)

  with pytest.raises(ValueError, match=r"config\.distill\.weight=0\.5.*7 classes.*student.*5"):
    make(source=teacher7, weight=0.5)
  make(source=teacher7, weight=0.0, feature_weight=1.0, student_layers=(0,), teacher_layers=(0,),
       tuning=dict(method="distill_proj", dim=32))  # features only: other classes are fine
  with pytest.raises(ValueError, match=r"config\.distill\.student_layers contains \[2\]"):
    make(feature_weight=1.0, student_layers=(2,), teacher_layers=(0,),
         tuning=dict(method="distill_proj", dim=32))
  with pytest.raises(ValueError, match=r"config\.distill\.teacher_layers contains \[-4\]"):
    make(feature_weight=1.0, student_layers=(0,), teacher_layers=(-4,),
         tuning=dict(method="distill_proj", dim=32))
  with pytest.raises(ValueError, match=r"student_layers=\(0, 1\) and teacher_layers=\(0,\)"):
    make(feature_weight=1.0, student_layers=(0, 1), teacher_layers=(0,))
  with pytest.raises(ValueError, match=r"dict\(method='distill_proj', dim=32, num=1\)"):
    make(feature_weight=1.0, student_layers=(0,), teacher_layers=(1,))
  with pytest.raises(ValueError, match="distill_proj.*feature_weight=0"):
    make(tuning=dict(method="distill_proj", dim=32))
  with pytest.raises(FileNotFoundError, match=r"config\.distill\.teacher\.path=.*missing\.npz"):
    make(source=None, path=str(tmp_path / "missing.npz"))
  with pytest.raises(ValueError, match=r"exactly one of config\.distill\.teacher\.workdir"):
    make(source=None)
  with pytest.raises(ValueError, match="weight=0 and feature_weight=0"):
    make(weight=0.0)
  with pytest.raises(ValueError, match=r"config\.distill\.feature_token='first'"):
    make(feature_token="first")
  with pytest.raises(ValueError, match=r"config\.distill\.temperature=0\.0"):
    make(temperature=0.0)
  c = config()
  c.distill.teacher.path = ""
  c.distill.teacher.workdir = str(tmp_path / "no_run")
  with pytest.raises(FileNotFoundError, match=r"config\.distill\.teacher\.workdir=.*no_run.*"
                                              "config.json"):
    distill.DistillationObjective(student, c)
  (tmp_path / "unfinished").mkdir()
  (tmp_path / "unfinished" / "config.json").write_text(base_config().to_json())
  c.distill.teacher.workdir = str(tmp_path / "unfinished")
  with pytest.raises(FileNotFoundError, match="export/trainable.npz"):
    distill.DistillationObjective(student, c)
  backbone_gone = base_config()
  backbone_gone.pretrained.path = str(tmp_path / "gone.npz")
  (tmp_path / "unfinished" / "config.json").write_text(backbone_gone.to_json())
  (tmp_path / "unfinished" / "export").mkdir()
  np.savez(tmp_path / "unfinished" / "export" / "trainable.npz",
           **{"head/kernel": np.zeros((768, 5), np.float32)})
  with pytest.raises(FileNotFoundError, match=r"pretrained\.path=.*gone\.npz"):
    distill.DistillationObjective(student, c)


# ------------------------------------------------------------------------------ learning test
LEARN_VIT = dict(hidden_size=32, mlp_dim=64, num_heads=2, num_layers=2, patch_size=8)
LEARN_TEACHER = dict(hidden_size=48, mlp_dim=96, num_heads=3, num_layers=2, patch_size=8)


def _learn_config(data_dir, overrides, steps, teacher_path=""):
  c = base_config()
  c.model.variant = "Ti/16"
  c.model.image_size = 16
  c.model.overrides = overrides
  c.tuning = dict(method="full")
  c.dataset.data_dir = data_dir
  c.dataset.task = "color"
  c.dataset.preprocess = "vit"
  c.batch_size = 32
  c.total_steps = steps
  c.optimizer.name = "adamw"
  c.optimizer.lr = 3e-3
  c.optimizer.warmup_steps = 5
  if teacher_path:
    c.distill.enabled = True
    c.distill.weight = 0.9
    c.distill.temperature = 2.0
    c.distill.teacher.path = teacher_path
    c.distill.teacher.overrides = LEARN_TEACHER
  return c


def _split(data_dir, split):
  from jvt.data import preprocess, sources
  ds = ml_collections.ConfigDict(dict(name="jvt_synthetic", data_dir=data_dir, task="color",
                                      label_key="label"))
  source = sources.get_source(ds, split)
  fn = preprocess.get_preprocess("vit", 16, train=False)
  rng = np.random.default_rng(0)
  x = np.stack([fn(source[i]["image"], rng) for i in range(len(source))]).astype(np.float32)
  return x, np.asarray(source.labels(), np.int32)


def _train(c, x, labels, x_eval, y_eval):
  s = train_lib.setup(c, num_classes=6, steps_per_epoch=8)
  state, rng = s.state, np.random.default_rng(0)
  for _ in range(c.total_steps):
    idx = rng.choice(len(x), c.batch_size, replace=False)
    state, _ = s.train_step(state, s.frozen, s.constants, sharding.shard_batch(
        {"image": x[idx], "label": labels[idx]}, s.mesh))
  params = jax.device_get(partition.merge_params(state.trainable, s.frozen))
  logits = jax.jit(s.model.apply)({"params": params}, x_eval)[0]
  return params, float(np.mean(np.argmax(logits, -1) == y_eval))


def test_distilled_student_beats_the_same_student_without_teacher(train_data_dir, tmp_path):
  """`color` of jvt_synthetic (6 classes, 256 training images). The teacher trains on the
  true labels; both students see the same 256 images with 70% of their labels replaced at
  random (fixed seed) and train for the same 60 steps from the same initialisation. Only the
  distilled one gets the teacher's soft targets (w=0.9, T=2) and must win clearly."""
  x, y = _split(train_data_dir, "train")
  x_eval, y_eval = (np.concatenate(a) for a in zip(_split(train_data_dir, "validation"),
                                                    _split(train_data_dir, "test")))
  teacher_params, teacher_acc = _train(
      _learn_config(train_data_dir, LEARN_TEACHER, 80), x, y, x_eval, y_eval)
  assert teacher_acc >= 0.9
  path = str(tmp_path / "teacher.npz")
  save_npz(path, teacher_params)
  rng = np.random.default_rng(1)
  noisy = np.where(rng.random(len(y)) < 0.7, rng.integers(0, 6, len(y)), y).astype(np.int32)
  _, plain = _train(_learn_config(train_data_dir, LEARN_VIT, 60), x, noisy, x_eval, y_eval)
  _, distilled = _train(_learn_config(train_data_dir, LEARN_VIT, 60, path), x, noisy, x_eval,
                        y_eval)
  # Measured: teacher 1.0, plain 0.47, distilled 1.0 on the 64 held-out images.
  assert distilled >= 0.9 and distilled >= plain + 0.3, (plain, distilled, teacher_acc)


def test_teacher_without_cls_token_resizes_only_its_grid(tmp_path):
  # SigLIP-like teachers have no [CLS] slot: the student's larger images resize the whole
  # [1, N, D] grid (before, a slot was taken for [CLS] and the grid was mis-sized).
  shape = dict(TEACHER, class_token=False, pool="gap")
  model = jvt.build_model("B/16", NUM_CLASSES, **shape)
  params = small_params(model, seed=5)
  save_npz(tmp_path / "no_cls.npz", params, model=model)
  cfg = ml_collections.ConfigDict(dict(path=str(tmp_path / "no_cls.npz"), variant="B/16",
                                       overrides=shape))
  t = distill.load_teacher(cfg, image_size=2 * IMAGE, default_variant="B/16",
                           default_num_classes=NUM_CLASSES)
  pos = flat(t.params)["Transformer/posembed_input/pos_embedding"]
  side = 2 * IMAGE // 8
  assert pos.shape == (1, side * side, TEACHER["hidden_size"])
  logits, _ = jax.jit(t.model.apply)({"params": t.params}, images(1, 2 * IMAGE))
  assert logits.shape == (1, NUM_CLASSES)


def test_run_writes_teacher_json_once_started(train_data_dir, tmp_path):
  # The trainer writes the objective's records after the run has started; set-up itself
  # writes nothing into the workdir (a run that fails before starting leaves it untouched).
  from helpers_train import TINY_VIT, tiny_config
  teacher = jvt.build_model("Ti/16", 4, **TINY_VIT)
  save_npz(tmp_path / "teacher.npz", small_params(teacher, seed=4), model=teacher)
  c = tiny_config(train_data_dir, steps=2)
  c.unlock()
  c.distill.enabled = True
  c.distill.teacher.path = str(tmp_path / "teacher.npz")
  c.distill.teacher.variant = "Ti/16"
  c.distill.teacher.overrides = dict(TINY_VIT)
  c.lock()
  workdir = tmp_path / "run"
  jvt.train.train_and_evaluate(c, str(workdir))
  record = json.loads((workdir / "teacher.json").read_text())
  assert record["kind"] == "path" and record["path"] == str(tmp_path / "teacher.npz")
  assert record["num_classes"] == 4 and record["has_head"]
