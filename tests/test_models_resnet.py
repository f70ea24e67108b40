"""BN ResNet v1.5: published parameter counts, zero-init residual BN, stems,
synchronised BN across replicas, endpoints, mixed precision, the factory."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_ssl.models import build_backbone, resnet


def n_params(model):
  return sum(int(np.prod(v.shape)) for v in model.trainable_variables)


def test_parameter_counts_match_published():
  # ResNet-50: 25.6M in He et al. (2016); torchvision's resnet50 (the same
  # v1.5 architecture) reports exactly 25,557,032. torchvision's resnet18 has
  # 11,689,512; the SimCLR reference adds a projection shortcut to block1's
  # first unit (1x1 conv 64x64 + BN gamma/beta = 4,224 parameters).
  assert n_params(resnet.resnet(50, num_classes=1000)) == 25_557_032
  assert n_params(resnet.resnet(18, num_classes=1000)) == 11_689_512 + 4_224


@pytest.mark.parametrize("depth", [18, 34, 50])
def test_every_blocks_first_unit_has_a_projection_shortcut(depth):
  # tf2/resnet.py BlockGroup: use_projection=True for the first unit, even
  # where input and output shapes match (block1 of ResNet-18/34).
  model = resnet.resnet(depth)
  for block in model.blocks:
    assert block.units[0].shortcut is not None
    assert all(u.shortcut is None for u in block.units[1:])
  assert "resnet/block1/unit01/projection/conv2d/kernel" in [
      v.path for v in model.variables]


def test_last_bn_gamma_of_every_unit_is_zero_and_bn_settings():
  model = resnet.resnet(18)
  units = [u for block in model.blocks for u in block.units]
  assert len(units) == 8
  for unit in units:
    gammas = [np.asarray(c.bn.gamma) for c in unit.convs]
    assert not gammas[-1].any()
    assert all((g == 1).all() for g in gammas[:-1])
  bns = [model.stem.bn] + [c.bn for u in units for c in u.convs] + [
      u.shortcut.bn for u in units if u.shortcut is not None]
  assert len(bns) == 1 + 16 + 4  # stem, two per unit, one per block's shortcut
  assert all(b.momentum == 0.9 and b.epsilon == 1e-5 and not b.synchronized
             for b in bns)
  # Zero-init residual branches: at init every unit is relu(x + shortcut(x)).


@pytest.mark.parametrize("cifar_stem,size,stem,final", [
    (True, 32, 32, 4), (False, 64, 16, 2), (False, 40, 10, 2)])
def test_endpoints_and_stems(cifar_stem, size, stem, final):
  model = resnet.resnet(18, num_classes=10, cifar_stem=cifar_stem)
  out = model(np.random.rand(2, size, size, 3).astype("float32"))
  assert set(out) == {"stem", "block1", "block2", "block3", "block4",
                      "features", "logits"}
  assert out["stem"].shape == (2, stem, stem, 64)
  assert out["block2"].shape == (2, stem // 2, stem // 2, 128)
  assert out["block4"].shape == (2, final, final, 512)
  assert out["features"].shape == (2, 512) == (2, model.feature_dim)
  np.testing.assert_allclose(np.asarray(out["features"]),
                             np.asarray(out["block4"]).mean(axis=(1, 2)),
                             rtol=1e-5, atol=1e-6)
  assert not np.asarray(out["logits"]).any()  # zero-init "head"
  assert [v.path for v in model.head.variables] == ["resnet/head/kernel",
                                                     "resnet/head/bias"]


def test_bottleneck_widths():
  model = resnet.resnet(50, cifar_stem=True)
  out = model(np.random.rand(1, 8, 8, 3).astype("float32"))
  assert out["block1"].shape[-1] == 256 and model.feature_dim == 2048
  assert build_backbone("resnet18x2").feature_dim == 1024
  small = build_backbone("resnet18x0.25", small_image_stem=True)
  assert small.feature_dim == 128
  assert small(np.zeros((1, 8, 8, 3), "float32"))["block1"].shape[-1] == 16
  for bad in (0.3, 0, -1):  # 64 * 0.3 is not a whole channel count
    with pytest.raises(ValueError, match="width_multiplier"):
      resnet.resnet(18, width_multiplier=bad)


def _forward(model, x):
  return model(x, training=True)["block4"]


@pytest.mark.parametrize("sync_bn", [True, False])
def test_sync_bn_matches_one_device_on_the_global_batch(strategy_2, sync_bn):
  x = np.random.default_rng(0).random((8, 8, 8, 3)).astype("float32")
  reference = resnet.resnet(18, cifar_stem=True)
  with strategy_2.scope():
    model = resnet.resnet(18, cifar_stem=True, sync_bn=sync_bn)
  model.set_weights(reference.get_weights())
  want = np.asarray(_forward(reference, x))

  def shard(ctx):
    return tf.split(x, 2)[ctx.replica_id_in_sync_group]

  local = strategy_2.experimental_distribute_values_from_function(shard)
  got = strategy_2.run(tf.function(lambda v: _forward(model, v)), args=(local,))
  got = np.concatenate([np.asarray(g) for g in
                        strategy_2.experimental_local_results(got)])
  if sync_bn:  # batch statistics over both replicas = the global batch's
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  else:  # per-replica statistics: a different function of the batch
    assert np.abs(got - want).max() > 1e-2


def test_mixed_precision_forward_is_finite():
  previous = keras.mixed_precision.global_policy()
  keras.mixed_precision.set_global_policy("mixed_bfloat16")
  try:
    model = resnet.resnet(18, num_classes=3, cifar_stem=True)
  finally:
    keras.mixed_precision.set_global_policy(previous)
  out = model(np.random.rand(2, 16, 16, 3).astype("float32"), training=True)
  assert {v.dtype for v in model.variables} == {"float32"}
  for name, t in out.items():
    assert t.dtype == "bfloat16", name
    assert np.isfinite(np.asarray(keras.ops.cast(t, "float32"))).all(), name


def test_factory_names():
  assert isinstance(build_backbone("resnet18"), resnet.ResNet)
  m = build_backbone("bit_r26x1", num_classes=2, small_image_stem=True)
  assert m.depth == 26 and m.width == 1 and m.small_image_stem
  m = build_backbone("resnet34", small_image_stem=True, sync_bn=True)
  assert m.cifar_stem and m.sync_bn and m.depth == 34
  for bad in ("resnet19", "bit_r50", "vgg16", "ResNet50"):
    with pytest.raises(ValueError, match=bad):
      build_backbone(bad)


def test_config_round_trip():
  model = resnet.resnet(18, num_classes=5, cifar_stem=True,
                        sync_bn=True, bn_momentum=0.99)
  clone = resnet.ResNet.from_config(model.get_config())
  assert clone.get_config() == model.get_config()
  assert n_params(clone) == n_params(model)


def test_kernel_init_is_the_simclr_references():
  # VarianceScaling() defaults (tf2/resnet.py): truncated normal, variance
  # 1 / fan_in, cut at two standard deviations of the untruncated normal.
  keras.utils.set_random_seed(1)
  model = resnet.resnet(18, cifar_stem=True)
  kernel = np.asarray(model.blocks[1].units[1].convs[0].conv.kernel)  # 3x3x128x128
  fan_in = 3 * 3 * 128
  std = np.sqrt(1 / fan_in)
  assert abs(kernel.std() - std) < 0.02 * std  # He fan-out would be 1.41 x std
  assert np.abs(kernel).max() <= 2 * std / 0.87962566 + 1e-6
  assert abs(kernel.mean()) < 0.02 * std


def test_kernels_of_the_same_shape_start_different_and_reproducibly():
  import keras  # pylint: disable=g-import-not-at-top
  def block1_kernels():
    keras.utils.set_random_seed(3)
    model = resnet.resnet(18, cifar_stem=True)
    return [np.asarray(v) for v in model.variables
            if v.path.startswith("resnet/block1/") and v.path.endswith("kernel")
            and tuple(v.shape[:2]) == (3, 3)]
  first, again = block1_kernels(), block1_kernels()
  assert len(first) == 4  # two units x two 3x3 64->64 convolutions
  for i in range(1, 4):
    assert not np.allclose(first[0], first[i]), "shared initializer seed"
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
