"""layers.BatchNorm (the fused kernel) equals keras.layers.BatchNormalization:
outputs, gradients and moving statistics, eager and in tf.function, float32
and mixed bfloat16; the synchronized multi-replica path keeps global
statistics; the ResNet's variables keep their names."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_ssl.models import resnet
from tf_ssl.models.layers import BatchNorm

SHAPE = (4, 5, 6, 8)


def _pair(shape=SHAPE, **kwargs):
  """A Keras BN and a BatchNorm with the same random weights."""
  rng = np.random.default_rng(1)
  weights = [rng.uniform(0.5, 2.0, SHAPE[-1]).astype("float32")
             for _ in range(4)]
  layers = []
  for cls in (keras.layers.BatchNormalization, BatchNorm):
    layer = cls(momentum=0.9, epsilon=1e-5, **kwargs)
    layer.build(shape)
    layer.set_weights(weights[:len(layer.weights)])
    layers.append(layer)
  return layers


def _run(layer, x, upstream, training):
  """Output, d(sum(output * upstream))/d(x, trainable weights)."""
  with tf.GradientTape() as tape:
    tape.watch(x)
    y = layer(x, training=training)
    loss = tf.reduce_sum(tf.cast(y, tf.float32) * upstream)
  grads = tape.gradient(loss, [x] + layer.trainable_variables)
  return [tf.cast(t, tf.float32) for t in [y] + grads]


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("center,scale", [(True, True), (False, True), (True, False)])
def test_matches_keras_batch_normalization(policy, training, graph, center, scale):
  previous = keras.mixed_precision.global_policy()
  keras.mixed_precision.set_global_policy(policy)
  try:
    reference, fused = _pair(center=center, scale=scale)
  finally:
    keras.mixed_precision.set_global_policy(previous)
  rng = np.random.default_rng(0)
  # A large mean and a non-unit scale: the variance must be the centred one.
  x = tf.constant(rng.normal(3.0, 2.0, SHAPE).astype("float32"))
  upstream = tf.constant(rng.normal(size=SHAPE).astype("float32"))
  run = tf.function(_run, autograph=False) if graph else _run
  want = run(reference, x, upstream, training)
  got = run(fused, x, upstream, training)
  # bfloat16 outputs differ by at most one rounding of the output.
  tol = 1e-5 if policy == "float32" else 2e-2
  for w, g, name in zip(want, got, ["y", "dx", "d_first_weight", "d_second"]):
    scale_ = float(tf.reduce_max(tf.abs(w))) + 1e-6
    np.testing.assert_allclose(g / scale_, w / scale_, atol=tol, err_msg=name)
  assert got[0].dtype == want[0].dtype
  for a, b in zip(reference.non_trainable_variables, fused.non_trainable_variables):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)
  if training:  # the moving statistics moved
    assert np.abs(np.asarray(fused.moving_mean) - 1.0).max() > 1e-3 or not center


def test_moving_variance_is_the_biased_batch_variance():
  layer = BatchNorm(momentum=0.0, epsilon=1e-5)
  x = np.random.default_rng(2).normal(size=(3, 2, 2, 4)).astype("float32")
  layer(x, training=True)
  np.testing.assert_allclose(np.asarray(layer.moving_mean), x.mean((0, 1, 2)),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(layer.moving_variance), x.var((0, 1, 2)),
                             rtol=1e-5)


def test_rank_2_inputs_take_the_keras_path():
  reference, fused = _pair(shape=(6, 8))
  x = tf.constant(np.random.default_rng(3).normal(size=(6, 8)).astype("float32"))
  np.testing.assert_allclose(np.asarray(fused(x, training=True)),
                             np.asarray(reference(x, training=True)), atol=1e-5)


def test_synchronized_on_two_replicas_uses_global_statistics(strategy_2):
  x = np.random.default_rng(4).normal(2.0, 3.0, (8,) + SHAPE[1:]).astype("float32")
  with strategy_2.scope():
    layer = BatchNorm(synchronized=True, momentum=0.9, epsilon=1e-5)
    layer.build(SHAPE)

  def shard(ctx):
    return tf.split(x, 2)[ctx.replica_id_in_sync_group]

  local = strategy_2.experimental_distribute_values_from_function(shard)
  got = strategy_2.run(tf.function(lambda v: layer(v, training=True)), args=(local,))
  got = np.concatenate([np.asarray(g) for g in
                        strategy_2.experimental_local_results(got)])
  want = (x - x.mean((0, 1, 2))) / np.sqrt(x.var((0, 1, 2)) + 1e-5)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_resnet_uses_it_with_unchanged_variable_paths():
  model = resnet.resnet(18, cifar_stem=True)
  assert isinstance(model.stem.bn, BatchNorm)
  assert isinstance(model.stem.bn, keras.layers.BatchNormalization)
  assert [v.path for v in model.stem.bn.weights] == [
      "resnet/stem/batch_norm/gamma", "resnet/stem/batch_norm/beta",
      "resnet/stem/batch_norm/moving_mean",
      "resnet/stem/batch_norm/moving_variance"]
