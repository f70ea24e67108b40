"""ContrastiveModel.train_step: the same global batch gives the same update on
1 and 4 replicas, for SimCLR and SupCon, with synchronized BN and LARS."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import mirrored
from tf_ssl import optim
from tf_ssl.data import augment, pipeline, sources
from tf_ssl.models.contrastive import ContrastiveModel
from tf_ssl.models.heads import ProjectionHead

GLOBAL_BATCH = 8
IMAGE = 8


class TinyBackbone(keras.Model):
  """Conv-BN-ReLU-pool: enough to exercise BN statistics across replicas."""

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.conv = keras.layers.Conv2D(8, 3, use_bias=False)
    self.bn = keras.layers.BatchNormalization(synchronized=True, momentum=0.9)
    self.pool = keras.layers.GlobalAveragePooling2D()

  def call(self, images, training=False):
    stem = tf.nn.relu(self.bn(self.conv(images), training=training))
    return {"stem": stem, "features": self.pool(stem)}


class TinyHead(keras.layers.Layer):

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.hidden = keras.layers.Dense(16, use_bias=False)
    self.bn = keras.layers.BatchNormalization(synchronized=True)
    self.out = keras.layers.Dense(8)

  def call(self, features, training=False):
    hidden = tf.nn.relu(self.bn(self.hidden(features), training=training))
    return {"proj_0": features, "proj_1": hidden, "projection": self.out(hidden)}


def _batch(num_views=2):
  rng = np.random.default_rng(0)
  views = rng.uniform(size=(GLOBAL_BATCH, num_views, IMAGE, IMAGE, 3)).astype("float32")
  labels = np.array([0, 1, 2, 0, 1, -1, 2, -1], dtype="int64")
  return views, labels


def _build(method, initial_weights=None, **model_kwargs):
  model = ContrastiveModel(TinyBackbone(), TinyHead(name="projection_head"),
                           num_classes=3, method=method, temperature=0.5,
                           **model_kwargs)
  model(tf.zeros((2, IMAGE, IMAGE, 3)))
  if initial_weights is not None:
    model.set_weights(initial_weights)
  model.compile(optimizer=optim.LARS(learning_rate=0.5, weight_decay=1e-4))
  return model


def _fit_one_step(strategy, method, initial_weights, num_views=2, **model_kwargs):
  views, labels = _batch(num_views)
  replicas = strategy.num_replicas_in_sync
  per_replica = GLOBAL_BATCH // replicas

  def dataset_fn(ctx):
    ds = tf.data.Dataset.from_tensor_slices({"views": views, "label": labels})
    return ds.batch(per_replica, drop_remainder=True)

  with strategy.scope():
    model = _build(method, initial_weights, **model_kwargs)
  data = strategy.distribute_datasets_from_function(dataset_fn)
  history = model.fit(data, steps_per_epoch=1, epochs=1, verbose=0)
  return model.get_weights(), history.history


@pytest.mark.parametrize("method,num_views", [("simclr", 2), ("supcon", 2),
                                              ("simclr", 3)])
def test_one_step_same_on_1_and_4_replicas(method, num_views):
  initial = _build(method).get_weights()
  w1, h1 = _fit_one_step(mirrored(1), method, initial, num_views=num_views)
  w4, h4 = _fit_one_step(mirrored(4), method, initial, num_views=num_views)
  moved = [not np.allclose(a, b) for a, b in zip(initial, w1)]
  assert sum(moved) >= len(initial) // 2, "the step should change most weights"
  for a, b in zip(w1, w4):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(h1["loss"], h4["loss"], rtol=1e-5)
  np.testing.assert_allclose(h1["probe_acc"], h4["probe_acc"], rtol=1e-6)


def test_unlabelled_batch_has_no_probe_loss():
  views, _ = _batch()
  model = _build("simclr")
  out = model.train_step({"views": tf.constant(views),
                          "label": tf.fill([GLOBAL_BATCH], tf.constant(-1, tf.int64))})
  assert float(out["probe_loss"]) == 0.0


def _numpy_multiview_nt_xent(z, temperature):
  """SimCLR over V views: each view's positives are the other V - 1 views of
  its image; per anchor, the mean over positives of -log softmax over all
  other views; summed over views of each view's batch mean (at V = 2,
  objective.py's loss_a + loss_b)."""
  v, b, _ = z.shape
  z = z / np.linalg.norm(z, axis=-1, keepdims=True)
  flat = z.reshape(v * b, -1)                       # view-major rows
  image = np.tile(np.arange(b), v)
  logits = flat @ flat.T / temperature
  losses = []
  for i in range(v * b):
    others = np.arange(v * b) != i
    log_norm = np.log(np.exp(logits[i, others]).sum())
    positives = others & (image == image[i])
    losses.append(np.mean(log_norm - logits[i, positives]))
  return np.sum(np.reshape(losses, [v, b]).mean(axis=1))


@pytest.mark.parametrize("num_views", [2, 3, 4])
def test_simclr_loss_over_several_views_matches_numpy(num_views):
  z = np.random.default_rng(num_views).normal(size=(num_views, 5, 6)).astype("float32")
  model = _build("simclr")
  loss, _ = model._contrastive_loss(  # pylint: disable=protected-access
      tf.constant(z.reshape(num_views * 5, 6)), None, num_views)
  np.testing.assert_allclose(float(loss), _numpy_multiview_nt_xent(z, 0.5), rtol=1e-5)


def test_supcon_on_unlabelled_rows_is_simclr():
  # Label -1 is "unlabelled", not a class: with every row unlabelled, SupCon's
  # positives are each image's other view, i.e. SimCLR at SupCon's scale
  # (a mean over anchors: half of NT-Xent's loss_a + loss_b).
  z = tf.constant(np.random.default_rng(7).normal(size=(2 * 5, 6)), tf.float32)
  unlabelled = tf.fill([5], tf.constant(-1, tf.int64))
  supcon = _build("supcon", supcon_options={"base_temperature": 0.5})
  simclr = _build("simclr")
  got, _ = supcon._contrastive_loss(z, unlabelled, 2)  # pylint: disable=protected-access
  want, _ = simclr._contrastive_loss(z, None, 2)  # pylint: disable=protected-access
  np.testing.assert_allclose(2 * float(got), float(want), rtol=1e-5)


def test_supcon_takes_more_views():
  _, history = _fit_one_step(mirrored(1), "supcon", None, num_views=3)
  assert np.isfinite(history["loss"][0])


def test_endpoints_and_eval_step():
  model = _build("simclr")
  out = model(tf.zeros((3, IMAGE, IMAGE, 3)))
  assert {"stem", "features", "proj_0", "proj_1", "projection", "probe_logits"} <= set(out)
  logs = model.test_step({"image": tf.zeros((4, IMAGE, IMAGE, 3)),
                          "label": tf.constant([0, 1, 2, 0], tf.int64),
                          "mask": tf.constant([1.0, 1.0, 0.0, 0.0])})
  # Zero-init probe: every logit ties, argmax is class 0; only the first
  # two rows count and one of them is class 0.
  assert float(logs["probe_acc"]) == pytest.approx(0.5)


@pytest.mark.parametrize("options", [
    dict(steps_per_execution=2),
    dict(jit_compile=True),
    dict(mixed_precision=True),
], ids=["steps_per_execution", "jit_compile", "mixed_bfloat16"])
def test_fit_options(options):
  mixed = options.pop("mixed_precision", False)
  views, labels = _batch()
  data = tf.data.Dataset.from_tensor_slices({"views": views, "label": labels}).batch(
      4, drop_remainder=True).repeat()
  previous = keras.mixed_precision.global_policy()
  if mixed:
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
  try:
    model = ContrastiveModel(TinyBackbone(), TinyHead(name="projection_head"),
                             num_classes=3, temperature=0.5)
    model(tf.zeros((2, IMAGE, IMAGE, 3)))
    before = [w.copy() for w in model.get_weights()]
    model.compile(optimizer=optim.LARS(learning_rate=0.5), **options)
    history = model.fit(data, steps_per_epoch=4, epochs=1, verbose=0)
  finally:
    keras.mixed_precision.set_global_policy(previous)
  assert int(model.optimizer.iterations.numpy()) == 4
  assert np.isfinite(history.history["loss"][0])
  assert any(not np.allclose(a, b) for a, b in zip(before, model.get_weights()))
  if mixed:
    assert model.backbone.conv.kernel.dtype == "float32"
    assert model(tf.zeros((1, IMAGE, IMAGE, 3)))["features"].dtype == tf.bfloat16


@pytest.mark.parametrize("replicas", [None, 1, 2], ids=["no_strategy", "1replica", "2replicas"])
def test_fit_without_calling_the_model_first(replicas):
  """The README's library example: construct, compile, fit on a pipeline.

  Under a strategy Keras builds an unbuilt model by calling it on the first
  batch dict as is; the model must take that dict."""
  rng = np.random.default_rng(0)
  source = sources.from_arrays(rng.integers(0, 256, (32, 12, 12), np.uint8),
                               rng.integers(0, 3, 32), num_classes=3)
  strategy = tf.distribute.get_strategy() if replicas is None else mirrored(replicas)
  views = augment.SimCLRAugment(IMAGE, color_strength=0.5, blur=False)
  data = pipeline.pretrain_dataset(strategy, source, 8, views, seed=0)
  with strategy.scope():
    model = ContrastiveModel(TinyBackbone(), ProjectionHead(16, 8, num_layers=2),
                             num_classes=3, temperature=0.5)
    model.compile(optimizer=optim.LARS(learning_rate=0.5))
  history = model.fit(data, steps_per_epoch=2, epochs=1, verbose=0)
  assert int(model.optimizer.iterations.numpy()) == 2
  assert np.isfinite(history.history["loss"][0])
  assert model.projection_head.built and model.probe_head.built
  batch = next(iter(pipeline.pretrain_dataset(tf.distribute.get_strategy(), source,
                                              4, views, seed=1)))
  out = model(batch)  # every view of the batch, view-major
  assert out["projection"].shape == (8, 8) and out["probe_logits"].shape == (8, 3)
  with pytest.raises(ValueError, match="'views'.*'image'"):
    model({"pixels": batch["views"]})
