"""Evaluation preprocessing vs transformers' image processors, and the metric formulas on known inputs."""

import numpy as np
import pytest

from vcjax.eval import metrics, preprocess

transformers = pytest.importorskip("transformers")

SIZES = [(64, 64), (128, 96), (512, 680), (224, 224), (97, 301), (300, 227)]


def clip_processor():
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
  return CLIPImageProcessorPil()  # openai/clip-vit-base-patch32's settings are the class defaults


def dino_processor():
  """dino-vits16's preprocessor_config.json: 224x224, bilinear (resample 2), ImageNet mean / std."""
  from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil
  return ViTImageProcessorPil(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], resample=2,
                              size={"height": 224, "width": 224})


@pytest.mark.parametrize("h,w", SIZES)
def test_clip_and_dino_preprocessing_equal_transformers(h, w):
  img = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)
  want = clip_processor()(images=[img], return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
  got = preprocess.clip_image(img, crop="transformers")
  assert got.shape == (224, 224, 3)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
  want = dino_processor()(images=[img], return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
  np.testing.assert_allclose(preprocess.dino_image(img), want, rtol=0, atol=1e-6)


def test_clip_package_crop_rounds_like_torchvision():
  """97x301 resizes to 224x695: the clip package crops from int(round(471 / 2)) = 236, transformers from
  235; elsewhere (even margins) the two agree."""
  img = np.random.default_rng(0).integers(0, 256, (97, 301, 3), dtype=np.uint8)
  full = preprocess.clip_image(img, size=224, crop="transformers")
  clip = preprocess.clip_image(img, size=224, crop="clip")
  np.testing.assert_allclose(clip[:, :-1], full[:, 1:], atol=1e-6)
  assert np.abs(clip - full).max() > 0.1
  img = np.random.default_rng(1).integers(0, 256, (128, 96, 3), dtype=np.uint8)
  np.testing.assert_array_equal(preprocess.clip_image(img), preprocess.clip_image(img, crop="transformers"))


def test_metric_formulas():
  frames = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
  assert metrics.clip_t(frames, np.array([1.0, 0.0])) == pytest.approx((1 + 0 + 2 ** -0.5) / 3)
  assert metrics.t_cons(frames) == pytest.approx((0 + 2 ** -0.5) / 2)
  refs = np.array([[1.0, 0.0], [0.0, 1.0]])
  assert metrics.image_similarity(frames, refs) == pytest.approx((1 + 2 ** -0.5 + 1 + 2 ** -0.5) / 6)


def test_dynamic_degree_rules():
  assert metrics.dd_threshold(512, 512) == 8.0
  assert metrics.dd_threshold(320, 512, kind="authors") == 5.0
  assert metrics.dd_threshold(512, 512, kind="vbench", fps=8) == 12.0
  assert metrics.dd_threshold(512, 512, kind="vbench", fps=4) == 24.0
  assert metrics.dd_frame_interval(8) == 1 and metrics.dd_frame_interval(24) == 3
  assert metrics.dd_frame_interval(None) == 1 and metrics.dd_frame_interval(2) == 1
  # 16 frames need 4 pairs over the threshold; 10 frames round(2.5) = 2 (Python rounds half to even).
  assert metrics.dd_moving([9, 9, 9, 1, 9], 16, 8.0)
  assert not metrics.dd_moving([9, 9, 9, 1, 1], 16, 8.0)
  assert metrics.dd_moving([9, 9, 1], 10, 8.0) and not metrics.dd_moving([9, 1, 1], 10, 8.0)
  assert metrics.dd_moving([0.0], 2, 8.0)  # round(0.5) = 0: the authors' loop returns True at once
  assert not metrics.dd_moving([], 1, 8.0)
  mags = np.arange(400, dtype=np.float64).reshape(1, 20, 20)
  assert metrics.top5_mean(mags)[0] == pytest.approx(np.mean(np.arange(380, 400)))
