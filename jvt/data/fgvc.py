"""FGVC: the five fine-grained tasks of VPT, read from VPT's json split files or from TFDS.

Primary format (VPT's; NABirds is not in TFDS): a dataset root holding `train.json`, `val.json`
and `test.json`, each a JSON object mapping an image path (relative to the task's image folder
below the root) to a class id. data_dir is that root, or its parent with the root named after
the task (<data_dir>/cub/train.json). Class ids are remapped to 0..K-1 in sorted order of the ids found
in the split files present (so every split shares one mapping).

  task      root layout                          image folder
  cub       CUB_200_2011/{train,val,test}.json   <root>/images
  nabirds   nabirds/{train,val,test}.json        <root>/images
  flowers   <root>/{train,val,test}.json         <root>
  dogs      <root>/{train,val,test}.json         <root>/Images
  cars      <root>/{train,val,test}.json         <root>

TFDS option (not VPT's validation split): the builder prepared in array_record format;
`val` is the official validation split for flowers and the last 10% of `train` otherwise.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Mapping

from jvt.data import lists
from jvt.data import vtab

FGVC_SPLITS = ("train", "val", "test")
SOURCE_FORMATS = ("auto", "json", "tfds")


@dataclasses.dataclass(frozen=True)
class FgvcTask:
  """One FGVC task.

  Attributes:
    name: task name in configs and tables ('cub').
    title: column title in paper-style tables.
    num_classes: number of classes.
    image_dir: folder of the images below the dataset root ('' = the root itself).
    tfds_name: TFDS builder name, or None when TFDS has no builder (NABirds).
    tfds_versions: version patterns tried in order.
    tfds_splits: FGVC split -> TFDS split string for the TFDS option.
  """
  name: str
  title: str
  num_classes: int
  image_dir: str
  tfds_name: str | None = None
  tfds_versions: tuple[str, ...] = ()
  tfds_splits: Mapping[str, str] = dataclasses.field(default_factory=dict)

  @property
  def builder_specs(self) -> tuple[str, ...]:
    return tuple(f"{self.tfds_name}:{v}" for v in self.tfds_versions)


_TRAIN_TEST_SPLITS = {"train": "train[:90%]", "val": "train[90%:]", "test": "test"}

FGVC_TASKS: "collections.OrderedDict[str, FgvcTask]" = collections.OrderedDict(
    (t.name, t) for t in (
        FgvcTask("cub", "CUB-200-2011", 200, "images", "caltech_birds2011", ("0.*.*",),
                 _TRAIN_TEST_SPLITS),
        FgvcTask("nabirds", "NABirds", 555, "images"),
        FgvcTask("flowers", "Oxford Flowers", 102, "", "oxford_flowers102", ("2.*.*",),
                 {"train": "train", "val": "validation", "test": "test"}),
        FgvcTask("dogs", "Stanford Dogs", 120, "Images", "stanford_dogs", ("0.*.*",),
                 _TRAIN_TEST_SPLITS),
        FgvcTask("cars", "Stanford Cars", 196, "", "cars196", ("2.*.*",), _TRAIN_TEST_SPLITS),
    ))


def get_task(task: str) -> FgvcTask:
  """The FgvcTask called `task`; a ValueError lists the known tasks otherwise."""
  if task not in FGVC_TASKS:
    raise ValueError(f"unknown FGVC task '{task}'; known tasks: {', '.join(FGVC_TASKS)}")
  return FGVC_TASKS[task]


def read_split_json(path: str) -> dict[str, int]:
  """One VPT split file: {relative image path: class id}, in file order."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"FGVC split file {path} does not exist")
  with open(path, encoding="utf-8") as f:
    mapping = json.load(f)
  if not isinstance(mapping, dict):
    raise ValueError(f"{path}: expected a JSON object {{image path: class id}}")
  return mapping


def class_id_mapping(root: str) -> dict[int, int]:
  """Original class id -> contiguous id, over the ids of every split file present in root."""
  ids = set()
  for split in FGVC_SPLITS:
    path = os.path.join(root, f"{split}.json")
    if os.path.isfile(path):
      ids.update(read_split_json(path).values())
  return {class_id: i for i, class_id in enumerate(sorted(ids))}


def make_json_source(task: str, split: str, root: str) -> lists.PathListSource:
  """The `split` of `task` from VPT's json split files in the dataset root."""
  spec = get_task(task)
  entries = read_split_json(os.path.join(root, f"{split}.json"))
  image_dir = os.path.join(root, spec.image_dir)
  if not os.path.isdir(image_dir):
    raise FileNotFoundError(f"{task} images are expected under {image_dir}, which does not exist")
  remap = class_id_mapping(root)
  if len(remap) > spec.num_classes:
    raise ValueError(f"the split files in {root} hold {len(remap)} class ids; {task} has "
                     f"{spec.num_classes} classes")
  return lists.PathListSource(
      paths=[os.path.join(image_dir, path) for path in entries],
      labels=[remap[class_id] for class_id in entries.values()],
      num_classes=spec.num_classes,
      description=f"{task}/{split}: {os.path.join(root, split + '.json')}")


def make_tfds_source(task: str, split: str, data_dir: str | None) -> vtab.TfdsSource:
  """The `split` of `task` from its TFDS builder prepared (array_record) in data_dir."""
  spec = get_task(task)
  if spec.tfds_name is None:
    raise ValueError(f"{task} has no TFDS builder: use its json split files "
                     f"({', '.join(s + '.json' for s in FGVC_SPLITS)}) in the dataset root")
  builder = vtab.open_prepared_builder(
      spec.builder_specs, data_dir,
      f"python -m jvt.data.prepare {task} --data_dir={data_dir or '<data_dir>'}")
  split_string = spec.tfds_splits[split]
  return vtab.TfdsSource(
      data_source=vtab.open_data_source(builder, split_string),
      label_fn=vtab.label_identity,
      num_classes=spec.num_classes,
      description=f"{task}/{split}: {builder.name}:{builder.version} {split_string}",
      label_source=vtab.open_data_source(builder, split_string, decode_image=None))


def json_root(task: str, split: str, data_dir: str) -> str | None:
  """The dataset root holding <split>.json: data_dir itself or data_dir/<task>; None if neither."""
  for root in (data_dir, os.path.join(data_dir, task)):
    if os.path.isfile(os.path.join(root, f"{split}.json")):
      return root
  return None


def make_source(task: str, split: str, data_dir: str | None, source_format: str = "auto"):
  """The FGVC `split` ('train', 'val', 'test') of `task` as a random-access source.

  source_format: 'json' reads VPT's split files from the dataset root, which is data_dir or
  data_dir/<task> (e.g. /data/fgvc/cub); 'tfds' reads the prepared TFDS builder from the TFDS
  data_dir; 'auto' uses json when one of those split files exists and TFDS otherwise.
  """
  spec = get_task(task)
  if split not in FGVC_SPLITS:
    raise ValueError(f"unknown FGVC split '{split}': choose one of {list(FGVC_SPLITS)}")
  if source_format not in SOURCE_FORMATS:
    raise ValueError(f"unknown source_format '{source_format}': choose one of {SOURCE_FORMATS}")
  data_dir = os.path.expanduser(data_dir) if data_dir else None
  root = json_root(task, split, data_dir) if data_dir else None
  looked = (f"{os.path.join(data_dir, split + '.json')} or "
            f"{os.path.join(data_dir, task, split + '.json')}" if data_dir
            else f"<root>/{split}.json (no data_dir given)")
  if root is not None and source_format != "tfds":
    return make_json_source(task, split, root)
  if source_format == "json" or spec.tfds_name is None:
    raise FileNotFoundError(
        f"{task} split file not found: looked for {looked}. Pass as data_dir the dataset root "
        "holding VPT's train.json, val.json and test.json (or its parent, with the root named "
        f"'{task}')")
  try:
    return make_tfds_source(task, split, data_dir)
  except FileNotFoundError as e:
    if source_format == "tfds":
      raise
    raise FileNotFoundError(
        f"{task}/{split}: found neither VPT's split file ({looked}) nor a prepared TFDS "
        f"dataset. {e}") from e
