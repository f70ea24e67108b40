"""Projection heads, kind "simclr" (both SimCLR codebases) and "mlp" (SupCon's
PyTorch head): structure, endpoints, initialisation, a NumPy forward; and the
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


def test_simclr_v1_depth_structure_and_endpoints():
  head = ProjectionHead(hidden_dim=32, output_dim=8, num_layers=2)
  out = head(np.random.rand(4, 16).astype("float32"), training=True)
  # model_util.py projection_head (v1): Dense(no bias)-BN-ReLU, then
  # Dense(no bias)-BN(no centre). No layer ends in a biased Dense.
  assert head.kind == "simclr"
  assert structure(head) == [("dense_1", 32, False, ("batch_norm_1", True, True)),
                             ("dense_2", 8, False, ("batch_norm_2", False, True))]
  assert {k: tuple(v.shape) for k, v in out.items()} == {
      "proj_0": (4, 16), "proj_1": (4, 32), "proj_2": (4, 8),
      "projection": (4, 8)}
  assert head.name == "projection_head"
  assert all(v.path.startswith("projection_head/") for v in head.variables)


def test_simclr_v2_depth_structure_and_endpoints():
  head = ProjectionHead(hidden_dim=None, output_dim=8, num_layers=3, kind="simclr")
  x = np.random.rand(4, 16).astype("float32")
  out = head(x, training=True)
  # tf2/model.py ProjectionHead (v2): the same layers, one more of them.
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


def test_mlp_structure_and_forward_matches_numpy():
  # SupContrast resnet_big.py head="mlp": Linear-ReLU-Linear, biases, no BN.
  head = ProjectionHead(hidden_dim=6, output_dim=3, num_layers=3, kind="mlp")
  x = np.random.default_rng(1).normal(size=(4, 5)).astype("float32")
  out = head(x, training=True)
  assert structure(head) == [("dense_1", 6, True, None), ("dense_2", 6, True, None),
                             ("dense_3", 3, True, None)]
  assert not any("batch_norm" in v.path or "moving" in v.path for v in head.variables)
  w = {v.path.split("/", 1)[1]: np.asarray(v, "float64") for v in head.variables}
  h1 = np.maximum(x @ w["dense_1/kernel"] + w["dense_1/bias"], 0)
  h2 = np.maximum(h1 @ w["dense_2/kernel"] + w["dense_2/bias"], 0)
  h3 = h2 @ w["dense_3/kernel"] + w["dense_3/bias"]
  for got, want in ((out["proj_1"], h1), (out["proj_2"], h2), (out["projection"], h3)):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  # Training and inference are the same function without BN.
  np.testing.assert_array_equal(np.asarray(head(x, training=False)["projection"]),
                                np.asarray(out["projection"]))


def test_initialisers_follow_the_reference_code():
  keras.utils.set_random_seed(0)
  simclr = ProjectionHead(256, 128, num_layers=2)
  simclr.build((None, 512))
  for dense in simclr.dense_layers:  # N(0, 0.01^2), as model_util.linear_layer
    assert abs(np.std(np.asarray(dense.kernel)) - 0.01) < 5e-4
  a, b = (np.asarray(d.kernel) for d in simclr.dense_layers)
  assert not np.allclose(a[:128, :128], b[:128, :128])  # not one shared seed
  mlp = ProjectionHead(256, 128, num_layers=2, kind="mlp")
  mlp.build((None, 512))
  for dense, fan_in in zip(mlp.dense_layers, (512, 256)):
    bound = 1 / np.sqrt(fan_in)  # nn.Linear: U(+-1/sqrt(fan_in)) for both
    kernel, bias = np.asarray(dense.kernel), np.asarray(dense.bias)
    assert np.abs(kernel).max() <= bound and np.abs(bias).max() <= bound
    assert abs(np.std(kernel) - bound / np.sqrt(3)) < 0.03 * bound
    assert np.abs(bias).max() > 0.5 * bound  # not zeros


def test_simclr_forward_matches_numpy():
  rng = np.random.default_rng(0)
  head = ProjectionHead(hidden_dim=6, output_dim=3, num_layers=3)
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
    head = ProjectionHead(16, 4, num_layers=3, sync_bn=True)
    head.build((None, 8))
  assert all(b.synchronized for b in head.bn_layers)
  x = tf.constant(np.random.rand(4, 8).astype("float32"))
  out = strategy_2.run(tf.function(lambda v: head(v, training=True)["projection"]),
                       args=(x,))
  assert strategy_2.experimental_local_results(out)[0].shape == (4, 4)


@pytest.mark.parametrize("kind", ["simclr", "mlp"])
def test_config_round_trip(kind):
  head = ProjectionHead(64, 32, num_layers=3, kind=kind, sync_bn=True,
                        bn_momentum=0.99)
  config = head.get_config()
  assert config["kind"] == kind and "version" not in config
  clone = ProjectionHead.from_config(config)
  assert clone.get_config() == config
  head.build((None, 16))
  clone.build((None, 16))
  assert structure(clone) == structure(head)


def test_errors_say_what_to_do():
  with pytest.raises(ValueError, match="kind='v2'.*'simclr'.*'mlp'"):
    ProjectionHead(8, 8, kind="v2")
  with pytest.raises(TypeError, match="kind='simclr' with num_layers=2 \\(v1\\) or 3"):
    ProjectionHead(8, 8, version=2)
  with pytest.raises(ValueError, match="num_layers=0"):
    ProjectionHead(8, 8, num_layers=0)
  with pytest.raises(ValueError, match="feature_dim"):
    ProjectionHead(8, 8).build((None, None))


@pytest.mark.parametrize("kind", ["simclr", "mlp"])
def test_mixed_precision_head(kind):
  head = ProjectionHead(16, 4, num_layers=3, kind=kind, dtype="mixed_bfloat16")
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
