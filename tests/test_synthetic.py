"""Tests of the jvt_synthetic TFDS dataset (jvt.data.synthetic)."""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jvt.data import pipeline
from jvt.data import sources
from jvt.data import synthetic

PALETTE = np.array([(220, 40, 40), (40, 180, 60), (50, 80, 230), (230, 210, 40),
                    (210, 50, 200), (40, 200, 210)])
TINY = dict(num_train=64, num_validation=16, num_test=16, image_size=32, seed=0)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("synthetic"))
  synthetic.build_synthetic(data_dir, **TINY)
  return data_dir


def _near_palette(image):
  """[6, S, S] bool: pixels within 45 grey levels (every channel) of each palette colour.

  Background pixels are grey (r ~ g ~ b) and every palette colour has one channel <= 50 and
  another >= 180, so no background pixel is near a palette colour.
  """
  diff = np.abs(image[None].astype(int) - PALETTE[:, None, None, :])  # [6, S, S, 3]
  return diff.max(-1) <= 45


@pytest.mark.parametrize("size", [32, 64])
def test_rendered_labels_match_the_pixels(size):
  for i in range(40):
    image, labels = synthetic.render_example(np.random.default_rng(i), size)
    assert image.shape == (size, size, 3) and image.dtype == np.uint8
    near = _near_palette(image)  # [6, S, S]
    assert np.argmax(near.sum((1, 2))) == labels["color"]
    half = size // 2
    obj = near[labels["color"]].reshape(2, half, 2, half).sum((1, 3)).ravel()  # per quadrant
    assert np.sum(obj >= 5) == labels["count"] + 1
    assert np.argmax(obj) == labels["position"]
    assert 0 <= labels["shape"] < 4


@pytest.mark.parametrize("shape,area", [("disc", np.pi), ("square", 1.6**2),
                                        ("triangle", 2.0), ("cross", 2 * 2 * (2 / 3) - (2 / 3)**2)])
def test_shape_masks_have_the_expected_area(shape, area):
  r = 20.0
  mask = synthetic._shape_mask(shape, 32.0, 32.0, r, 64)
  assert abs(mask.sum() / (area * r * r) - 1) < 0.06


def test_generation_is_deterministic_per_seed_and_split():
  def first(split, seed):
    b = synthetic.JvtSynthetic(settings=synthetic.SyntheticSettings(seed=seed), data_dir="/x")
    return next(iter(b._generate_examples(split)))[1]["image"]
  assert first("train", 0) == first("train", 0)
  assert first("train", 0) != first("train", 1)
  assert first("train", 0) != first("test", 0)


def test_builds_and_reads_back_through_tfds(tiny_dir):
  builder = tfds.builder("jvt_synthetic", data_dir=tiny_dir)
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
      "train": 64, "validation": 16, "test": 16}
  classes = {"shape": 4, "color": 6, "count": 4, "position": 4}
  for task, n in classes.items():
    assert builder.info.features[task].num_classes == n
  data = builder.as_data_source("train")
  seen = {task: set() for task in classes}
  for i in range(len(data)):
    ex = data[i]
    assert ex["image"].shape == (32, 32, 3) and ex["image"].dtype == np.uint8
    for task, n in classes.items():
      assert 0 <= ex[task] < n
      seen[task].add(int(ex[task]))
  assert all(len(v) > 1 for v in seen.values())


def test_get_source_picks_the_task(tiny_dir):
  for task, n in (("color", 6), ("count", 4)):
    src = sources.get_source({"name": "jvt_synthetic", "data_dir": tiny_dir, "task": task},
                             "validation")
    assert len(src) == 16 and src.num_classes == n
    labels = src.labels()
    np.testing.assert_array_equal(labels, [src[i]["label"] for i in range(16)])
    assert labels.min() >= 0 and labels.max() < n
  with pytest.raises(ValueError, match="shape.*color.*count.*position"):
    sources.get_source({"name": "jvt_synthetic", "data_dir": tiny_dir, "task": "size"}, "test")


def test_balanced_loader_on_the_synthetic_set(tiny_dir):
  cfg = {"name": "jvt_synthetic", "data_dir": tiny_dir, "task": "color"}
  with pipeline.make_train_loader(cfg, "train", global_batch_size=12, image_size=16,
                                  preprocess="vtab", seed=0, sampler="balanced",
                                  images_per_class=3) as loader:
    batch = next(loader)
  assert batch["image"].shape == (12, 16, 16, 3)
  assert sorted(np.unique(batch["label"], return_counts=True)[1]) == [3, 3, 3, 3]


def test_build_is_idempotent_and_rebuilds_on_new_settings(tiny_dir):
  version_dir = tfds.builder("jvt_synthetic", data_dir=tiny_dir).data_dir
  info = os.path.join(version_dir, "dataset_info.json")
  stamp = os.stat(info).st_mtime_ns
  synthetic.build_synthetic(tiny_dir, **TINY)
  assert os.stat(info).st_mtime_ns == stamp
  rebuilt = synthetic.build_synthetic(tiny_dir, **{**TINY, "image_size": 24, "num_train": 8})
  assert rebuilt.info.splits["train"].num_examples == 8
  assert rebuilt.as_data_source("test")[0]["image"].shape == (24, 24, 3)
  synthetic.build_synthetic(tiny_dir, **TINY)  # restore for the other tests


def test_cli(tmp_path, capsys):
  synthetic.main([f"--data_dir={tmp_path}", "--num_train=4", "--num_validation=2",
                  "--num_test=2", "--image_size=24"])
  assert "'train': 4" in capsys.readouterr().out
  assert len(tfds.builder("jvt_synthetic", data_dir=str(tmp_path)).as_data_source("test")) == 2
