"""Prepares the TFDS datasets of VTAB-1k / FGVC tasks in array_record format.

  python -m jvt.data.prepare <vtab task | fgvc task | all-vtab | all-fgvc> --data_dir=DIR \
      [--manual_dir=DIR]

Runs each builder's `download_and_prepare(file_format="array_record")`, after checking what the
builder needs (TensorFlow, optional Python modules, manually downloaded files). Everything that
is missing is printed at once and the command exits with status 2; nothing is downloaded then.
Datasets already prepared in data_dir are skipped.

TFDS builders themselves run TensorFlow while preparing (file access through tf.io.gfile, PNG
encoding of decoded images), so preparation needs an environment with TensorFlow; reading the
prepared array_record files afterwards does not (jvt.data.vtab / jvt.data.fgvc).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys
from typing import Callable, Sequence

from jvt.data import fgvc
from jvt.data import vtab

_NABIRDS_URL = "https://dl.allaboutbirds.org/nabirds"


@dataclasses.dataclass(frozen=True)
class BuilderNeeds:
  """What preparing one TFDS builder needs besides network access.

  Attributes:
    modules: (import name, pip package) pairs the builder imports lazily.
    manual_paths: paths below manual_dir that must exist before preparation.
    manual_instructions: how to obtain them ({manual_dir} is filled in).
  """
  modules: tuple[tuple[str, str], ...] = ()
  manual_paths: tuple[str, ...] = ()
  manual_instructions: str = ""


# Keyed by TFDS builder name (config stripped); facts from tensorflow_datasets 4.9 sources.
BUILDER_NEEDS: dict[str, BuilderNeeds] = {
    "oxford_flowers102": BuilderNeeds(modules=(("scipy", "scipy"),)),
    "svhn_cropped": BuilderNeeds(modules=(("scipy", "scipy"),)),
    "sun397": BuilderNeeds(modules=(("cv2", "opencv-python"),)),
    "patch_camelyon": BuilderNeeds(modules=(("h5py", "h5py"),)),
    "resisc45": BuilderNeeds(
        manual_paths=("NWPU-RESISC45",),
        manual_instructions=(
            "resisc45 needs a manual download: get NWPU-RESISC45.rar from "
            "https://1drv.ms/u/s!AmgKYzARBl5ca3HNaHIlzp_IXjs (linked from "
            "http://www.escience.cn/people/JunweiHan/NWPU-RESISC45.html) and extract it so that "
            "{manual_dir}/NWPU-RESISC45/<class name>/<image>.jpg exist")),
    "diabetic_retinopathy_detection": BuilderNeeds(
        modules=(("cv2", "opencv-python"),),
        manual_paths=("train", "test", "sample", "trainLabels.csv"),
        manual_instructions=(
            "retinopathy needs a manual download from Kaggle: get the data of "
            "https://www.kaggle.com/c/diabetic-retinopathy-detection/data and unpack it into "
            "{manual_dir} as train/ (train.zip.*), test/ (test.zip.*), sample/ (sample.zip) "
            "and trainLabels.csv")),
    "kitti": BuilderNeeds(modules=(("cv2", "opencv-python"),)),
    "dsprites": BuilderNeeds(modules=(("h5py", "h5py"),)),
    "caltech_birds2011": BuilderNeeds(modules=(("cv2", "opencv-python"), ("scipy", "scipy"))),
    "stanford_dogs": BuilderNeeds(modules=(("scipy", "scipy"),)),
    "cars196": BuilderNeeds(modules=(("scipy", "scipy"),)),
}


@dataclasses.dataclass(frozen=True)
class Target:
  """One TFDS builder to prepare, with the tasks that read it."""
  tasks: tuple[str, ...]
  tfds_name: str
  versions: tuple[str, ...]

  @property
  def specs(self) -> tuple[str, ...]:
    return tuple(f"{self.tfds_name}:{v}" for v in self.versions)

  @property
  def needs(self) -> BuilderNeeds:
    return BUILDER_NEEDS.get(self.tfds_name.split("/")[0], BuilderNeeds())


def resolve_targets(name: str) -> list[Target]:
  """CLI name -> builders to prepare (tasks sharing a builder are merged).

  FGVC tasks without a TFDS builder (nabirds) come back with tfds_name ''.
  """
  if name == "all-vtab":
    tasks = [(t, t.tfds_name, t.versions) for t in vtab.VTAB_TASKS.values()]
  elif name == "all-fgvc":
    tasks = [(t, t.tfds_name or "", t.tfds_versions) for t in fgvc.FGVC_TASKS.values()]
  elif name in vtab.VTAB_TASKS:
    t = vtab.VTAB_TASKS[name]
    tasks = [(t, t.tfds_name, t.versions)]
  elif name in fgvc.FGVC_TASKS:
    t = fgvc.FGVC_TASKS[name]
    tasks = [(t, t.tfds_name or "", t.tfds_versions)]
  else:
    raise ValueError(
        f"unknown task '{name}'; choose all-vtab, all-fgvc, a VTAB task "
        f"({', '.join(vtab.VTAB_TASKS)}) or an FGVC task ({', '.join(fgvc.FGVC_TASKS)})")
  merged: dict[str, Target] = {}
  for task, tfds_name, versions in tasks:
    key = tfds_name or task.name
    old = merged.get(key)
    merged[key] = Target((old.tasks if old else ()) + (task.name,), tfds_name, versions)
  return list(merged.values())


def module_installed(module: str) -> bool:
  """True when `module` can be imported (without importing it)."""
  return importlib.util.find_spec(module) is not None


def missing_requirements(target: Target, manual_dir: str,
                         has_module: Callable[[str], bool] | None = None) -> list[str]:
  """Human-readable list of what is missing to prepare `target` (empty when all is there).

  TensorFlow is reported once for all targets by tensorflow_problem.
  """
  has_module = has_module or module_installed
  if not target.tfds_name:
    return [f"{target.tasks[0]} is not in TFDS: download NABirds from {_NABIRDS_URL}, put VPT's "
            "train.json, val.json and test.json split files in the dataset root (images under "
            "<root>/images) and read it with jvt.data.fgvc.make_source(..., data_dir=<root>); "
            "there is nothing to prepare"]
  problems = []
  name = "/".join(target.tasks)
  for module, package in target.needs.modules:
    if not has_module(module):
      problems.append(f"{name}: the builder imports {module}: pip install {package}")
  absent = [p for p in target.needs.manual_paths if not os.path.exists(os.path.join(manual_dir, p))]
  if absent:
    problems.append(
        target.needs.manual_instructions.format(manual_dir=manual_dir)
        + f" (missing: {', '.join(os.path.join(manual_dir, p) for p in absent)})")
  return problems


def tensorflow_problem(targets: Sequence[Target],
                       has_module: Callable[[str], bool] | None = None) -> list[str]:
  """The missing-TensorFlow problem of the TFDS targets (every TFDS builder needs it)."""
  has_module = has_module or module_installed
  names = ["/".join(t.tasks) for t in targets if t.tfds_name]
  if not names or has_module("tensorflow"):
    return []
  return [f"TensorFlow, which TFDS builders run while preparing (tf.io.gfile file access, PNG "
          f"encoding of decoded images), is not installed here; needed for: {', '.join(names)}. "
          "Run this same command in an environment with `pip install tensorflow-cpu "
          "tensorflow-datasets` and use the prepared --data_dir from here (reading needs no "
          "TensorFlow), or use the jpg list format (jvt.data.lists)"]


def _prepared_builder(target: Target, data_dir: str):
  """The prepared builder of target in data_dir, or None."""
  try:
    return vtab.open_prepared_builder(target.specs, data_dir, "")
  except FileNotFoundError:
    return None


def _code_builder(target: Target, data_dir: str):
  """The TFDS builder (from code) of the first version pattern this TFDS release can build."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  errors = []
  for spec in target.specs:
    try:
      return tfds.builder(spec, data_dir=data_dir, file_format="array_record")
    except (AssertionError, ValueError) as e:
      errors.append(f"{spec}: {e}")
  raise ValueError(f"this TFDS release cannot build {' or '.join(target.specs)}: "
                   + "; ".join(errors))


def prepare(target: Target, data_dir: str, manual_dir: str) -> None:
  """download_and_prepare of one target in array_record format."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  builder = _code_builder(target, data_dir)
  builder.download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry point; returns the exit status (0 ok, 1 preparation failed, 2 user error)."""
  parser = argparse.ArgumentParser(
      prog="python -m jvt.data.prepare",
      description="Prepare VTAB-1k / FGVC TFDS datasets in array_record format.")
  parser.add_argument("task", help="a VTAB or FGVC task, all-vtab or all-fgvc")
  parser.add_argument("--data_dir", required=True, help="TFDS data directory to write into")
  parser.add_argument("--manual_dir", default=None,
                      help="folder of manually downloaded files (default DATA_DIR/downloads/manual)")
  parser.add_argument("--traceback", action="store_true",
                      help="show the full traceback when a preparation fails")
  args = parser.parse_args(argv)
  manual_dir = args.manual_dir or os.path.join(args.data_dir, "downloads", "manual")
  try:
    targets = resolve_targets(args.task)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2

  todo, problems = [], []
  for target in targets:
    if not target.tfds_name:  # nabirds: nothing to prepare
      [note] = missing_requirements(target, manual_dir)
      if len(targets) == 1:
        problems.append(note)
      else:
        print(f"note: {note}")
      continue
    builder = _prepared_builder(target, args.data_dir)
    if builder is not None:
      formats = {getattr(f, "value", f) for f in builder.info.available_file_formats()}
      if formats & {"array_record", "parquet"}:
        print(f"{'/'.join(target.tasks)}: {builder.name} {builder.version} already prepared in "
              f"{builder.data_dir}")
      else:
        problems.append(
            f"{'/'.join(target.tasks)}: {builder.data_dir} holds {sorted(formats)} files, which "
            "have no random access without TensorFlow: convert them where TensorFlow is "
            "installed with `tfds convert_format --dataset_version_dir="
            f"{builder.data_dir} --out_file_format=array_record`, or use another --data_dir")
      continue
    problems.extend(missing_requirements(target, manual_dir))
    todo.append(target)
  problems = tensorflow_problem(todo) + problems
  if problems:
    print("Cannot prepare, missing:", file=sys.stderr)
    for problem in problems:
      print(f"  - {problem}", file=sys.stderr)
    return 2

  failed = []
  for target in todo:
    print(f"{'/'.join(target.tasks)}: preparing {' or '.join(target.specs)} in {args.data_dir}")
    try:
      prepare(target, args.data_dir, manual_dir)
    except Exception as e:  # pylint: disable=broad-except  # report, go on with the others
      if args.traceback:
        raise
      failed.append(f"{'/'.join(target.tasks)}: {type(e).__name__}: {e}")
  for failure in failed:
    print(f"error: preparing {failure} (rerun with --traceback for details)", file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
