"""FGVC json splits, the NOAH/VTAB-1k list format, and FGVC's TFDS option, on generated folders."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from jvt.data import fgvc
from jvt.data import lists


def _write_image(path, value, fmt="PNG", mode="RGB"):
  """A 5x6 image whose pixels encode `value` (R = value, G = 2 * value, B = 7)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  a = np.zeros((5, 6, 3), np.uint8)
  a[..., 0], a[..., 1], a[..., 2] = value, 2 * value, 7
  image = Image.fromarray(a)
  if mode == "L":
    image = Image.fromarray(np.full((5, 6), value, np.uint8))
  image.save(path, fmt)


# --------------------------------------------------------------------------------------------
# List format (NOAH / VTAB-1k jpg folders).

@pytest.fixture
def list_root(tmp_path):
  root = tmp_path / "vtab-1k" / "dtd"
  train = [("images/train800/0.png", 3), ("images/train800/a b.png", 0),
           ("images/val200/7.png", 5)]
  test = [("images/test/9.png", 1), ("images/test/gray.png", 2)]
  for i, (path, _) in enumerate(train + test):
    _write_image(str(root / path), 10 * i, mode="L" if "gray" in path else "RGB")
  (root / "train800val200.txt").write_text(
      "".join(f"{p} {label}\n" for p, label in train) + "\n")
  (root / "test.txt").write_text("".join(f"{p} {label}\n" for p, label in test))
  return str(root)


def test_list_source(list_root):
  train = lists.make_source(list_root, "train800val200")
  assert len(train) == 3 and train.num_classes == 6  # 1 + the largest label over both lists
  expected = [(0, 3), (10, 0), (20, 5)]
  for i, (value, label) in enumerate(expected):
    example = train[i]
    assert example["label"] == label
    assert example["image"].dtype == np.uint8 and example["image"].shape == (5, 6, 3)
    np.testing.assert_array_equal(example["image"][0, 0], [value, 2 * value, 7])
  test = lists.make_source(list_root, "test", num_classes=47)
  assert test.num_classes == 47 and [test[i]["label"] for i in range(2)] == [1, 2]
  np.testing.assert_array_equal(test[1]["image"][2, 3], [40, 40, 40])  # gray -> RGB


def test_list_jpg(tmp_path):
  _write_image(str(tmp_path / "x.jpg"), 100, fmt="JPEG")
  (tmp_path / "test.txt").write_text("x.jpg 0\n")
  image = lists.make_source(str(tmp_path), "test")[0]["image"]
  np.testing.assert_allclose(image.mean(axis=(0, 1)), [100, 200, 7], atol=3)


def test_list_errors(list_root, tmp_path):
  with pytest.raises(FileNotFoundError, match=f"{list_root}/train800.txt"):
    lists.make_source(list_root, "train800")
  with pytest.raises(FileNotFoundError, match=r"train.txt does not exist.*splits \['test', "
                     r"'train800val200'\]"):
    lists.make_source(list_root, "train")
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "test.txt").write_text("a.png 1\nno_label_here\n")
  with pytest.raises(ValueError, match="test.txt:2: expected 'relative/path label'"):
    lists.make_source(str(bad), "test")
  with pytest.raises(ValueError, match=r"labels \[2\] are outside \[0, 2\)"):
    lists.make_source(list_root, "test", num_classes=2)


# --------------------------------------------------------------------------------------------
# FGVC json split files (VPT's format).

def test_fgvc_task_table():
  assert {n: t.num_classes for n, t in fgvc.FGVC_TASKS.items()} == {
      "cub": 200, "nabirds": 555, "flowers": 102, "dogs": 120, "cars": 196}
  assert fgvc.FGVC_TASKS["nabirds"].tfds_name is None
  assert fgvc.FGVC_TASKS["cub"].tfds_name == "caltech_birds2011"


@pytest.fixture
def cub_root(tmp_path):
  root = tmp_path / "CUB_200_2011"
  splits = {  # original (non-contiguous) class ids 12, 40, 7 -> contiguous 1, 2, 0
      "train": {"012.Bird/a.jpg": 12, "040.Other/b.jpg": 40, "007.Third/c.jpg": 7},
      "val": {"012.Bird/d.jpg": 12},
      "test": {"040.Other/e.jpg": 40, "007.Third/f.jpg": 7},
  }
  value = 0
  for split, mapping in splits.items():
    for path in mapping:
      _write_image(str(root / "images" / path), value, fmt="JPEG")
      value += 20
    (root / f"{split}.json").write_text(json.dumps(mapping))
  return str(root)


def test_fgvc_json_source(cub_root):
  train = fgvc.make_source("cub", "train", cub_root)
  assert len(train) == 3 and train.num_classes == 200
  assert [train[i]["label"] for i in range(3)] == [1, 2, 0]
  assert train.paths[0] == os.path.join(cub_root, "images", "012.Bird/a.jpg")
  np.testing.assert_allclose(train[1]["image"].mean(axis=(0, 1)), [20, 40, 7], atol=3)
  test = fgvc.make_source("cub", "test", cub_root, source_format="json")
  assert [test[i]["label"] for i in range(2)] == [2, 0]
  assert len(fgvc.make_source("cub", "val", cub_root)) == 1


def test_fgvc_parent_dir(cub_root, tmp_path):
  parent = os.path.join(str(tmp_path), "fgvc")
  os.makedirs(parent)
  os.rename(cub_root, os.path.join(parent, "cub"))
  train = fgvc.make_source("cub", "train", parent)  # finds <parent>/cub/train.json
  assert train.paths[0] == os.path.join(parent, "cub", "images", "012.Bird/a.jpg")
  assert [train[i]["label"] for i in range(3)] == [1, 2, 0]


def test_fgvc_image_dirs(tmp_path):
  for task, subdir in [("dogs", "Images"), ("flowers", ""), ("cars", ""), ("nabirds", "images")]:
    root = tmp_path / task
    _write_image(str(root / subdir / "x" / "1.png"), 5)
    (root / "test.json").write_text(json.dumps({"x/1.png": 4}))
    source = fgvc.make_source(task, "test", str(root))
    assert source.paths == [os.path.join(str(root), subdir, "x/1.png")]
    assert source[0]["label"] == 0


def test_fgvc_errors(cub_root, tmp_path):
  with pytest.raises(ValueError, match="unknown FGVC task 'birds'.*nabirds"):
    fgvc.make_source("birds", "train", cub_root)
  with pytest.raises(ValueError, match="unknown FGVC split 'train800'"):
    fgvc.make_source("cub", "train800", cub_root)
  with pytest.raises(FileNotFoundError,
                     match=f"looked for {tmp_path}/test.json or {tmp_path}/nabirds/test.json"):
    fgvc.make_source("nabirds", "test", str(tmp_path))
  with pytest.raises(FileNotFoundError, match=f"dogs split file not found.*{tmp_path}/val.json"):
    fgvc.make_source("dogs", "val", str(tmp_path), source_format="json")
  os.remove(os.path.join(cub_root, "val.json"))
  with pytest.raises(FileNotFoundError, match="val.json.*caltech_birds2011:0"):
    fgvc.make_source("cub", "val", cub_root)  # auto: neither json nor TFDS


# --------------------------------------------------------------------------------------------
# FGVC's TFDS option on a fixture written under the real builder name.

def test_fgvc_tfds_source(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  import io  # pylint: disable=g-import-not-at-top

  def png(k):
    buffer = io.BytesIO()
    Image.fromarray(np.full((3, 3, 3), k, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()

  class Birds(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    name = "caltech_birds2011"
    VERSION = tfds.core.Version("0.2.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(3, 3, 3)),
          "label": tfds.features.ClassLabel(num_classes=200)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(0, 30), "test": self._generate_examples(100, 7)}

    def _generate_examples(self, offset, n):
      for i in range(n):
        yield offset + i, {"image": png(offset + i), "label": (offset + i) % 200}

  Birds(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  sources = {s: fgvc.make_source("cub", s, str(tmp_path)) for s in fgvc.FGVC_SPLITS}
  assert {s: len(v) for s, v in sources.items()} == {"train": 27, "val": 3, "test": 7}
  ids = {s: [int(v[i]["image"][0, 0, 0]) for i in range(len(v))] for s, v in sources.items()}
  assert sorted(ids["train"] + ids["val"]) == list(range(30))
  assert sorted(ids["test"]) == list(range(100, 107))
  assert all(sources["test"][i]["label"] == ids["test"][i] % 200 for i in range(7))
  assert list(sources["test"].labels()) == [k % 200 for k in ids["test"]]
  assert sources["train"].num_classes == 200
