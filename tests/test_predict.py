"""jvt.predict: probabilities of image files and arrays with the eval preprocessing."""
import jax
import numpy as np
import pytest
from PIL import Image

import jvt
from jvt.prediction import image_size_of, predict

TINY = dict(hidden_size=32, mlp_dim=64, num_heads=2, num_layers=1, patch_size=8)


@pytest.fixture(scope="module")
def model_params():
  model = jvt.build_model("Ti/16", num_classes=3, head_zero_init=False, **TINY)
  return model, jvt.init_params(model, jax.random.key(0), image_size=32)


def _reference(model, params, image, mean, std):
  """Independent path: PIL bilinear resize to 32, (x / 255 - mean) / std, apply, softmax."""
  resized = np.asarray(Image.fromarray(image).resize((32, 32), Image.BILINEAR), np.float64)
  x = ((resized / 255 - np.asarray(mean)) / np.asarray(std)).astype(np.float32)
  logits = np.asarray(model.apply({"params": params}, x[None])[0], np.float64)[0]
  e = np.exp(logits - logits.max())
  return e / e.sum()


def test_predict_paths_and_arrays(model_params, tmp_path):
  model, params = model_params
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (48, 40, 3), dtype=np.uint8) for _ in range(3)]
  path = str(tmp_path / "a.png")
  Image.fromarray(images[0]).save(path)
  probs = predict(model, params, [path, images[1], images[2]], batch_size=2)
  assert probs.shape == (3, 3) and probs.dtype == np.float32
  np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
  imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # the vtab default
  for got, image in zip(probs, images):
    np.testing.assert_allclose(got, _reference(model, params, image, *imagenet), atol=2e-5)
  vit = predict(model, params, images[1], preprocess="vit")  # one array, the [-1, 1] preset
  np.testing.assert_allclose(vit[0], _reference(model, params, images[1], (0.5,) * 3, (0.5,) * 3),
                             atol=2e-5)
  described = predict(model, params, images[1], preprocess={"preprocess": "vit", "image_size": 32})
  np.testing.assert_array_equal(described, vit)


def test_predict_errors(model_params, tmp_path):
  model, params = model_params
  assert image_size_of(params, 8) == 32
  with pytest.raises(FileNotFoundError, match="no image file"):
    predict(model, params, [str(tmp_path / "missing.jpg")])
  with pytest.raises(ValueError, match="uint8"):
    predict(model, params, [np.zeros((8, 8, 3), np.float32)])
  with pytest.raises(TypeError, match="preset name"):
    predict(model, params, [np.zeros((8, 8, 3), np.uint8)], preprocess=3)
