"""Image folders described by list files: the NOAH / VTAB-1k jpg format, or your own.

A task folder holds the images and one list file per split, named after the split:

  root/train800val200.txt   (NOAH: also train800.txt and val200.txt when present)
  root/test.txt
  root/train.txt, root/val.txt, ...   (any other split name: `<split>.txt`)

with one `relative/path/to/image.jpg label` per line (the path may contain spaces: the label is
the last field). Images are decoded with PIL, so neither TensorFlow nor TFDS is involved.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import numpy as np

LIST_SPLITS = ("train800", "val200", "train800val200", "test")  # the NOAH / VTAB-1k names


def read_image(path: str) -> np.ndarray:
  """Decodes an image file to uint8 [H, W, 3] (gray and palette images become RGB)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  with Image.open(path) as image:
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


@dataclasses.dataclass
class PathListSource:
  """A random-access source of {'image': uint8 [H, W, 3], 'label': int} over image files.

  Attributes:
    paths: absolute image paths.
    labels: int label of each path.
    num_classes: number of classes.
    description: where the list came from, for logs.
    class_names: the name of each label when known (class-per-folder sources), else empty.
  """
  paths: Sequence[str]
  labels: Sequence[int]
  num_classes: int
  description: str = ""
  class_names: Sequence[str] = ()

  def __post_init__(self):
    if len(self.paths) != len(self.labels):
      raise ValueError(f"{len(self.paths)} paths but {len(self.labels)} labels")

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"image": read_image(self.paths[index]), "label": int(self.labels[index])}


def read_list(list_file: str) -> list[tuple[str, int]]:
  """Parses a `path label` list file into (relative path, label) pairs, skipping blank lines."""
  if not os.path.isfile(list_file):
    raise FileNotFoundError(f"split list file {list_file} does not exist")
  entries = []
  with open(list_file, encoding="utf-8") as f:
    for line_number, line in enumerate(f, start=1):
      line = line.strip()
      if not line:
        continue
      fields = line.rsplit(maxsplit=1)
      if len(fields) != 2 or not fields[1].lstrip("-").isdigit():
        raise ValueError(
            f"{list_file}:{line_number}: expected 'relative/path label', got {line!r}")
      entries.append((fields[0], int(fields[1])))
  return entries


def list_files(root: str) -> dict[str, str]:
  """{split: path} of the `<split>.txt` files in root that parse as list files."""
  found = {}
  if os.path.isdir(root):
    for name in sorted(os.listdir(root)):
      path = os.path.join(root, name)
      if name.endswith(".txt") and os.path.isfile(path):
        try:
          read_list(path)
        except ValueError:
          continue  # e.g. a classes.txt or a README next to the lists
        found[name[:-len(".txt")]] = path
  return found


def infer_num_classes(root: str) -> int:
  """1 + the largest label found in any list file (`<split>.txt`) of root."""
  labels = [label for path in list_files(root).values() for _, label in read_list(path)]
  if not labels:
    raise FileNotFoundError(
        f"no split list file (<split>.txt with 'path label' lines, e.g. train.txt, test.txt or "
        f"{', '.join(s + '.txt' for s in LIST_SPLITS)}) found in {root}")
  return max(labels) + 1


def make_source(root: str, split: str, num_classes: int | None = None) -> PathListSource:
  """The `split` of the list-format task folder `root` (reads root/<split>.txt).

  Any split name works (`train`, `val`, `test`, `train800val200`, ...) when its list file
  exists. num_classes defaults to 1 + the largest label over all list files of the folder;
  pass the task's class count (e.g. VTAB_TASKS[task].num_classes) when a list may miss the last
  class.
  """
  root = os.path.expanduser(root)
  list_file = os.path.join(root, f"{split}.txt")
  if not split or os.sep in split or not os.path.isfile(list_file):
    present = sorted(list_files(root))
    raise FileNotFoundError(
        f"split list file {list_file} does not exist; the list files in {root} give the "
        f"splits {present or 'none'} (one `<split>.txt` of 'relative/path label' lines per "
        "split).")
  entries = read_list(list_file)
  if num_classes is None:
    num_classes = infer_num_classes(root)
  bad = [label for _, label in entries if not 0 <= label < num_classes]
  if bad:
    raise ValueError(f"{list_file}: labels {sorted(set(bad))[:5]} are outside [0, {num_classes})")
  return PathListSource(
      paths=[os.path.join(root, path) for path, _ in entries],
      labels=[label for _, label in entries],
      num_classes=num_classes,
      description=f"{list_file} ({len(entries)} images)")
