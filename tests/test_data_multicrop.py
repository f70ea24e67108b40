"""Multi-crop views (SwAV, DINO): MultiCropAugment's dict of view groups
through both pretraining pipelines (in-memory whole batches, per-example
records from files), each group's crop areas and per-view probabilities,
one decode per image giving the in-memory path's crops, per-group seeds
(a later group leaves the earlier ones' views alone), determinism, and the
view grid of a dict."""

# The per-example path's _crops_255 is what the pipeline calls.
# pylint: disable=protected-access

import numpy as np
import pytest
import tensorflow as tf

from tf_ssl import plots
from tf_ssl.data import augment, from_arrays, make_source, pipeline

G, L = 32, 16  # global and local view sides
SEED = tf.constant([5, 9], tf.int64)


def _swav(**kwargs):
  return augment.MultiCropAugment.swav(G, L, 6, color_strength=0.5, **kwargs)


def _arrays(n=24, size=40, seed=0):
  rng = np.random.default_rng(seed)
  return from_arrays(rng.integers(0, 256, (n, size, size, 3), np.uint8),
                     np.arange(n) % 3)


def _batches(source, aug, seed=1, n=2, batch=4):
  return list(pipeline.build_pretrain(source, batch, aug, seed=seed)
              .take(n).as_numpy_iterator())


def _check_views(views, batch=4):
  assert list(views) == ["global", "local"]  # the groups' order
  assert views["global"].shape == (batch, 2, G, G, 3)
  assert views["local"].shape == (batch, 6, L, L, 3)
  for v in views.values():
    assert v.dtype == np.float32 and v.min() >= 0 and v.max() <= 1


def test_attributes_and_recipes():
  mc = _swav()
  assert list(mc.groups) == ["global", "local"]
  assert (mc.num_views, mc.image_size, mc.batch_level) == (8, G, True)
  glob, local = mc.groups.values()
  assert glob.crop_area == (0.14, 1.0) and local.crop_area == (0.05, 0.14)
  assert glob.blur_prob == local.blur_prob == 0.5 and local.num_views == 6
  dino = augment.MultiCropAugment.dino(224, 96)
  glob, local = dino.groups.values()
  assert dino.num_views == 10 and dino.image_size == 224
  assert glob.crop_area == (0.4, 1.0) and local.crop_area == (0.05, 0.4)
  assert glob.blur_prob == (1.0, 0.1) and glob.solarize_prob == (0.0, 0.2)
  assert local.blur_prob == 0.5 and local.solarize_prob == 0.0
  assert glob.jitter == local.jitter == (0.4, 0.4, 0.2, 0.1)
  assert glob.blur and local.blur and local.image_size == 96
  # A sequence of pairs keeps its order; the first group sets image_size.
  pairs = augment.MultiCropAugment([("small", augment.SimCLRAugment(8)),
                                    ("big", augment.SimCLRAugment(16))])
  assert list(pairs.groups) == ["small", "big"] and pairs.image_size == 8


_AUG = augment.SimCLRAugment(8)


@pytest.mark.parametrize("groups,match", [
    ({}, "at least one"),
    ([], "at least one"),
    ({"": _AUG}, "identifier"),
    ({"two words": _AUG}, "identifier"),
    ({3: _AUG}, "identifier"),
    ([("global", _AUG), ("global", _AUG)], "repeat"),
    ([("global", _AUG, 1)], "identifier"),
    ({"global": "simclr"}, "not a SimCLRAugment"),
    ({"global": _AUG, "local": augment.SimCLRAugment(8, batch_level=False)},
     "batch_level"),
], ids=str)
def test_bad_groups(groups, match):
  with pytest.raises(ValueError, match=rf"^[^\n]*{match}[^\n]*$"):
    augment.MultiCropAugment(groups)


def test_distort_needs_every_group():
  mc = _swav()
  with pytest.raises(ValueError, match="groups"):
    mc.distort({"global": tf.zeros([1, 2, G, G, 3])}, SEED)


def test_in_memory_pipeline_shapes_determinism_and_group_seeds():
  """Whole-batch path (crop_batch + distort): the dict of groups; the same
  seed gives the same views, another seed others; a local group leaves
  the global views (group 0's seed) exactly as they were alone."""
  mc = _swav()
  a, b, c = _batches(_arrays(), mc, 1), _batches(_arrays(), mc, 1), _batches(
      _arrays(), mc, 2, n=1)
  for batch in a:
    _check_views(batch["views"])
    assert batch["label"].dtype == np.int64 and batch["label"].shape == (4,)
  for x, y in zip(a, b):
    for k in ("global", "local"):
      np.testing.assert_array_equal(x["views"][k], y["views"][k])
  assert not np.array_equal(a[0]["views"]["global"], c[0]["views"]["global"])
  assert not np.array_equal(a[0]["views"]["local"], c[0]["views"]["local"])
  alone = augment.MultiCropAugment({"global": mc.groups["global"]})
  for x, y in zip(a, _batches(_arrays(), alone, 1)):
    assert list(y["views"]) == ["global"]
    np.testing.assert_array_equal(x["views"]["global"], y["views"]["global"])


def test_file_pipeline_shapes_determinism_and_group_seeds(image_folder):
  """Per-example path (PNG files: _crops_255, then distort per batch): the
  same dict, deterministic, group 0 unchanged by the local group. (With
  batch_level=False the pipeline calls __call__ per example instead:
  test_call_is_crops_then_distort; its XLA compiles take ~30 s here.)"""
  source = make_source(f"folder:{image_folder}")
  mc = _swav()
  a, b = _batches(source, mc, 3), _batches(source, mc, 3)
  for x, y in zip(a, b):
    _check_views(x["views"])
    for k in ("global", "local"):
      np.testing.assert_array_equal(x["views"][k], y["views"][k])
  alone = augment.MultiCropAugment({"global": mc.groups["global"]})
  for x, y in zip(a, _batches(source, alone, 3)):
    np.testing.assert_array_equal(x["views"]["global"], y["views"]["global"])


def _ramp(size=200):
  """Pixel (y, x) = (y, x, 0): a crop's bilinear resize reads its own box."""
  y, x = np.mgrid[:size, :size]
  return np.stack([y, x, np.zeros_like(y)], -1).astype(np.uint8)


def _measured_boxes(views):
  """[N, S, S, 3] crops of _ramp in [0, 255] -> [N, 4] (oy, ox, h, w).

  With half-pixel centres, output pixel i of a crop [o, o + h) resized to
  S < h reads source o + (i + 0.5) h / S - 0.5, exactly on a linear ramp.
  """
  s = views.shape[1]
  h = (views[:, -1, 0, 0] - views[:, 0, 0, 0]) * s / (s - 1)
  w = (views[:, 0, -1, 1] - views[:, 0, 0, 1]) * s / (s - 1)
  oy = views[:, 0, 0, 0] - 0.5 * h / s + 0.5
  ox = views[:, 0, 0, 1] - 0.5 * w / s + 0.5
  return np.stack([oy, ox, h, w], 1)


def _check_areas(boxes, area, size=200):
  # The crops are integer boxes inside the image: the geometry is read right.
  np.testing.assert_allclose(boxes, np.round(boxes), atol=0.05)
  boxes = np.round(boxes)
  assert (boxes[:, :2] >= 0).all() and (boxes[:, :2] + boxes[:, 2:] <= size).all()
  frac = boxes[:, 2] * boxes[:, 3] / size ** 2
  lo, hi = area
  # Rounding the sides to pixels moves an area by up to ~2.5% here.
  assert lo * 0.97 <= frac.min() < lo + 0.25 * (hi - lo), (frac.min(), area)
  assert hi - 0.25 * (hi - lo) < frac.max() <= hi * 1.03, (frac.max(), area)
  return frac


def test_crop_areas_per_group_on_both_paths():
  """The crop boxes, read back from a ramp image's views, have each group's
  area range (SwAV: global 0.14-1, local 0.05-0.14) on the in-memory path
  (crop_batch) and the per-example path (_crops_255)."""
  mc = _swav()
  ramp = _ramp()
  batch = mc.crop_batch(np.broadcast_to(ramp, (100,) + ramp.shape), SEED)
  ds = tf.data.Dataset.range(60).map(
      lambda i: mc._crops_255({"image": tf.constant(ramp)}, tf.stack([i, 7])))
  per_example = list(ds.as_numpy_iterator())
  for name, group in mc.groups.items():
    v = batch[name].numpy()
    assert v.shape == (100, group.num_views, group.image_size,
                       group.image_size, 3)
    frac = _check_areas(_measured_boxes(v.reshape((-1,) + v.shape[2:]) * 255.),
                        group.crop_area)
    v = np.concatenate([e[name] for e in per_example])
    _check_areas(_measured_boxes(v), group.crop_area)
    if name == "local":  # uniform in (0.05, 0.14): mean 0.095
      assert abs(frac.mean() - 0.095) < 0.01, frac.mean()


def _changed(a, b):
  return np.abs(a - b).max(axis=(2, 3, 4)) > 1e-6  # [B, V]


def _close(rate, p, n):
  return abs(rate - p) <= 4 * np.sqrt(p * (1 - p) / n) + 1e-9


def test_per_view_probabilities_by_group():
  """DINO-like groups: global view 1 always blurred, view 2 blurred 0.1 and
  solarised 0.2, local views blurred 0.5 and never solarised. Found by
  distorting with the same seed and blur off, or solarisation always on
  (the same compiled functions: only the coins differ)."""
  n, ls = 400, 24  # 24 px: a 3-tap blur kernel (16 px has 1 tap, no blur)

  def make(blur=True, solarize=(0.0, 0.2)):
    kw = dict(color_strength=0.0, blur=blur)
    return augment.MultiCropAugment({
        "global": augment.SimCLRAugment(G, blur_prob=(1.0, 0.1),
                                        solarize_prob=solarize, **kw),
        "local": augment.SimCLRAugment(ls, num_views=4, blur_prob=0.5, **kw)})
  rng = np.random.default_rng(1)
  views = {"global": tf.constant(rng.uniform(0.1, 0.9, (n, 2, G, G, 3)), tf.float32),
           "local": tf.constant(rng.uniform(0.1, 0.9, (n, 4, ls, ls, 3)), tf.float32)}
  run = lambda aug: {k: v.numpy() for k, v in aug.distort(views, SEED).items()}
  y, unblurred, always = run(make()), run(make(blur=False)), run(make(solarize=1.0))
  blurred = {k: _changed(y[k], unblurred[k]) for k in y}
  # A sigma below ~0.19 (~5% of U(0.1, 2)) moves no pixel by 1e-6, so view
  # 1's rate (p = 1) measures that share; the others are p times it.
  seen = blurred["global"][:, 0].mean()
  assert 0.9 < seen <= 1.0, seen
  assert _close(blurred["global"][:, 1].mean(), 0.1 * seen, n)
  local = blurred["local"].mean(axis=0)
  assert all(_close(r, 0.5 * seen, n) for r in local), local
  assert _close(blurred["local"].mean(), 0.5 * seen, 4 * n)
  solarized = ~_changed(y["global"], always["global"])
  assert not solarized[:, 0].any()
  assert _close(solarized[:, 1].mean(), 0.2, n), solarized[:, 1].mean()
  np.testing.assert_array_equal(y["local"], always["local"])  # not solarised


def test_one_decode_gives_the_in_memory_crops(monkeypatch):
  """A JPEG is decoded once, the union window of all groups' boxes, and
  each group's crops equal those crop_batch makes from the fully decoded
  image with the same seed (the same boxes: group g's crop_batch of one
  image samples what its _crops_255 does), and those the group makes alone
  from its own window (seed fold_in(seed, g))."""
  rng = np.random.default_rng(3)
  image = rng.integers(0, 256, (60, 80, 3), np.uint8)
  encoded = tf.io.encode_jpeg(image, quality=95)
  decoded = tf.io.decode_jpeg(encoded, channels=3)
  mc = _swav()
  calls = []
  real = tf.image.decode_and_crop_jpeg

  def counting(contents, window, **kwargs):
    calls.append(window.numpy())
    return real(contents, window, **kwargs)
  monkeypatch.setattr(tf.image, "decode_and_crop_jpeg", counting)
  for seed in ([5, 9], [1, 2], [7, 7]):
    seed = tf.constant(seed, tf.int64)
    calls.clear()
    crops = mc._crops_255({"encoded": encoded}, seed)
    assert len(calls) == 1, calls  # one decode for both groups
    in_memory = mc.crop_batch(decoded[None], seed)
    png = mc._crops_255({"encoded": tf.io.encode_png(decoded)}, seed)
    for g, (name, group) in enumerate(mc.groups.items()):
      np.testing.assert_allclose(crops[name] / 255., in_memory[name][0], atol=1e-4)
      np.testing.assert_allclose(png[name], crops[name], atol=1e-3)
      own = group._crops_255({"encoded": encoded}, _fold(seed, g))
      np.testing.assert_allclose(own, crops[name], atol=1e-3)
    # The window covers every group's boxes.
    y, x, h, w = calls[0]
    for g, group in enumerate(mc.groups.values()):
      boxes = group._boxes(_fold(seed, g), 60, 80).numpy()
      assert (boxes[:, :2] >= [y, x]).all(), (boxes, calls[0])
      assert (boxes[:, :2] + boxes[:, 2:] <= [y + h, x + w]).all(), (boxes, calls[0])


def _fold(seed, g):
  return tf.random.experimental.stateless_fold_in(seed, tf.constant(g, tf.int64))


def test_group_g_draws_from_fold_in_seed_g():
  """Group g's crops and distortions are its SimCLRAugment's with seed
  fold_in(seed, g) (never the seed itself, nor another group's)."""
  mc = _swav()
  images = np.random.default_rng(5).integers(0, 256, (6, 40, 40, 3), np.uint8)
  crops = mc.crop_batch(images, SEED)
  views = mc.distort(crops, SEED)
  for g, (name, group) in enumerate(mc.groups.items()):
    np.testing.assert_array_equal(crops[name], group.crop_batch(images, _fold(SEED, g)))
    np.testing.assert_array_equal(views[name], group.distort(crops[name], _fold(SEED, g)))
    other = group.crop_batch(images, _fold(SEED, 1 - g))
    assert not np.array_equal(crops[name], other)


def test_call_is_crops_then_distort():
  mc = _swav()
  image = tf.constant(np.random.default_rng(4).integers(0, 256, (40, 40, 3), np.uint8))
  got = mc({"image": image}, SEED)
  s = tf.random.experimental.stateless_split(SEED, 2)
  want = mc._distort(mc._crops_255({"image": image}, s[0]), s[1], 1. / 255.)
  assert got["global"].shape == (2, G, G, 3) and got["local"].shape == (6, L, L, 3)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])
  assert not np.array_equal(got["global"], mc({"image": image}, SEED + 1)["global"])


def test_view_grid_of_groups():
  rng = np.random.default_rng(0)
  views = {"global": rng.uniform(size=(3, 2, G, G, 3)).astype(np.float32),
           "local": rng.uniform(size=(3, 6, L, L, 3)).astype(np.float32)}
  grid = plots.view_grid(views, max_images=2)[0]
  assert grid.shape == (2 * G, 8 * G, 3)
  np.testing.assert_array_equal(grid[G:2 * G, G:2 * G], views["global"][1, 1])
  # Local view 3 of image 1 sits centred in column 2 + 3, grey around it.
  cell = grid[G:2 * G, 5 * G:6 * G]
  np.testing.assert_array_equal(cell[8:24, 8:24], views["local"][1, 3])
  assert (cell[:8] == 0.5).all() and (cell[:, 24:] == 0.5).all()
  # The array form is unchanged.
  assert plots.view_grid(views["global"])[0].shape == (3 * G, 2 * G, 3)
