"""Random-access data sources: `get_source(ds_cfg, split)` for every dataset name jvt accepts.

A Source is any object with `__len__`, `__getitem__(i) -> {"image": uint8 [H, W, 3],
"label": int}` and `num_classes: int`; `__getitem__` is called from several threads. A source
may also offer its labels without decoding images, as a `labels()` method returning int64 [N]
or a `labels` sequence; the class-balanced sampler uses them when present.

Accepted `ds_cfg.name` forms:
  jvt_synthetic             the synthetic demo set (`ds_cfg.task` picks the label feature)
  tfds:<builder>            any TFDS dataset prepared as array_record, e.g. "tfds:cifar100:3.*.*";
                            `split` is a TFDS split string (arithmetic allowed)
  vtab/<task>               VTAB-1k task (jvt.data.vtab), split train800|val200|train800val200|test
  fgvc/<task>               FGVC task (jvt.data.fgvc)
  list:<root dir>           images with list files `<split>.txt` of `path label` lines, any
                            split name (jvt.data.lists)
  folder:<dir>              class-per-folder images: <dir>/<split>/<class>/ or <dir>/<class>/
                            with split `all[:80%]`-style ratios (jvt.data.folders)
"""

from __future__ import annotations

from typing import Any, Optional, Protocol

import numpy as np
import tensorflow_datasets as tfds

from jvt.data import preprocess

_LABEL_CHUNK = 1024  # records per read when collecting labels
ACCEPTED_NAMES = ("jvt_synthetic", "tfds:<builder[/config][:version]>", "vtab/<task>",
                  "fgvc/<task>", "list:<root dir>", "folder:<dir>")


class Source(Protocol):
  """Host-side random access to (image, label) examples of one split."""
  num_classes: int

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> dict:  # {"image": uint8 [H, W, 3], "label": int}
    ...


class TfdsSource:
  """A TFDS array_record split as a Source.

  Image features other than `image_key` are left encoded, since only the image and label are
  returned.
  """

  def __init__(self, builder: tfds.core.DatasetBuilder, split: str, *, label_key: str,
               image_key: str = "image", num_classes: Optional[int] = None):
    features = builder.info.features
    for key in (image_key, label_key):
      if key not in features:
        raise ValueError(f"{builder.info.full_name} has no feature {key!r}; it has "
                         f"{sorted(features.keys())}.")
    label_feature = features[label_key]
    if num_classes is None:
      if not isinstance(label_feature, tfds.features.ClassLabel):
        raise ValueError(f"Feature {label_key!r} of {builder.info.full_name} is not a "
                         "ClassLabel: set ds_cfg.num_classes.")
      num_classes = label_feature.num_classes
    self.num_classes = int(num_classes)
    self.split = split
    self._image_key = image_key
    self._label_key = label_key
    other_images = {k: tfds.decode.SkipDecoding() for k, f in features.items()
                    if isinstance(f, tfds.features.Image) and k != image_key}
    self._builder = builder
    self._other_images = other_images
    self._data = builder.as_data_source(split, decoders=other_images or None)

  def __len__(self) -> int:
    return len(self._data)

  def __getitem__(self, index: int) -> dict:
    example = self._data[index]
    return {"image": preprocess.to_rgb(example[self._image_key]),
            "label": int(example[self._label_key])}

  def labels(self) -> np.ndarray:
    """All labels of the split, int64 [N], read without decoding images."""
    skip_all = {**self._other_images, self._image_key: tfds.decode.SkipDecoding()}
    undecoded = self._builder.as_data_source(self.split, decoders=skip_all)
    labels = np.empty(len(undecoded), np.int64)
    for start in range(0, len(labels), _LABEL_CHUNK):
      stop = min(start + _LABEL_CHUNK, len(labels))
      chunk = undecoded.__getitems__(list(range(start, stop)))
      labels[start:start + len(chunk)] = [int(r[self._label_key]) for r in chunk]
    return labels


class CachedSource:
  """Keeps each example of `source` in memory after its first read.

  For small splits read many times (VTAB-1k, the synthetic set): later epochs skip record
  parsing and image decoding. Memory grows to the decoded size of the split.
  """

  def __init__(self, source: Source):
    self.source = source
    self.num_classes = source.num_classes
    self._cache: dict = {}

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict:
    example = self._cache.get(index)
    if example is None:
      example = self._cache[index] = self.source[index]
    return example

  def labels(self) -> np.ndarray:
    """Labels int64 [N]: the source's fast path if it has one, else read (and cached)."""
    labels = known_labels(self.source)
    if labels is None:
      labels = np.asarray([self[i]["label"] for i in range(len(self))], np.int64)
    return labels


def known_labels(source: Source) -> Optional[np.ndarray]:
  """All labels int64 [N] when `source` offers them without decoding images, else None.

  Recognises a `labels()` method (TfdsSource, CachedSource) or a `labels` sequence attribute
  (e.g. list-file sources).
  """
  labels = getattr(source, "labels", None)
  if labels is None:
    return None
  return np.asarray(labels() if callable(labels) else labels, np.int64)


def _get(cfg: Any, key: str, default: Any = None) -> Any:
  """cfg[key] for a dict or ConfigDict; `default` when the key is missing or None."""
  value = cfg.get(key)
  return default if value is None else value


def _tfds_builder(name: str, data_dir: Optional[str], how_to_prepare: str):
  """The prepared array_record builder `name`, or FileNotFoundError saying what to do."""
  where = f"data_dir={data_dir!r}"
  if not data_dir:
    where += f" (TFDS default {tfds.core.constants.DATA_DIR})"
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise FileNotFoundError(f"TFDS dataset {name!r} was not found in {where}. "
                            f"{how_to_prepare}") from e
  if not builder.is_prepared():
    raise FileNotFoundError(f"TFDS dataset {builder.info.full_name!r} is not prepared: looked "
                            f"in {builder.data_dir} ({where}). {how_to_prepare}")
  if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise FileNotFoundError(
        f"{builder.info.full_name!r} in {builder.data_dir} is stored as "
        f"{builder.info.file_format.value}, but jvt reads array_record without TensorFlow. "
        f"{how_to_prepare}")
  return builder


def _synthetic_source(ds_cfg: Any, split: str) -> TfdsSource:
  from jvt.data import synthetic  # pylint: disable=g-import-not-at-top
  task = _get(ds_cfg, "task", "shape")
  if task not in synthetic.TASKS:
    raise ValueError(f"Unknown jvt_synthetic task {task!r}; "
                     f"choose one of {list(synthetic.TASKS)}.")
  data_dir = _get(ds_cfg, "data_dir")
  how = ("Build it with `python -m jvt.data.synthetic --data_dir=DIR` or "
         "`jvt.data.synthetic.build_synthetic(DIR)`.")
  builder = _tfds_builder(synthetic.NAME, data_dir, how)
  return TfdsSource(builder, split, label_key=task)


def _declared_classes(ds_cfg: Any) -> Optional[int]:
  """config's dataset.num_classes when set (> 0); None (from the data) for the -1 default."""
  value = _get(ds_cfg, "num_classes")
  return int(value) if value is not None and int(value) > 0 else None


def _generic_tfds_source(builder_name: str, ds_cfg: Any, split: str) -> TfdsSource:
  data_dir = _get(ds_cfg, "data_dir")
  how = (f"Prepare it as array_record, e.g. `tfds build {builder_name.split(':')[0]} "
         f"--data_dir=DIR --file_format=array_record` (the download may need TensorFlow: run "
         "it where TF is installed and copy the files), or see `python -m jvt.data.prepare`.")
  builder = _tfds_builder(builder_name, data_dir, how)
  return TfdsSource(builder, split, label_key=_get(ds_cfg, "label_key", "label"),
                    image_key=_get(ds_cfg, "image_key", "image"),
                    num_classes=_declared_classes(ds_cfg))


def get_source(ds_cfg: Any, split: str) -> Source:
  """Returns the Source for `ds_cfg.name` and `split` (see the module docstring).

  Args:
    ds_cfg: ConfigDict or dict with `name`, `data_dir` (None: TFDS default), optional
      `cache` (keep decoded examples in memory, see CachedSource), and per kind `task`
      (jvt_synthetic), `label_key` / `image_key` / `num_classes` (tfds:).
    split: split name or TFDS split string.
  Raises:
    ValueError: unknown name form or task.
    FileNotFoundError: the dataset is not prepared; the message says where it looked and how
      to prepare it.
  """
  source = _uncached_source(ds_cfg, split)
  return CachedSource(source) if _get(ds_cfg, "cache", False) else source


def _uncached_source(ds_cfg: Any, split: str) -> Source:
  name = _get(ds_cfg, "name")
  if not isinstance(name, str) or not name:
    raise ValueError(f"ds_cfg.name must be a non-empty string; "
                     f"accepted forms: {ACCEPTED_NAMES}.")
  data_dir = _get(ds_cfg, "data_dir")
  if name == "jvt_synthetic":
    return _synthetic_source(ds_cfg, split)
  if name.startswith("tfds:") and len(name) > len("tfds:"):
    return _generic_tfds_source(name[len("tfds:"):], ds_cfg, split)
  if name.startswith("vtab/") and len(name) > len("vtab/"):
    from jvt.data import vtab  # pylint: disable=g-import-not-at-top
    return vtab.make_source(name[len("vtab/"):], split, data_dir)
  if name.startswith("fgvc/") and len(name) > len("fgvc/"):
    from jvt.data import fgvc  # pylint: disable=g-import-not-at-top
    return fgvc.make_source(name[len("fgvc/"):], split, data_dir)
  if name.startswith("list:") and len(name) > len("list:"):
    from jvt.data import lists  # pylint: disable=g-import-not-at-top
    return lists.make_source(name[len("list:"):], split, _declared_classes(ds_cfg))
  if name.startswith("folder:") and len(name) > len("folder:"):
    from jvt.data import folders  # pylint: disable=g-import-not-at-top
    return folders.make_source(name[len("folder:"):], split, _declared_classes(ds_cfg))
  raise ValueError(f"Unknown dataset name {name!r}; accepted forms: {ACCEPTED_NAMES}.")
