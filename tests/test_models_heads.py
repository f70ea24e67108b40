"""Projection heads v1/v2 (structure, endpoints, a NumPy forward) and the
zero-initialised linear head."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_ssl.models import LinearHead, ProjectionHead


def structure(head):
  return [(d.name, d.units, d.use_bias, None if b is None else
           (b.name, b.center, b.scale)) for d, b in
          zip(head.dense_layers, head.bn_layers)]


def test_v1_structure_and_endpoints():
  head = ProjectionHead(hidden_dim=32, output_dim=8, num_layers=2, version=1)
  out = head(np.random.rand(4, 16).astype("float32"), training=True)
  # RECIPES.md v1: Dense(hidden)-BN-ReLU-Dense(128); the last has a bias, no BN.
  assert structure(head) == [("dense_1", 32, False, ("batch_norm_1", True, True)),
                             ("dense_2", 8, True, None)]
  assert {k: tuple(v.shape) for k, v in out.items()} == {
      "proj_0": (4, 16), "proj_1": (4, 32), "proj_2": (4, 8),
      "projection": (4, 8)}
  assert head.name == "projection_head"
  assert all(v.path.startswith("projection_head/") for v in head.variables)


def test_v2_structure_and_endpoints():
  head = ProjectionHead(hidden_dim=None, output_dim=8, num_layers=3, version=2)
  x = np.random.rand(4, 16).astype("float32")
  out = head(x, training=True)
  # RECIPES.md v2: hidden Dense(no bias)-BN-ReLU, last Dense-BN(no center).
  assert structure(head) == [
      ("dense_1", 16, False, ("batch_norm_1", True, True)),
      ("dense_2", 16, False, ("batch_norm_2", True, True)),
      ("dense_3", 8, False, ("batch_norm_3", False, True))]
  assert [tuple(out[f"proj_{i}"].shape) for i in range(4)] == [
      (4, 16), (4, 16), (4, 16), (4, 8)]
  np.testing.assert_array_equal(np.asarray(out["proj_0"]), x)
  assert out["projection"] is out["proj_3"]
  assert np.asarray(out["proj_1"]).min() >= 0  # after ReLU
  assert np.asarray(out["projection"]).min() < 0  # no ReLU on the output


def test_v2_forward_matches_numpy():
  rng = np.random.default_rng(0)
  head = ProjectionHead(hidden_dim=6, output_dim=3, num_layers=3, version=2)
  head.build((None, 5))
  for v in head.variables:  # moving variances must stay positive
    v.assign(rng.uniform(0.5, 1.5, v.shape).astype("float32")
             if "variance" in v.path else
             rng.normal(size=v.shape).astype("float32"))
  x = rng.normal(size=(4, 5)).astype("float32")
  w = {v.path.split("/", 1)[1]: np.asarray(v, "float64") for v in head.variables}

  def bn(h, i, center=True):
    h = (h - w[f"batch_norm_{i}/moving_mean"]) / np.sqrt(
        w[f"batch_norm_{i}/moving_variance"] + 1e-5) * w[f"batch_norm_{i}/gamma"]
    return h + w[f"batch_norm_{i}/beta"] if center else h

  h1 = np.maximum(bn(x @ w["dense_1/kernel"], 1), 0)
  h2 = np.maximum(bn(h1 @ w["dense_2/kernel"], 2), 0)
  h3 = bn(h2 @ w["dense_3/kernel"], 3, center=False)
  out = head(x, training=False)
  for got, want in ((out["proj_1"], h1), (out["proj_2"], h2),
                    (out["projection"], h3)):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_sync_bn_head_builds_under_a_strategy(strategy_2):
  with strategy_2.scope():
    head = ProjectionHead(16, 4, num_layers=3, version=2, sync_bn=True)
    head.build((None, 8))
  assert all(b.synchronized for b in head.bn_layers)
  x = tf.constant(np.random.rand(4, 8).astype("float32"))
  out = strategy_2.run(tf.function(lambda v: head(v, training=True)["projection"]),
                       args=(x,))
  assert strategy_2.experimental_local_results(out)[0].shape == (4, 4)


def test_config_round_trip_and_errors():
  head = ProjectionHead(64, 32, num_layers=3, version=2, sync_bn=True,
                        bn_momentum=0.99)
  clone = ProjectionHead.from_config(head.get_config())
  assert clone.get_config() == head.get_config()
  with pytest.raises(ValueError, match="version=3"):
    ProjectionHead(8, 8, version=3)
  with pytest.raises(ValueError, match="num_layers=0"):
    ProjectionHead(8, 8, num_layers=0)


def test_mixed_precision_head():
  head = ProjectionHead(16, 4, num_layers=3, version=2, dtype="mixed_bfloat16")
  out = head(np.random.rand(4, 8).astype("float32"), training=True)
  assert {v.dtype for v in head.variables} == {"float32"}
  assert all(out[k].dtype == "bfloat16" for k in ("proj_1", "projection"))
  assert np.isfinite(np.asarray(keras.ops.cast(out["projection"], "float32"))).all()


def test_linear_head_is_zero_initialised():
  head = LinearHead(10, name="probe_head")
  x = np.random.rand(3, 7).astype("float32")
  assert not np.asarray(head(x)).any()
  assert [v.path for v in head.variables] == ["probe_head/kernel",
                                               "probe_head/bias"]
  clone = LinearHead.from_config(head.get_config())
  assert clone.num_classes == 10 and clone.name == "probe_head"
  assert LinearHead(2).name == "linear_head"
