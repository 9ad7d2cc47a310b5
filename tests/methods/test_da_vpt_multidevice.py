"""DA-VPT data parallel: 3 train steps on 8 CPU devices equal the 1-device run.

A prompt's positives sit on other devices (one example per device), so the metric terms must be
those of the GLOBAL batch. Each run is a subprocess with its own
`--xla_force_host_platform_device_count`; both run at once.
"""
import json
import os
import subprocess
import sys

import numpy as np

from conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_WORKER = r"""
import json, sys
import jax, numpy as np
from flax import traverse_util
from jvt import config_lib, partition, train
from jvt.train import sharding
from jvt.losses import da_vpt_terms

out = sys.argv[1]
c = config_lib.base_config()
c.model.variant = "Ti/16"
c.model.image_size = 16
c.model.overrides = dict(hidden_size=32, mlp_dim=64, num_heads=4, num_layers=2, patch_size=8)
c.tuning = dict(method="da_vpt_plus", num_prompts=2, num_proxy_prompts=2, proxy_layers=(0, 1),
                patch_weight=1.0, cls_weight=1.0, scale_ratio=2.0, attention_mask=True)
c.batch_size = 8
c.total_steps = 3
# SGD: the K-bias gradient is 0 up to rounding (softmax ignores a per-query constant) and Adam
# would blow that rounding noise up to lr-sized steps that differ between device layouts.
c.optimizer.name = "sgd"
c.optimizer.lr = 0.05
c.optimizer.weight_decay = 0.05
c.optimizer.schedule = "constant"
c.optimizer.warmup_steps = 0
c.optimizer.clip_value = 10.0
rng = np.random.default_rng(0)
patterns = rng.normal(size=(4, 16, 16, 3))
ys = np.repeat(np.arange(4), 4).astype(np.int32)
xs = (patterns[ys] + 0.5 * rng.normal(size=(16, 16, 16, 3))).astype(np.float32)
s = train.setup(c, num_classes=4, steps_per_epoch=2, class_examples=lambda k: (xs, ys))
params = partition.merge_params(jax.device_get(s.state.trainable), jax.device_get(s.frozen))
mapping = np.asarray(jax.device_get(s.state.method_state["da_vpt_plus"]["mapping"]))
order = np.array([0, 4, 8, 12, 1, 5, 9, 13])  # one example per device: classes 0 1 2 3 0 1 2 3
terms = da_vpt_terms(s.model, params, xs[order], ys[order], mapping)
local = [da_vpt_terms(s.model, params, xs[order][i:i + 1], ys[order][i:i + 1], mapping)["patch"]
         for i in range(8)]
init_prompts = np.asarray(jax.device_get(s.state.trainable["Transformer"]["prompts"]["block_1"]))
state, metrics = s.state, []
for step in range(3):
  pick = np.roll(order, step)
  state, m = s.train_step(state, s.frozen, s.constants,
                          sharding.shard_batch({"image": xs[pick], "label": ys[pick]}, s.mesh))
  metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
trainable = traverse_util.flatten_dict(jax.device_get(state.trainable), sep="/")
np.savez(out + ".npz", **{k: np.asarray(v) for k, v in trainable.items()},
         __init_prompts=init_prompts,
         __class_sums=np.asarray(jax.device_get(state.method_state["da_vpt_plus"]["class_sums"])))
json.dump({"devices": jax.device_count(), "metrics": metrics, "mapping": mapping.tolist(),
           "global_patch": float(terms["patch"]), "mean_local_patch": float(np.mean(local))},
          open(out + ".json", "w"))
"""


def test_eight_devices_equal_one_device(tmp_path):
  (tmp_path / "worker.py").write_text(_WORKER)
  procs = {}
  for n in (1, 8):
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": xla_flags(n)}
    procs[n] = subprocess.Popen([sys.executable, str(tmp_path / "worker.py"),
                                 str(tmp_path / f"run{n}")], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
  for n, p in procs.items():
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
  runs = {n: json.load(open(tmp_path / f"run{n}.json")) for n in procs}
  params = {n: dict(np.load(tmp_path / f"run{n}.npz")) for n in procs}
  assert runs[1]["devices"] == 1 and runs[8]["devices"] == 8
  assert runs[1]["mapping"] == runs[8]["mapping"]
  # The configuration can tell a global loss from a per-device one.
  one = runs[1]
  assert abs(one["global_patch"] - one["mean_local_patch"]) > 0.1
  np.testing.assert_allclose(one["metrics"][0]["patch_loss"], one["global_patch"], rtol=1e-5)
  for a, b in zip(runs[1]["metrics"], runs[8]["metrics"]):
    for key in ("loss", "ce_loss", "patch_loss", "cls_loss", "grad_norm"):
      np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-6, err_msg=key)
  assert sorted(params[1]) == sorted(params[8])
  assert any(k.startswith("Transformer/prompts/") for k in params[1])
  for key in params[1]:
    np.testing.assert_allclose(params[8][key], params[1][key], rtol=1e-5, atol=1e-5,
                               err_msg=key)
  moved = params[1]["Transformer/prompts/block_1"] - params[1]["__init_prompts"]
  assert np.abs(moved).max() > 1e-3  # the steps changed the prompts
