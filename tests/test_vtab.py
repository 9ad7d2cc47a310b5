"""VTAB-1k task table, split arithmetic, label functions and TFDS reading (no TensorFlow).

The TFDS fixtures are written by small builders declared with skip_registration=True under the
real builder names and versions, in array_record format, then read back by the unmodified
`tfds.builder('<name>:<pattern>', data_dir=...)` inside jvt.data.vtab.make_source. Every image
carries its example id in its pixels, so the tests check exactly which examples each split
holds against slices of the full TFDS split computed here by hand.
"""
import io

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
from PIL import Image  # pylint: disable=g-import-not-at-top

from jvt.data import prepare  # pylint: disable=g-import-not-at-top
from jvt.data import vtab

# --------------------------------------------------------------------------------------------
# The task table against an independent transcription of FORMATS.md.

EXPECTED = {  # task: (tfds name, group, classes)
    "cifar100": ("cifar100", "natural", 100), "caltech101": ("caltech101", "natural", 102),
    "dtd": ("dtd", "natural", 47), "flowers102": ("oxford_flowers102", "natural", 102),
    "pets": ("oxford_iiit_pet", "natural", 37), "svhn": ("svhn_cropped", "natural", 10),
    "sun397": ("sun397/tfds", "natural", 397),
    "patch_camelyon": ("patch_camelyon", "specialized", 2),
    "eurosat": ("eurosat/rgb", "specialized", 10), "resisc45": ("resisc45", "specialized", 45),
    "retinopathy": ("diabetic_retinopathy_detection/btgraham-300", "specialized", 5),
    "clevr_count": ("clevr", "structured", 8), "clevr_dist": ("clevr", "structured", 6),
    "dmlab": ("dmlab", "structured", 6), "kitti_dist": ("kitti", "structured", 4),
    "dsprites_loc": ("dsprites", "structured", 16), "dsprites_ori": ("dsprites", "structured", 16),
    "smallnorb_azi": ("smallnorb", "structured", 18),
    "smallnorb_ele": ("smallnorb", "structured", 9),
}


def test_task_table():
  assert set(vtab.VTAB_TASKS) == set(EXPECTED)
  for name, (tfds_name, group, classes) in EXPECTED.items():
    t = vtab.VTAB_TASKS[name]
    assert (t.tfds_name, t.group, t.num_classes) == (tfds_name, group, classes), name
  assert [len(v) for v in vtab.VTAB_GROUPS.values()] == [7, 4, 8]
  assert list(vtab.VTAB_TASKS)[:7] == list(vtab.VTAB_GROUPS["natural"])
  assert vtab.VTAB_TASKS["dmlab"].builder_specs == ("dmlab:2.0.1",)
  assert vtab.VTAB_TASKS["pets"].builder_specs == ("oxford_iiit_pet:3.*.*",
                                                    "oxford_iiit_pet:4.*.*")


# Split strings for the real split sizes, computed by hand from FORMATS.md.
REAL_SPLITS = [
    ("cifar100", {"train": 50000, "test": 10000},
     ["train[0:800]", "train[45000:45200]", "train[0:800]+train[45000:45200]", "test"]),
    ("caltech101", {"train": 3060, "test": 6084},
     ["train[0:800]", "train[2754:2954]", "train[0:800]+train[2754:2954]", "test"]),
    ("pets", {"train": 3680, "test": 3669},
     ["train[0:800]", "train[2944:3144]", "train[0:800]+train[2944:3144]", "test"]),
    ("dtd", {"train": 1880, "validation": 1880, "test": 1880},
     ["train[0:800]", "validation[0:200]", "train[0:800]+validation[0:200]", "test"]),
    ("eurosat", {"train": 27000},
     ["train[0:800]", "train[16200:16400]", "train[0:800]+train[16200:16400]", "train[21600:]"]),
    ("resisc45", {"train": 31500},
     ["train[0:800]", "train[18900:19100]", "train[0:800]+train[18900:19100]", "train[25200:]"]),
    ("clevr_dist", {"train": 70000, "validation": 15000, "test": 15000},
     ["train[0:800]", "train[63000:63200]", "train[0:800]+train[63000:63200]", "validation"]),
    ("dsprites_ori", {"train": 737280},
     ["train[0:800]", "train[589824:590024]", "train[0:800]+train[589824:590024]",
      "train[663552:]"]),
    ("smallnorb_ele", {"train": 24300, "test": 24300},
     ["train[0:800]", "test[0:200]", "train[0:800]+test[0:200]", "test[12150:]"]),
]


@pytest.mark.parametrize("task,sizes,expected", REAL_SPLITS)
def test_split_strings_on_real_sizes(task, sizes, expected):
  got = [vtab.VTAB_TASKS[task].split_string(s, sizes) for s in vtab.SPLITS]
  assert got == expected


def test_split_errors():
  with pytest.raises(ValueError, match="runs past the end"):
    vtab.VTAB_TASKS["cifar100"].split_string("val200", {"train": 1000, "test": 10})
  with pytest.raises(ValueError, match="no 'validation' split"):
    vtab.VTAB_TASKS["dtd"].split_string("val200", {"train": 1000, "test": 10})
  with pytest.raises(ValueError, match="unknown VTAB split 'train'.*train800val200"):
    vtab.make_source("dtd", "train", None)
  with pytest.raises(ValueError, match="unknown VTAB-1k task 'cifar10'.*smallnorb_ele"):
    vtab.make_source("cifar10", "test", None)


# --------------------------------------------------------------------------------------------
# Label functions against hand-computed cases.

@pytest.mark.parametrize("depths,expected", [
    ([7.0], 0), ([8.0], 0), ([8.0001], 1), ([8.5], 1), ([8.75, 12.0], 2), ([9.2], 3),
    ([11.0, 9.6], 4), ([10.0], 4), ([10.5, 30.0], 5), ([99.0], 5)])
def test_clevr_distance_label(depths, expected):
  record = {"objects": {"pixel_coords": [np.array([1.0, 2.0, d], np.float32) for d in depths],
                        "size": [0] * len(depths)}}
  assert vtab.label_clevr_closest_distance(record) == expected


def test_clevr_count_label():
  for n in range(3, 11):
    assert vtab.label_clevr_count({"objects": {"size": [1] * n}}) == n - 3


@pytest.mark.parametrize("objects,expected", [
    ([], 3),                                # no object: distance 1000
    ([(3, 5.0)], 3),                        # a pedestrian only
    ([(0, 5.0)], 0),                        # car at 5 m
    ([(1, 8.0)], 0),                        # van exactly at 8 m: bin [-100, 8]
    ([(2, 15.0), (0, 30.0)], 1),            # closest vehicle is the truck at 15 m
    ([(0, 25.0), (5, 1.0)], 2),             # a cyclist closer than the car is ignored
    ([(0, 20.0)], 1), ([(7, 3.0), (6, 4.0), (0, 998.0)], 2)])
def test_kitti_distance_label(objects, expected):
  record = {"objects": {"type": [t for t, _ in objects],
                        "location": [np.array([0.0, 1.0, z], np.float32) for _, z in objects]}}
  assert vtab.label_kitti_closest_vehicle_distance(record) == expected


@pytest.mark.parametrize("x,expected", [(0, 0), (1, 0), (2, 1), (17, 8), (31, 15)])
def test_dsprites_location_label(x, expected):
  assert vtab.label_dsprites_x_position({"label_x_position": x}) == expected


@pytest.mark.parametrize("o,expected", [(0, 0), (2, 0), (3, 1), (5, 2), (24, 9), (39, 15)])
def test_dsprites_orientation_label(o, expected):
  # 40 orientations into 16 bins: floor(o / 2.5)
  assert vtab.label_dsprites_orientation({"label_orientation": o}) == expected


def test_smallnorb_labels():
  record = {"label_azimuth": 17, "label_elevation": 8, "label_category": 2}
  assert vtab.label_smallnorb_azimuth(record) == 17
  assert vtab.label_smallnorb_elevation(record) == 8


# --------------------------------------------------------------------------------------------
# TFDS fixtures under the real names, read back by make_source.

SPLIT_OFFSET = {"train": 0, "validation": 20000, "test": 40000}
CLEVR_DEPTHS = [(7.0, 0), (8.25, 1), (8.75, 2), (9.25, 3), (9.75, 4), (10.5, 5)]
KITTI_CASES = [([], 3), ([(0, 5.0)], 0), ([(2, 15.0), (0, 30.0)], 1), ([(0, 25.0), (5, 1.0)], 2)]


def _png(array):
  buffer = io.BytesIO()
  Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(buffer, "PNG")
  return buffer.getvalue()


def _rgb_image(k):
  """4x4 RGB whose first pixel holds k (low byte, high byte)."""
  a = np.full((4, 4, 3), 7, np.uint8)
  a[0, 0, :2] = [k % 256, k // 256]
  return _png(a)


def _gray_image(k):
  a = np.full((4, 4, 1), 9, np.uint8)
  a[0, 0, 0], a[0, 1, 0] = k % 256, k // 256
  return _png(a)


def _bits_image(k):
  """4x4x1 image of 0/1 pixels spelling k in binary (as dSprites stores 0/1 pixels)."""
  return _png(((k >> np.arange(16)) & 1).astype(np.uint8).reshape(4, 4, 1))


def decode_id(image, kind):
  """Inverse of the encoders above, applied to a source's uint8 [H, W, 3] output."""
  assert image.dtype == np.uint8 and image.shape == (4, 4, 3)
  if kind == "rgb":
    return int(image[0, 0, 0]) + 256 * int(image[0, 0, 1])
  assert (image == image[..., :1]).all()  # gray tiled to 3 identical channels
  if kind == "gray":
    return int(image[0, 0, 0]) + 256 * int(image[0, 1, 0])
  assert set(np.unique(image)) <= {0, 255}  # 0/1 pixels scaled by 255
  bits = image[..., 0].reshape(-1) // 255
  return int((bits.astype(np.int64) << np.arange(16)).sum())


def _examples(kind, split, n, extra):
  image = {"rgb": _rgb_image, "gray": _gray_image, "bits": _bits_image}[kind]
  for i in range(n):
    k = SPLIT_OFFSET[split] + i
    yield f"{split}_{i:05d}", {"image": image(k), "example_id": k, **extra(k)}


def _build(data_dir, builder_name, version, features, split_sizes, kind, extra, config=None):
  """Writes a tiny array_record dataset under a real TFDS name/version into data_dir."""

  class Fixture(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A tiny dataset under a real TFDS name."""
    name = builder_name
    if config:
      BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=config, version=version)]
    else:
      VERSION = tfds.core.Version(version)

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {**features, "example_id": tfds.features.Scalar(np.int64)}))

    def _split_generators(self, dl_manager):
      return {s: self._generate_examples(s) for s in split_sizes}

    def _generate_examples(self, split):
      return _examples(kind, split, split_sizes[split], extra)

  kwargs = {"config": config} if config else {}
  Fixture(data_dir=data_dir, file_format="array_record", **kwargs).download_and_prepare()


def _label(k):
  return {"label": k % 10}


def _clevr_objects(k):
  depth = CLEVR_DEPTHS[k % len(CLEVR_DEPTHS)][0]
  n = 3 + k % 8
  return {"objects": [{"size": j % 2, "pixel_coords": [1.0, 2.0, depth + (j + 1) * (j > 0)]}
                      for j in reversed(range(n))]}


def _kitti_objects(k):
  return {"objects": [{"type": t, "location": [0.0, 1.0, z]}
                      for t, z in KITTI_CASES[k % len(KITTI_CASES)][0]]}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("tfds"))
  f = tfds.features
  rgb, gray = f.Image(shape=(4, 4, 3)), f.Image(shape=(4, 4, 1))
  _build(root, "cifar100", "3.0.2",
         {"image": rgb, "label": f.ClassLabel(num_classes=100)},
         {"train": 2000, "test": 50}, "rgb", lambda k: {"label": k % 100})
  _build(root, "dtd", "3.0.1", {"image": rgb, "label": f.ClassLabel(num_classes=47)},
         {"train": 850, "validation": 230, "test": 40}, "rgb", lambda k: {"label": k % 47})
  _build(root, "eurosat", "2.0.0", {"image": rgb, "label": f.ClassLabel(num_classes=10)},
         {"train": 2000}, "rgb", _label, config="rgb")
  _build(root, "oxford_iiit_pet", "4.0.0", {"image": rgb, "label": f.ClassLabel(num_classes=37)},
         {"train": 1000, "test": 30}, "rgb", lambda k: {"label": k % 37})
  _build(root, "dsprites", "2.0.0",
         {"image": gray, "label_x_position": f.ClassLabel(num_classes=32),
          "label_orientation": f.ClassLabel(num_classes=40)},
         {"train": 2000}, "bits",
         lambda k: {"label_x_position": k % 32, "label_orientation": k % 40})
  _build(root, "smallnorb", "2.0.0",
         {"image": gray, "label_azimuth": f.ClassLabel(num_classes=18),
          "label_elevation": f.ClassLabel(num_classes=9)},
         {"train": 850, "test": 500}, "gray",
         lambda k: {"label_azimuth": k % 18, "label_elevation": k % 9})
  _build(root, "clevr", "3.1.0",
         {"image": rgb, "objects": f.Sequence({
             "size": f.ClassLabel(names=["small", "large"]),
             "pixel_coords": f.Tensor(shape=(3,), dtype=np.float32)})},
         {"train": 2000, "validation": 40}, "rgb", _clevr_objects)
  _build(root, "kitti", "3.3.0",
         {"image": rgb, "objects": f.Sequence({
             "type": f.ClassLabel(num_classes=8),
             "location": f.Tensor(shape=(3,), dtype=np.float32)})},
         {"train": 850, "validation": 210, "test": 20}, "rgb", _kitti_objects)
  return root


# task: (tfds spec, image kind, split -> list of (split, slice) of the full TFDS splits)
FIXTURE_SPLITS = {
    "cifar100": ("cifar100:3.*.*", "rgb", {
        "train800": [("train", slice(0, 800))], "val200": [("train", slice(1800, 2000))],
        "test": [("test", slice(None))]}),
    "dtd": ("dtd:3.*.*", "rgb", {
        "train800": [("train", slice(0, 800))], "val200": [("validation", slice(0, 200))],
        "test": [("test", slice(None))]}),
    "eurosat": ("eurosat/rgb:2.*.*", "rgb", {
        "train800": [("train", slice(0, 800))], "val200": [("train", slice(1200, 1400))],
        "test": [("train", slice(1600, None))]}),
    "pets": ("oxford_iiit_pet:4.*.*", "rgb", {
        "train800": [("train", slice(0, 800))], "val200": [("train", slice(800, 1000))],
        "test": [("test", slice(None))]}),
    "dsprites_loc": ("dsprites:2.*.*", "bits", {
        "train800": [("train", slice(0, 800))], "val200": [("train", slice(1600, 1800))],
        "test": [("train", slice(1800, None))]}),
    "dsprites_ori": ("dsprites:2.*.*", "bits", {
        "train800": [("train", slice(0, 800))], "val200": [("train", slice(1600, 1800))],
        "test": [("train", slice(1800, None))]}),
    "smallnorb_azi": ("smallnorb:2.*.*", "gray", {
        "train800": [("train", slice(0, 800))], "val200": [("test", slice(0, 200))],
        "test": [("test", slice(250, None))]}),
    "smallnorb_ele": ("smallnorb:2.*.*", "gray", {
        "train800": [("train", slice(0, 800))], "val200": [("test", slice(0, 200))],
        "test": [("test", slice(250, None))]}),
    "clevr_count": ("clevr:3.*.*", "rgb", {
        "train800": [("train", slice(0, 800))], "val200": [("train", slice(1800, 2000))],
        "test": [("validation", slice(None))]}),
    "clevr_dist": ("clevr:3.*.*", "rgb", {
        "train800": [("train", slice(0, 800))], "val200": [("train", slice(1800, 2000))],
        "test": [("validation", slice(None))]}),
    "kitti_dist": ("kitti:3.*.*", "rgb", {
        "train800": [("train", slice(0, 800))], "val200": [("validation", slice(0, 200))],
        "test": [("test", slice(None))]}),
}

# Expected label from the example id k, written out independently of the label functions.
EXPECTED_LABEL = {
    "cifar100": lambda k: k % 100, "dtd": lambda k: k % 47, "eurosat": lambda k: k % 10,
    "pets": lambda k: k % 37,
    "dsprites_loc": lambda k: (k % 32) // 2, "dsprites_ori": lambda k: int((k % 40) / 2.5),
    "smallnorb_azi": lambda k: k % 18, "smallnorb_ele": lambda k: k % 9,
    "clevr_count": lambda k: k % 8, "clevr_dist": lambda k: CLEVR_DEPTHS[k % 6][1],
    "kitti_dist": lambda k: KITTI_CASES[k % 4][1],
}


@pytest.fixture(scope="module")
def stored_ids(data_dir):
  """Example ids of every full TFDS split in stored order, read with plain TFDS from the
  `example_id` feature (the images carry the same id, which the tests decode)."""
  ids = {}
  for spec, _, _ in FIXTURE_SPLITS.values():
    builder = tfds.builder(spec, data_dir=data_dir)
    for split in builder.info.splits:
      if (spec, split) not in ids:
        source = builder.as_data_source(split=split,
                                        decoders={"image": tfds.decode.SkipDecoding()})
        ids[(spec, split)] = [int(r["example_id"]) for r in
                              source.__getitems__(list(range(len(source))))]
  return ids


@pytest.mark.parametrize("task", list(FIXTURE_SPLITS))
def test_make_source_splits(task, data_dir, stored_ids):
  spec, kind, splits = FIXTURE_SPLITS[task]
  splits = dict(splits, train800val200=splits["train800"] + splits["val200"])
  for split, parts in splits.items():
    expected = [k for name, sl in parts for k in stored_ids[(spec, name)][sl]]
    source = vtab.make_source(task, split, data_dir)
    assert source.num_classes == vtab.VTAB_TASKS[task].num_classes
    assert len(source) == len(expected), (task, split)
    examples = [source[i] for i in range(len(source))]
    got = [decode_id(e["image"], kind) for e in examples]
    assert got == expected, (task, split)
    assert [e["label"] for e in examples] == [EXPECTED_LABEL[task](k) for k in got]
    assert all(0 <= e["label"] < source.num_classes for e in examples)
  np.testing.assert_array_equal(source.labels(), [e["label"] for e in examples])
  assert len(set(stored_ids[(spec, "train")])) == len(stored_ids[(spec, "train")])
  batch = source.__getitems__([2, 0])
  assert [decode_id(e["image"], kind) for e in batch] == [got[2], got[0]]


def test_split_sizes(data_dir):
  sizes = {s: len(vtab.make_source("cifar100", s, data_dir)) for s in vtab.SPLITS}
  assert sizes == {"train800": 800, "val200": 200, "train800val200": 1000, "test": 50}


def test_not_prepared_error(data_dir):
  with pytest.raises(FileNotFoundError) as e:
    vtab.make_source("svhn", "test", data_dir)
  message = str(e.value)
  assert "svhn_cropped:3.*.*" in message and data_dir in message
  assert f"python -m jvt.data.prepare svhn --data_dir={data_dir}" in message


# --------------------------------------------------------------------------------------------
# prepare: what is missing, without downloading anything.

def test_prepare_targets_merge_shared_builders():
  targets = prepare.resolve_targets("all-vtab")
  assert len(targets) == 16  # clevr, dsprites and smallnorb serve two tasks each
  clevr = [t for t in targets if t.tfds_name == "clevr"][0]
  assert clevr.tasks == ("clevr_count", "clevr_dist")
  with pytest.raises(ValueError, match="unknown task 'foo'.*all-vtab.*cifar100.*nabirds"):
    prepare.resolve_targets("foo")


def test_prepare_reports_what_is_missing(tmp_path):
  no_tf = lambda module: module != "tensorflow"
  [resisc] = prepare.resolve_targets("resisc45")
  [problem] = prepare.missing_requirements(resisc, str(tmp_path), has_module=no_tf)
  assert "NWPU-RESISC45.rar" in problem and str(tmp_path / "NWPU-RESISC45") in problem
  [problem] = prepare.tensorflow_problem(prepare.resolve_targets("all-fgvc"), no_tf)
  assert "TensorFlow" in problem and "is not installed" in problem
  assert "needed for: cub, flowers, dogs, cars." in problem  # nabirds has no TFDS builder
  assert prepare.tensorflow_problem([resisc], lambda m: True) == []
  (tmp_path / "NWPU-RESISC45").mkdir()
  assert prepare.missing_requirements(resisc, str(tmp_path), has_module=lambda m: True) == []
  [camelyon] = prepare.resolve_targets("patch_camelyon")
  assert prepare.missing_requirements(camelyon, str(tmp_path),
                                      has_module=lambda m: m != "h5py") == [
      "patch_camelyon: the builder imports h5py: pip install h5py"]


def test_prepare_cli(data_dir, tmp_path, capsys):
  assert prepare.main(["nosuchtask", f"--data_dir={tmp_path}"]) == 2
  assert "error: unknown task 'nosuchtask'" in capsys.readouterr().err
  assert prepare.main(["cifar100", f"--data_dir={data_dir}"]) == 0
  assert "already prepared" in capsys.readouterr().out
  assert prepare.main(["nabirds", f"--data_dir={tmp_path}"]) == 2
  assert "nabirds is not in TFDS" in capsys.readouterr().err
  status = prepare.main(["resisc45", f"--data_dir={tmp_path}", f"--manual_dir={tmp_path}/m"])
  err = capsys.readouterr().err
  assert status == 2 and "Traceback" not in err
  assert f"{tmp_path}/m/NWPU-RESISC45" in err


def test_prepare_cli_runs_and_reports_failures(tmp_path, monkeypatch, capsys):
  prepared = []
  monkeypatch.setattr(prepare, "module_installed", lambda module: True)
  monkeypatch.setattr(prepare, "prepare", lambda target, data_dir, manual_dir: prepared.append(
      (target.tasks, data_dir, manual_dir)))
  assert prepare.main(["clevr_dist", f"--data_dir={tmp_path}"]) == 0
  assert prepared == [(("clevr_dist",), str(tmp_path), f"{tmp_path}/downloads/manual")]

  def offline(target, data_dir, manual_dir):
    raise ConnectionError("no network")

  monkeypatch.setattr(prepare, "prepare", offline)
  assert prepare.main(["dtd", f"--data_dir={tmp_path}"]) == 1
  err = capsys.readouterr().err
  assert "error: preparing dtd: ConnectionError: no network" in err and "Traceback" not in err
