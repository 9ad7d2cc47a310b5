"""Class-per-folder image directories (`folder:<dir>`): your own JPEGs/PNGs without list files.

Two layouts:

  dir/train/<class>/*.jpg, dir/val/<class>/*.jpg, dir/test/<class>/*.jpg
      one subfolder per split (any split names); the split is the subfolder's name.
  dir/<class>/*.jpg
      no split subfolders; the split `all` is every image, and a split ratio is a slice of it:
      `all[:80%]`, `all[80%:90%]`, `all[90%:]`.

A slice `[a:b]` (percent or image counts, as in TFDS split strings) also works on a split
subfolder, e.g. `train[:90%]` and `train[90%:]` to hold out a validation split. Slices are cut
per class after a fixed shuffle of each class's files, so every split holds every class in the
same proportion and the same image never lands in two slices of one split.

Labels are the positions of the class folder names in the sorted union of the class names
found in every split, so `train` and `test` agree on them; `class_names` lists them.
"""
from __future__ import annotations

import os
import re

import numpy as np

from jvt.data.lists import PathListSource

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
ALL = "all"  # the split of a folder without split subfolders
_SLICE = re.compile(r"^(?P<name>[^\[\]]+)(\[(?P<lo>-?\d*%?):(?P<hi>-?\d*%?)\])?$")


def _images(folder: str) -> list[str]:
  """Image files directly in or below `folder`, sorted, as absolute paths."""
  out = []
  for dirpath, dirnames, filenames in os.walk(folder):
    dirnames.sort()
    out += [os.path.join(dirpath, f) for f in sorted(filenames)
            if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
  return out


def _subdirs(folder: str) -> list[str]:
  return sorted(d for d in os.listdir(folder)
                if os.path.isdir(os.path.join(folder, d)) and not d.startswith("."))


def _has_split_folders(root: str) -> bool:
  """True when root's subfolders are splits (they hold class folders, not images)."""
  subdirs = _subdirs(root)
  return bool(subdirs) and all(
      _subdirs(os.path.join(root, d)) and not any(
          f.lower().endswith(IMAGE_EXTENSIONS) for f in os.listdir(os.path.join(root, d)))
      for d in subdirs)


def splits_and_classes(root: str) -> tuple[dict[str, str], list[str]]:
  """({split: folder of its class folders}, sorted class names over all splits)."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f"folder:{root}: no such directory.")
  if _has_split_folders(root):
    splits = {d: os.path.join(root, d) for d in _subdirs(root)}
  else:
    splits = {ALL: root}
  classes = sorted(set().union(*(_subdirs(folder) for folder in splits.values())))
  if not classes:
    raise FileNotFoundError(
        f"folder:{root}: no class folders found; expected {root}/<class>/<image> or "
        f"{root}/<split>/<class>/<image> (e.g. train/, val/, test/).")
  return splits, classes


def _bound(text: str, n: int, default: int) -> int:
  if not text:
    return default
  if text.endswith("%"):
    return int(round(n * int(text[:-1]) / 100))
  value = int(text)
  return max(0, n + value) if value < 0 else min(n, value)


def make_source(root: str, split: str, num_classes: int | None = None) -> PathListSource:
  """The images of `split` (a split folder name or `all`, optionally sliced) under `root`."""
  root = os.path.abspath(os.path.expanduser(root))
  splits, classes = splits_and_classes(root)
  match = _SLICE.match(split or "")
  if match is None or match["name"] not in splits:
    raise ValueError(
        f"folder:{root}: unknown split {split!r}; this folder has the splits {sorted(splits)}"
        + (" (no split subfolders: cut a split ratio with slices such as 'all[:80%]', "
           "'all[80%:90%]', 'all[90%:]')" if ALL in splits else
           " (slices such as 'train[:90%]' also work)") + ".")
  folder = splits[match["name"]]
  sliced = match["lo"] is not None
  paths, labels = [], []
  for label, name in enumerate(classes):
    class_dir = os.path.join(folder, name)
    files = _images(class_dir) if os.path.isdir(class_dir) else []
    if sliced:  # a fixed per-class shuffle, so slices are random but repeatable
      order = np.random.default_rng([label, len(files)]).permutation(len(files))
      files = [files[i] for i in order]
      n = len(files)
      files = files[_bound(match["lo"], n, 0):_bound(match["hi"], n, n)]
    paths += files
    labels += [label] * len(files)
  if not paths:
    raise FileNotFoundError(f"folder:{root}: split {split!r} holds no images "
                            f"(extensions {', '.join(IMAGE_EXTENSIONS)}).")
  if num_classes is not None and num_classes < len(classes):
    raise ValueError(f"folder:{root} has {len(classes)} class folders but num_classes="
                     f"{num_classes}.")
  return PathListSource(paths=paths, labels=labels,
                        num_classes=len(classes) if num_classes is None else num_classes,
                        description=f"folder:{root} split {split} ({len(paths)} images)",
                        class_names=tuple(classes))
