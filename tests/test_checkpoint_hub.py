"""Weights by hub name through a local Hugging Face cache (offline), and the short mismatch error."""
import os

import jax
import numpy as np
import pytest

import jvt
from jvt.checkpoints import CheckpointMismatchError, hub, load_pretrained, save_npz

TINY = dict(hidden_size=32, mlp_dim=64, num_heads=2, num_layers=2, patch_size=8)
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cache_repo(cache, repo, files):
  """A repository in the hub cache's layout: blobs, snapshots/<commit>/ links, refs/main."""
  folder = cache / f"models--{repo.replace('/', '--')}"
  (folder / "refs").mkdir(parents=True)
  (folder / "refs" / "main").write_text(COMMIT)
  for name, write in files.items():
    blob = folder / "blobs" / f"blob-{name.replace('/', '-')}"
    blob.parent.mkdir(parents=True, exist_ok=True)
    write(str(blob))
    link = folder / "snapshots" / COMMIT / name
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(os.path.relpath(blob, link.parent), link)
  return folder / "snapshots" / COMMIT


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
  cache = tmp_path / "hf" / "hub"
  monkeypatch.delenv("HF_HUB_CACHE", raising=False)
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  return cache


def test_parse_names():
  assert hub.parse_hub_name("hf-hub:google/vit-base-patch16-224") == (
      "google/vit-base-patch16-224", "model.safetensors", None)
  assert hub.parse_hub_name("timm:vit_base_patch16_224.augreg2_in21k_ft_in1k") == (
      "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k", "model.safetensors", None)
  assert hub.parse_hub_name("hf-hub:me/vits/weights/vit.npz@v1.0") == (
      "me/vits", "weights/vit.npz", "v1.0")
  assert hub.is_hub_name("timm:x.y") and not hub.is_hub_name("ViT-B_16.npz")
  with pytest.raises(ValueError, match="expected hf-hub:<org>/<repo>"):
    hub.parse_hub_name("hf-hub:no-org")


def test_load_by_name_from_offline_cache(offline_cache):
  model = jvt.build_model("Ti/16", num_classes=3, **TINY)
  params = jvt.init_params(model, jax.random.key(0), image_size=32)
  source = jvt.init_params(model, jax.random.key(1), image_size=32)
  backbone = {k: v for k, v in source.items() if k != "head"}
  snapshot = _cache_repo(offline_cache, "me/tiny-vit",
                         {"weights/vit.npz": lambda p: save_npz(p, backbone, model=model)})
  assert hub.resolve("hf-hub:me/tiny-vit/weights/vit.npz") == str(snapshot / "weights/vit.npz")
  loaded = load_pretrained("hf-hub:me/tiny-vit/weights/vit.npz", params, model)
  for key in ("cls", "embedding"):  # from the cached file, not the init
    for got, want in zip(jax.tree.leaves(loaded[key]), jax.tree.leaves(source[key])):
      np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(loaded["head"]["kernel"], params["head"]["kernel"])


def test_offline_miss_says_what_to_download(offline_cache):
  with pytest.raises(FileNotFoundError) as err:
    hub.resolve("timm:vit_small_patch16_224.augreg_in21k")
  text = str(err.value)
  assert "the hub is offline (HF_HUB_OFFLINE=1)" in text
  assert ("hf download timm/vit_small_patch16_224.augreg_in21k model.safetensors --cache-dir "
          f"{offline_cache}") in text
  assert str(offline_cache / "models--timm--vit_small_patch16_224.augreg_in21k") in text


def test_mismatch_error_is_short_with_the_diagnosis_first(tmp_path):
  """A 12-block width-384 (S/16) file into a 2-block width-32 model: > 40 keys differ."""
  model = jvt.build_model("Ti/16", num_classes=3, **TINY)
  params = jvt.init_params(model, jax.random.key(0), image_size=32)
  s16_model = jvt.build_model("S/16", num_classes=3)
  shapes = jvt.param_shapes(s16_model, image_size=32)
  s16 = jax.tree.map(lambda x: np.zeros(x.shape, np.float32), shapes)
  # Written as jvt writes exports (with its model's GELU form): only the variant differs.
  save_npz(str(tmp_path / "s16.npz"), {k: v for k, v in s16.items() if k != "head"},
           model=s16_model)
  with pytest.raises(CheckpointMismatchError) as err:
    load_pretrained(str(tmp_path / "s16.npz"), params, model)
  lines = str(err.value).splitlines()
  assert len(lines) <= 12
  assert lines[1].startswith("likely cause: the file looks like S/16: wrong variant?")
  listing = lines[-1].removeprefix("every key: ")
  with open(listing) as f:
    full = f.read()
  assert full.strip() == err.value.details
  every = [line for line in full.splitlines() if line.startswith("    ")]
  assert len(every) > 40 and "Transformer/encoderblock_11/LayerNorm_0/scale: file [384]" in full
