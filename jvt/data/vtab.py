"""VTAB-1k: the 19 task definitions, their split arithmetic, label functions and sources.

Each task reads a TFDS builder by its real name and version pattern from a data_dir prepared in
array_record format (`python -m jvt.data.prepare <task>`), through TFDS's random-access data
sources, so TensorFlow is never imported. The split definitions and label functions mirror the
task_adaptation / VPT definitions:

  train800       = train[:800]
  val200         = 200 images: the first of `validation`, or train[p*N//100 : p*N//100 + 200]
  train800val200 = train800 + val200 (1000 images)
  test           = the evaluation split

where N is the size of the TFDS `train` split read from the builder's info. Every slice is
rendered in absolute example indices before it reaches TFDS.
"""
from __future__ import annotations

import collections
import dataclasses
import os
from typing import Any, Callable, Mapping

import numpy as np

SPLITS = ("train800", "val200", "train800val200", "test")
_LABEL_CHUNK = 1024  # records per read in TfdsSource.labels()


@dataclasses.dataclass(frozen=True)
class Slice:
  """A contiguous slice of one TFDS split, in absolute example indices.

  The slice starts at `start_percent * N // 100`, N being the number of examples of `split`,
  and holds `length` examples (None: up to the end of the split).
  """
  split: str
  start_percent: int = 0
  length: int | None = None

  def resolve(self, split_sizes: Mapping[str, int]) -> str:
    """Returns the TFDS split string, e.g. 'train[1800:2000]' for train[N90%:+200], N=2000."""
    if self.split not in split_sizes:
      raise ValueError(
          f"the dataset has no '{self.split}' split (it has {sorted(split_sizes)})")
    size = split_sizes[self.split]
    start = self.start_percent * size // 100
    if self.length is None:
      return self.split if start == 0 else f"{self.split}[{start}:]"
    stop = start + self.length
    if stop > size:
      raise ValueError(
          f"slice {self.split}[{start}:{stop}] runs past the end of '{self.split}' "
          f"({size} examples): the dataset is smaller than VTAB-1k assumes")
    return f"{self.split}[{start}:{stop}]"


@dataclasses.dataclass(frozen=True)
class VtabTask:
  """One VTAB-1k task.

  Attributes:
    name: the task name used in configs and tables (e.g. 'clevr_count').
    title: the column title used in paper-style tables.
    tfds_name: TFDS builder name, with the config when there is one ('eurosat/rgb').
    versions: version patterns tried in order when reading ('3.*.*'); the first one that is
      prepared in data_dir is used.
    group: 'natural', 'specialized' or 'structured'.
    num_classes: number of classes after the label function.
    label_fn: name of the label function in LABEL_FUNCTIONS.
    train800, val200, test: the slices that make up each split (train800val200 is
      train800 followed by val200).
    image_scale: multiplier applied to the stored pixels (dSprites stores 0/1 pixels).
  """
  name: str
  title: str
  tfds_name: str
  versions: tuple[str, ...]
  group: str
  num_classes: int
  label_fn: str
  train800: tuple[Slice, ...]
  val200: tuple[Slice, ...]
  test: tuple[Slice, ...]
  image_scale: int = 1

  def slices(self, split: str) -> tuple[Slice, ...]:
    """The slices of one of SPLITS."""
    if split not in SPLITS:
      raise ValueError(f"unknown VTAB split '{split}': choose one of {list(SPLITS)}")
    if split == "train800val200":
      return self.train800 + self.val200
    return getattr(self, split)

  def split_string(self, split: str, split_sizes: Mapping[str, int]) -> str:
    """The TFDS split string of `split`, e.g. 'train[:800]+train[1800:2000]'."""
    return "+".join(s.resolve(split_sizes) for s in self.slices(split))

  @property
  def builder_specs(self) -> tuple[str, ...]:
    """'name:version' strings accepted by tfds.builder, in the order they are tried."""
    return tuple(f"{self.tfds_name}:{v}" for v in self.versions)


# ---------------------------------------------------------------------------------------------
# Label functions: raw TFDS record (as decoded by the data source) -> int label.

_CLEVR_DISTANCE_THRESHOLDS = np.array([0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0])
_KITTI_DISTANCE_THRESHOLDS = np.array([-100.0, 8.0, 20.0, 999.0])
_KITTI_NO_VEHICLE_DISTANCE = 1000.0
_KITTI_VEHICLE_TYPES = 3  # object types 0, 1, 2 = Car, Van, Truck


def _bin_index(thresholds: np.ndarray, value: float) -> int:
  """Index of the largest threshold strictly below `value` (task_adaptation's binning)."""
  return int(np.searchsorted(thresholds, value, side="left")) - 1


def label_identity(record: Mapping[str, Any]) -> int:
  """The dataset's own `label` feature."""
  return int(record["label"])


def label_clevr_count(record: Mapping[str, Any]) -> int:
  """Number of objects in the scene minus 3 (scenes hold 3 to 10 objects: 8 classes)."""
  return len(record["objects"]["size"]) - 3


def label_clevr_closest_distance(record: Mapping[str, Any]) -> int:
  """Depth of the closest object (min of pixel_coords[:, 2]) binned at [0,8,8.5,9,9.5,10,100]."""
  depths = np.asarray(record["objects"]["pixel_coords"], np.float32).reshape(-1, 3)[:, 2]
  return _bin_index(_CLEVR_DISTANCE_THRESHOLDS, float(np.min(depths)))


def label_kitti_closest_vehicle_distance(record: Mapping[str, Any]) -> int:
  """Depth (location z) of the closest Car/Van/Truck binned at [-100, 8, 20, 999].

  A scene without a vehicle counts as distance 1000, hence class 3.
  """
  types = np.asarray(record["objects"]["type"], np.int64).reshape(-1)
  depths = np.asarray(record["objects"]["location"], np.float32).reshape(-1, 3)[:, 2]
  vehicle_depths = depths[types < _KITTI_VEHICLE_TYPES]
  distance = min([_KITTI_NO_VEHICLE_DISTANCE, *vehicle_depths.tolist()])
  return _bin_index(_KITTI_DISTANCE_THRESHOLDS, distance)


@dataclasses.dataclass(frozen=True)
class BinnedLabel:
  """Groups `num_original` consecutive integer values of `feature` into `num_classes` bins:
  floor(value / (num_original / num_classes)) in float32, as task_adaptation does.

  A dataclass rather than a closure so that sources stay picklable for data-loader workers.
  """
  feature: str
  num_original: int
  num_classes: int

  def __call__(self, record: Mapping[str, Any]) -> int:
    factor = np.float32(self.num_original) / np.float32(self.num_classes)
    return int(np.floor(np.float32(record[self.feature]) / factor))


label_dsprites_x_position = BinnedLabel("label_x_position", 32, 16)
label_dsprites_orientation = BinnedLabel("label_orientation", 40, 16)


def label_smallnorb_azimuth(record: Mapping[str, Any]) -> int:
  """The 18 azimuth classes of smallNORB."""
  return int(record["label_azimuth"])


def label_smallnorb_elevation(record: Mapping[str, Any]) -> int:
  """The 9 elevation classes of smallNORB."""
  return int(record["label_elevation"])


LABEL_FUNCTIONS: Mapping[str, Callable[[Mapping[str, Any]], int]] = {
    "label": label_identity,
    "clevr_count": label_clevr_count,
    "clevr_closest_distance": label_clevr_closest_distance,
    "kitti_closest_vehicle_distance": label_kitti_closest_vehicle_distance,
    "dsprites_x_position_16": label_dsprites_x_position,
    "dsprites_orientation_16": label_dsprites_orientation,
    "smallnorb_azimuth": label_smallnorb_azimuth,
    "smallnorb_elevation": label_smallnorb_elevation,
}

# ---------------------------------------------------------------------------------------------
# The 19 tasks, in the column order of the VPT / NOAH tables.

_TRAIN800 = (Slice("train", 0, 800),)
_VALIDATION200 = (Slice("validation", 0, 200),)


def _train_pct200(percent: int) -> tuple[Slice, ...]:
  return (Slice("train", percent, 200),)


def _task(name, title, tfds_name, versions, group, num_classes, val200, test,
          label_fn="label", image_scale=1) -> VtabTask:
  return VtabTask(name=name, title=title, tfds_name=tfds_name, versions=versions, group=group,
                  num_classes=num_classes, label_fn=label_fn, train800=_TRAIN800,
                  val200=val200, test=test, image_scale=image_scale)


_TEST = (Slice("test"),)
VTAB_TASKS: "collections.OrderedDict[str, VtabTask]" = collections.OrderedDict(
    (t.name, t) for t in (
        # natural
        _task("cifar100", "CIFAR-100", "cifar100", ("3.*.*",), "natural", 100,
              _train_pct200(90), _TEST),
        _task("caltech101", "Caltech101", "caltech101", ("3.*.*",), "natural", 102,
              _train_pct200(90), _TEST),
        _task("dtd", "DTD", "dtd", ("3.*.*",), "natural", 47, _VALIDATION200, _TEST),
        _task("flowers102", "Flowers102", "oxford_flowers102", ("2.*.*",), "natural", 102,
              _VALIDATION200, _TEST),
        # VPT read oxford_iiit_pet 3.*; TFDS 4.9 only prepares 4.0.0 (same image list and
        # labels, plus head boxes and a few re-encoded corrupt JPEGs).
        _task("pets", "Pets", "oxford_iiit_pet", ("3.*.*", "4.*.*"), "natural", 37,
              _train_pct200(80), _TEST),
        _task("svhn", "SVHN", "svhn_cropped", ("3.*.*",), "natural", 10,
              _train_pct200(90), _TEST),
        _task("sun397", "Sun397", "sun397/tfds", ("4.*.*",), "natural", 397,
              _VALIDATION200, _TEST),
        # specialized
        _task("patch_camelyon", "Camelyon", "patch_camelyon", ("2.*.*",), "specialized", 2,
              _VALIDATION200, _TEST),
        _task("eurosat", "EuroSAT", "eurosat/rgb", ("2.*.*",), "specialized", 10,
              _train_pct200(60), (Slice("train", 80),)),
        _task("resisc45", "Resisc45", "resisc45", ("3.*.*",), "specialized", 45,
              _train_pct200(60), (Slice("train", 80),)),
        _task("retinopathy", "Retinopathy", "diabetic_retinopathy_detection/btgraham-300",
              ("3.*.*",), "specialized", 5, _VALIDATION200, _TEST),
        # structured
        _task("clevr_count", "Clevr-Count", "clevr", ("3.*.*",), "structured", 8,
              _train_pct200(90), (Slice("validation"),), label_fn="clevr_count"),
        _task("clevr_dist", "Clevr-Dist", "clevr", ("3.*.*",), "structured", 6,
              _train_pct200(90), (Slice("validation"),), label_fn="clevr_closest_distance"),
        _task("dmlab", "DMLab", "dmlab", ("2.0.1",), "structured", 6, _VALIDATION200, _TEST),
        _task("kitti_dist", "KITTI-Dist", "kitti", ("3.*.*",), "structured", 4,
              _VALIDATION200, _TEST, label_fn="kitti_closest_vehicle_distance"),
        _task("dsprites_loc", "dSpr-Loc", "dsprites", ("2.*.*",), "structured", 16,
              _train_pct200(80), (Slice("train", 90),), label_fn="dsprites_x_position_16",
              image_scale=255),
        _task("dsprites_ori", "dSpr-Ori", "dsprites", ("2.*.*",), "structured", 16,
              _train_pct200(80), (Slice("train", 90),), label_fn="dsprites_orientation_16",
              image_scale=255),
        _task("smallnorb_azi", "sNORB-Azim", "smallnorb", ("2.*.*",), "structured", 18,
              (Slice("test", 0, 200),), (Slice("test", 50),), label_fn="smallnorb_azimuth"),
        _task("smallnorb_ele", "sNORB-Elev", "smallnorb", ("2.*.*",), "structured", 9,
              (Slice("test", 0, 200),), (Slice("test", 50),), label_fn="smallnorb_elevation"),
    ))

VTAB_GROUPS: Mapping[str, tuple[str, ...]] = collections.OrderedDict(
    (g, tuple(t.name for t in VTAB_TASKS.values() if t.group == g))
    for g in ("natural", "specialized", "structured"))


def get_task(task: str) -> VtabTask:
  """The VtabTask called `task`; a ValueError lists the known tasks otherwise."""
  if task not in VTAB_TASKS:
    raise ValueError(f"unknown VTAB-1k task '{task}'; known tasks: {', '.join(VTAB_TASKS)}")
  return VTAB_TASKS[task]


# ---------------------------------------------------------------------------------------------
# Reading prepared TFDS data without TensorFlow.

def open_prepared_builder(specs: tuple[str, ...], data_dir: str | None, prepare_command: str):
  """Returns the first TFDS builder among `specs` ('name:version') prepared in data_dir.

  Raises FileNotFoundError naming the builders, the directory searched and `prepare_command`
  when none is prepared.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top

  data_dir = os.path.expanduser(data_dir) if data_dir else None
  looked = []
  for spec in specs:
    name_dir = epath.Path(data_dir, spec.split(":")[0]) if data_dir else None
    if name_dir is not None and not name_dir.exists():
      looked.append(f"{spec} (no {name_dir})")
      continue
    try:
      builder = tfds.builder(spec, data_dir=data_dir)
    except (AssertionError, ValueError):  # this TFDS cannot even construct that version
      looked.append(f"{spec} (not found)")
      continue
    if builder.is_prepared():
      return builder
    looked.append(f"{spec} (not found at {builder.data_dir})")
  where = data_dir or "the TFDS default data_dir (TFDS_DATA_DIR or ~/tensorflow_datasets)"
  raise FileNotFoundError(
      f"TFDS dataset {' or '.join(specs)} is not prepared in {where}: looked for "
      f"{'; '.join(looked)}. Prepare it with:\n  {prepare_command}")


def open_data_source(builder, split: str, decode_image: str | None = "image"):
  """`builder.as_data_source(split)` decoding only the image feature `decode_image` (None: no
  image), with a clear error when the files are not random-access."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  skip = {key: tfds.decode.SkipDecoding() for key, feature in builder.info.features.items()
          if isinstance(feature, tfds.features.Image) and key != decode_image}
  try:
    return builder.as_data_source(split=split, decoders=skip or None)
  except NotImplementedError as e:
    raise ValueError(
        f"{builder.name} {builder.version} in {builder.data_dir} is stored as "
        f"{builder.info.file_format}, which has no random access without TensorFlow. "
        "Prepare it again in array_record format (python -m jvt.data.prepare ... writes "
        "array_record), or convert it where TensorFlow is installed with "
        "`tfds convert_format --dataset_version_dir=<dir> --out_file_format=array_record`."
    ) from e


def to_rgb(image: np.ndarray, scale: int = 1) -> np.ndarray:
  """uint8 [H, W, C] with C in {1, 3} -> uint8 [H, W, 3]; gray is tiled to 3 channels."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  if image.shape[-1] != 3:
    raise ValueError(f"expected an image with 1 or 3 channels, got shape {image.shape}")
  if scale != 1:
    image = image * np.uint8(scale)
  return image.astype(np.uint8, copy=False)


@dataclasses.dataclass
class TfdsSource:
  """A random-access source of {'image': uint8 [H, W, 3], 'label': int} over a TFDS data source.

  Attributes:
    data_source: the TFDS data source (already sliced to the split).
    label_fn: raw record -> int.
    num_classes: number of classes.
    image_key: the feature holding the image.
    image_scale: pixel multiplier (255 for dSprites' 0/1 images).
    description: 'task/split: tfds split string', for logs.
    label_source: the same split read without decoding images, for labels(); None: read
      labels through data_source.
  """
  data_source: Any
  label_fn: Callable[[Mapping[str, Any]], int]
  num_classes: int
  image_key: str = "image"
  image_scale: int = 1
  description: str = ""
  label_source: Any = None

  def labels(self) -> np.ndarray:
    """All labels, int64 [N], read from `label_source` (the split without image decoding)."""
    source = self.label_source if self.label_source is not None else self.data_source
    labels = np.empty(len(source), np.int64)
    for start in range(0, len(labels), _LABEL_CHUNK):
      records = source.__getitems__(list(range(start, min(start + _LABEL_CHUNK, len(labels)))))
      labels[start:start + len(records)] = [self.label_fn(r) for r in records]
    return labels

  def __len__(self) -> int:
    return len(self.data_source)

  def _convert(self, record: Mapping[str, Any]) -> dict[str, Any]:
    return {"image": to_rgb(record[self.image_key], self.image_scale),
            "label": int(self.label_fn(record))}

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._convert(self.data_source[index])

  def __getitems__(self, indices) -> list[dict[str, Any]]:
    return [self._convert(r) for r in self.data_source.__getitems__(list(indices))]


def prepare_command(task: str, data_dir: str | None) -> str:
  """The shell command that prepares `task` into data_dir."""
  return f"python -m jvt.data.prepare {task} --data_dir={data_dir or '<data_dir>'}"


def make_source(task: str, split: str, data_dir: str | None) -> TfdsSource:
  """The VTAB-1k `split` ('train800', 'val200', 'train800val200', 'test') of `task`.

  Reads the TFDS builder prepared in data_dir (array_record; no TensorFlow needed), renders the
  split arithmetic against the size of its `train` split and applies the task's label function.
  """
  spec = get_task(task)
  spec.slices(split)  # validates the split name before touching the disk
  builder = open_prepared_builder(spec.builder_specs, data_dir, prepare_command(task, data_dir))
  sizes = {name: info.num_examples for name, info in builder.info.splits.items()}
  split_string = spec.split_string(split, sizes)
  return TfdsSource(
      data_source=open_data_source(builder, split_string),
      label_fn=LABEL_FUNCTIONS[spec.label_fn],
      num_classes=spec.num_classes,
      image_scale=spec.image_scale,
      description=f"{task}/{split}: {builder.name}:{builder.version} {split_string}",
      label_source=open_data_source(builder, split_string, decode_image=None))
