"""save_adapter / load_adapter: a bitwise round trip of the tuned leaves, a refused wrong base."""
import json
import os

import jax
import numpy as np
import pytest
from flax import traverse_util

import jvt
from jvt import partition
from jvt.checkpoints import save_npz

TINY = dict(hidden_size=32, mlp_dim=64, num_heads=2, num_layers=2, patch_size=8)


def _flat(tree):
  return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


@pytest.fixture(scope="module")
def base_files(tmp_path_factory):
  """Two base checkpoints (npz, 32 px) of the tiny ViT, from different seeds."""
  folder = tmp_path_factory.mktemp("bases")
  plain = jvt.build_model("Ti/16", num_classes=5, **TINY)
  paths = []
  for seed in (0, 1):
    params = jvt.init_params(plain, jax.random.key(seed), image_size=32)
    paths.append(str(folder / f"base{seed}.npz"))
    save_npz(paths[-1], {k: v for k, v in params.items() if k != "head"}, model=plain)
  return paths


@pytest.mark.parametrize("tuning", [dict(method="vpt", num_prompts=3, deep=True),
                                    dict(method="lora", rank=2)])
def test_round_trip_is_bitwise(base_files, tmp_path, tuning):
  model = jvt.build_model("Ti/16", num_classes=5, tuning=tuning, **TINY)
  params = jvt.init_params(model, jax.random.key(2), image_size=32)
  params = jvt.load_pretrained(base_files[0], params, model)
  # "Tuned": every trainable leaf moved away from its init by random noise.
  mask = partition.trainable_mask(params, model)
  noise = jax.tree.map(lambda p, m: p + m * jax.random.normal(jax.random.key(3), p.shape),
                       params, mask)
  path = str(tmp_path / "a.safetensors")
  jvt.save_adapter(path, model, noise, base=base_files[0], preprocess="vit")

  info = jvt.adapter_info(path)
  assert (info["num_classes"], info["image_size"], info["preprocess"]) == (5, 32, "vit")
  assert info["tuning"][0]["method"] == tuning["method"]
  assert info["base"]["file"] == "base0.npz" and len(info["base"]["sha256"]) == 64
  import safetensors.numpy
  stored = safetensors.numpy.load_file(path)
  trainable = {k for k, m in _flat(mask).items() if m}
  assert trainable <= set(stored) and "embedding/kernel" not in stored  # no frozen backbone

  loaded_model, loaded = jvt.load_adapter(path, base_files[0])
  want, got = _flat(noise), _flat(loaded)
  assert set(want) == set(got)
  for key in want:
    np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]), err_msg=key)
    assert np.asarray(got[key]).tobytes() == np.asarray(want[key]).tobytes()
  images = jax.random.normal(jax.random.key(4), (2, 32, 32, 3))
  np.testing.assert_array_equal(loaded_model.apply({"params": loaded}, images)[0],
                                model.apply({"params": noise}, images)[0])


def test_wrong_base_is_refused(base_files, tmp_path):
  model = jvt.build_model("Ti/16", num_classes=5, tuning=dict(method="vpt", num_prompts=2),
                          **TINY)
  params = jvt.load_pretrained(base_files[0], jvt.init_params(model, jax.random.key(0), 32),
                               model)
  path = str(tmp_path / "a.safetensors")
  jvt.save_adapter(path, model, params, base=base_files[0])
  with pytest.raises(ValueError, match=r"tuned from base0.npz .* but .*base1.npz is base1.npz.*"
                                       r"check_base=False"):
    jvt.load_adapter(path, base_files[1])
  _, other = jvt.load_adapter(path, base_files[1], check_base=False)
  import safetensors.numpy
  for key, value in safetensors.numpy.load_file(path).items():  # the adapter's own leaves
    np.testing.assert_array_equal(_flat(other)[key], value)
  base1 = _flat(jvt.load_pretrained(base_files[1], params, model))
  np.testing.assert_array_equal(_flat(other)["embedding/kernel"], base1["embedding/kernel"])
  with pytest.raises(ValueError, match="without jvt adapter metadata"):
    safetensors.numpy.save_file({"x": np.zeros(2, np.float32)}, str(tmp_path / "plain.st"))
    jvt.adapter_info(str(tmp_path / "plain.st"))
  assert oct(os.stat(path).st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask():
  mask = os.umask(0)
  os.umask(mask)
  return mask


@pytest.mark.slow
def test_a_run_exports_its_adapter(tmp_path, base_files):
  """train_and_evaluate writes export/adapter.safetensors; it rebuilds the run's test logits."""
  from helpers_train import build_data, tiny_config
  from jvt.data import pipeline
  from jvt.train import train_and_evaluate
  data_dir = build_data(tmp_path)
  config = tiny_config(data_dir, steps=2, pretrained=base_files[0])
  config.unlock()
  config.model.image_size = 32  # the bases' position grid (4 x 4 patches of 8)
  config.lock()
  state, final = train_and_evaluate(config, str(tmp_path / "run"))
  path = str(tmp_path / "run" / "export" / "adapter.safetensors")
  info = jvt.adapter_info(path)
  assert (info["preprocess"], info["image_size"], info["tuning"][0]["method"]) == ("vit", 32, "vpt")
  model, params = jvt.load_adapter(path, base_files[0])
  batches = pipeline.make_eval_batches(config.dataset, "test", global_batch_size=32,
                                       image_size=32, preprocess="vit", num_classes=4)
  correct = total = 0
  for batch in batches:
    logits = model.apply({"params": params}, batch["image"])[0]
    correct += int(np.sum((np.argmax(logits, -1) == batch["label"]) & batch["mask"]))
    total += int(np.sum(batch["mask"]))
  assert correct / total == pytest.approx(final["test_accuracy"])
  images = [np.asarray(b, np.uint8) for b in np.random.default_rng(0).integers(
      0, 255, (2, 16, 16, 3))]
  probs = jvt.predict(model, params, images, preprocess=info)
  assert probs.shape == (2, 4)
