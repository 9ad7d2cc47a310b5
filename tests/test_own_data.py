"""Own images: class-per-folder directories (`folder:<dir>`) and list files with any split names."""
import os

import numpy as np
import pytest
from PIL import Image

from jvt.data import folders
from jvt.data import lists
from jvt.data import sources


def _write(path, value):
  """A 4x4 JPEG-safe PNG whose red channel is `value`."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  a = np.zeros((4, 4, 3), np.uint8)
  a[..., 0] = value
  Image.fromarray(a).save(path)


@pytest.fixture
def split_dirs(tmp_path):
  """root/{train,val,test}/{cat,dog,owl}/; test has no owl (labels must still agree)."""
  root = tmp_path / "pets"
  counts = {"train": {"cat": 3, "dog": 2, "owl": 1}, "val": {"cat": 1, "dog": 1, "owl": 1},
            "test": {"cat": 2, "dog": 1}}
  for split, per_class in counts.items():
    for name, n in per_class.items():
      for i in range(n):
        _write(str(root / split / name / f"{i}.png"), 10 * i)
  return str(root)


def test_folder_split_subfolders(split_dirs):
  train = sources.get_source({"name": f"folder:{split_dirs}"}, "train")
  assert (len(train), train.num_classes) == (6, 3)
  assert tuple(train.class_names) == ("cat", "dog", "owl")
  assert sorted(train.labels) == [0, 0, 0, 1, 1, 2]
  test = sources.get_source({"name": f"folder:{split_dirs}"}, "test")
  assert test.num_classes == 3 and sorted(test.labels) == [0, 0, 1]  # owl keeps label 2
  for i in range(len(test)):
    path = test.paths[i]
    example = test[i]
    assert example["label"] == ["cat", "dog", "owl"].index(os.path.basename(os.path.dirname(path)))
    assert example["image"].shape == (4, 4, 3) and example["image"].dtype == np.uint8
    assert example["image"][0, 0, 0] == 10 * int(os.path.basename(path)[0])


def test_folder_slices_of_a_split(split_dirs):
  head = folders.make_source(split_dirs, "train[:50%]")
  tail = folders.make_source(split_dirs, "train[50%:]")
  assert not set(head.paths) & set(tail.paths)
  assert sorted(head.paths + tail.paths) == sorted(folders.make_source(split_dirs, "train").paths)
  # Per class: cat 3 -> round(1.5)=2 | 1, dog 2 -> 1 | 1, owl 1 -> 0 (round(0.5)=0) | 1
  assert sorted(head.labels) == [0, 0, 1] and sorted(tail.labels) == [0, 1, 2]


def test_folder_ratio_without_split_folders(tmp_path):
  root = tmp_path / "flat"
  for name in ("a", "b"):
    for i in range(10):
      _write(str(root / name / f"{i}.jpg"), i)
  parts = [folders.make_source(str(root), s) for s in ("all[:80%]", "all[80%:90%]", "all[90%:]")]
  assert [len(p) for p in parts] == [16, 2, 2]
  assert [sorted(p.labels) for p in parts[1:]] == [[0, 1], [0, 1]]  # stratified per class
  assert len(set().union(*(p.paths for p in parts))) == 20
  with pytest.raises(ValueError, match=r"unknown split 'train'.*\['all'\].*all\[:80%\]"):
    folders.make_source(str(root), "train")


def test_folder_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such directory"):
    folders.make_source(str(tmp_path / "nope"), "train")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no class folders"):
    folders.make_source(str(tmp_path / "empty"), "all")


def test_list_files_any_split_names(tmp_path):
  for i in range(3):
    _write(str(tmp_path / "img" / f"{i}.png"), 50 * i)
  (tmp_path / "train.txt").write_text("img/0.png 0\nimg/1.png 1\n")
  (tmp_path / "val.txt").write_text("img/2.png 2\n")
  (tmp_path / "classes.txt").write_text("zero\none\ntwo\n")  # not a list file: ignored
  train = sources.get_source({"name": f"list:{tmp_path}"}, "train")
  assert (len(train), train.num_classes, list(train.labels)) == (2, 3, [0, 1])
  assert train[1]["image"][0, 0, 0] == 50
  assert sorted(lists.list_files(str(tmp_path))) == ["train", "val"]
  with pytest.raises(FileNotFoundError, match=r"test.txt does not exist.*\['train', 'val'\]"):
    lists.make_source(str(tmp_path), "test")
