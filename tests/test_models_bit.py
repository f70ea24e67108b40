"""BiT ResNet-v2: released key layout, parameter count, .npz loading, shapes,
and one pre-activation unit against a NumPy reference."""

import keras
import numpy as np
import pytest

from tf_ssl.models import bit
from test_models_layers import np_conv_valid, np_group_norm, np_standardize


def released_r50x1_shapes(head_size):
  """Every array of a released BiT R50x1 .npz, written from the published
  key names (docs/recipes.md; big_transfer's loaders) and HWIO shapes."""
  shapes = {"resnet/root_block/standardized_conv2d/kernel": (7, 7, 3, 64)}
  cin = 64
  for b, units in enumerate((3, 4, 6, 3)):
    mid = 64 * 2**b
    for u in range(1, units + 1):
      p = f"resnet/block{b + 1}/unit{u:02d}/"
      shapes[p + "a/group_norm/gamma"] = (cin,)
      shapes[p + "a/group_norm/beta"] = (cin,)
      shapes[p + "a/standardized_conv2d/kernel"] = (1, 1, cin, mid)
      if u == 1:
        shapes[p + "a/proj/standardized_conv2d/kernel"] = (1, 1, cin, 4 * mid)
      for part in ("b", "c"):
        shapes[p + part + "/group_norm/gamma"] = (mid,)
        shapes[p + part + "/group_norm/beta"] = (mid,)
      shapes[p + "b/standardized_conv2d/kernel"] = (3, 3, mid, mid)
      shapes[p + "c/standardized_conv2d/kernel"] = (1, 1, mid, 4 * mid)
      cin = 4 * mid
  shapes["resnet/group_norm/gamma"] = (2048,)
  shapes["resnet/group_norm/beta"] = (2048,)
  shapes["resnet/head/conv2d/kernel"] = (1, 1, 2048, head_size)
  shapes["resnet/head/conv2d/bias"] = (head_size,)
  return shapes


def n_params(model):
  return sum(int(np.prod(v.shape)) for v in model.trainable_variables)


@pytest.fixture(scope="module")
def r50x1():
  return bit.resnet_v2(50, 1, num_classes=1000)  # a BiT-S head


def test_r50x1_variable_paths_are_the_released_keys(r50x1):
  got = {v.path: tuple(v.shape) for v in r50x1.variables}
  assert got == released_r50x1_shapes(1000)
  assert r50x1.feature_dim == 2048


def test_r50x1_parameter_count(r50x1):
  # timm's model cards for the released weights: resnetv2_50x1_bit
  # .goog_in21k_ft_in1k "Params (M): 25.5" (1000 classes) and .goog_in21k
  # "Params (M): 68.3" (21843 classes, BiT-M).
  assert round(n_params(r50x1) / 1e6, 1) == 25.5
  backbone = n_params(r50x1) - (2048 * 1000 + 1000)
  assert round((backbone + 2048 * 21843 + 21843) / 1e6, 1) == 68.3
  assert n_params(bit.resnet_v2(50, 1)) == backbone


def write_npz(path, shapes, seed=0):
  rng = np.random.default_rng(seed)
  arrays = {k: rng.normal(size=s).astype("float32") for k, s in shapes.items()}
  np.savez(path, **arrays)
  return arrays


def test_load_released_layout_round_trip(r50x1, tmp_path):
  path = tmp_path / "BiT-S-R50x1.npz"
  arrays = write_npz(path, released_r50x1_shapes(1000))
  loaded = bit.load_bit_npz(r50x1, path, head="keep")
  assert loaded == sorted(arrays)  # every key consumed
  for v in r50x1.variables:
    np.testing.assert_array_equal(np.asarray(v), arrays[v.path])
  # head="drop": backbone loaded, head reset to zeros (a new zero-init head).
  loaded = bit.load_bit_npz(r50x1, path, head="drop")
  assert len(loaded) == len(arrays) - 2
  for v in r50x1.variables:
    if v.path.startswith("resnet/head/"):
      assert not np.asarray(v).any()
    else:
      np.testing.assert_array_equal(np.asarray(v), arrays[v.path])


def test_drop_head_loads_into_a_model_with_another_head_size(tmp_path):
  model = bit.resnet_v2(18, 0.5, num_classes=7, small_image_stem=True)
  shapes = {k: tuple(v.shape) for k, v in bit.checkpoint_keys(model).items()}
  shapes["resnet/head/conv2d/kernel"] = (1, 1, 256, 21843)
  shapes["resnet/head/conv2d/bias"] = (21843,)
  write_npz(tmp_path / "m.npz", shapes)
  bit.load_bit_npz(model, tmp_path / "m.npz", head="drop")
  with pytest.raises(ValueError, match=r"resnet/head/conv2d/bias: file shape "
                     r"\(21843,\) != model shape \(7,\)"):
    bit.load_bit_npz(model, tmp_path / "m.npz", head="keep")
  headless = bit.resnet_v2(18, 0.5, small_image_stem=True)
  bit.load_bit_npz(headless, tmp_path / "m.npz")
  with pytest.raises(ValueError, match="model has none"):
    bit.load_bit_npz(headless, tmp_path / "m.npz", head="keep")


@pytest.fixture(scope="module")
def tiny():
  return bit.resnet_v2(18, 0.5, num_classes=3, small_image_stem=True)


def test_load_errors_name_key_and_shapes(tiny, tmp_path):
  good = {k: tuple(v.shape) for k, v in bit.checkpoint_keys(tiny).items()}
  key = "resnet/block2/unit01/b/standardized_conv2d/kernel"
  assert good[key] == (3, 3, 64, 64)
  before = [np.asarray(v).copy() for v in tiny.variables]

  write_npz(tmp_path / "missing.npz", {k: s for k, s in good.items() if k != key})
  with pytest.raises(ValueError, match=rf"{key}: missing from the file \(model "
                     r"shape \(3, 3, 64, 64\)\)"):
    bit.load_bit_npz(tiny, tmp_path / "missing.npz", head="keep")

  extra = dict(good, **{"resnet/block5/unit01/a/group_norm/gamma": (8,)})
  write_npz(tmp_path / "extra.npz", extra)
  with pytest.raises(ValueError, match=r"resnet/block5/unit01/a/group_norm/"
                     r"gamma: in the file \(shape \(8,\)\) but not in the model"):
    bit.load_bit_npz(tiny, tmp_path / "extra.npz", head="keep")

  write_npz(tmp_path / "shape.npz", dict(good, **{key: (3, 3, 64, 128)}))
  with pytest.raises(ValueError, match=rf"{key}: file shape \(3, 3, 64, 128\) "
                     r"!= model shape \(3, 3, 64, 64\)"):
    bit.load_bit_npz(tiny, tmp_path / "shape.npz", head="keep")
  # A failed load assigns nothing.
  for v, b in zip(tiny.variables, before):
    np.testing.assert_array_equal(np.asarray(v), b)

  with pytest.raises(ValueError, match="'drop' or 'keep'"):
    bit.load_bit_npz(tiny, tmp_path / "shape.npz", head="new")


def test_load_refuses_pickled_arrays(tiny, tmp_path):
  np.savez(tmp_path / "p.npz", x=np.array([{"a": 1}], dtype=object))
  with pytest.raises(ValueError, match="allow_pickle"):
    bit.load_bit_npz(tiny, tmp_path / "p.npz")


@pytest.mark.parametrize("depth,width,small,size,stem,final", [
    (18, 0.5, True, 32, 32, 4),
    (26, 0.5, False, 64, 16, 2),
    (26, 0.5, False, 48, 12, 2),
])
def test_output_shapes(depth, width, small, size, stem, final):
  model = bit.resnet_v2(depth, width, num_classes=5, small_image_stem=small)
  out = model(np.random.rand(2, size, size, 3).astype("float32"))
  c = int(64 * width)
  expand = 4 if depth == 26 else 1
  assert set(out) == {"stem", "block1", "block2", "block3", "block4",
                      "features", "logits"}
  assert out["stem"].shape == (2, stem, stem, c)
  assert out["block1"].shape == (2, stem, stem, c * expand)
  assert out["block4"].shape == (2, final, final, 8 * c * expand)
  assert out["features"].shape == (2, model.feature_dim)
  assert model.feature_dim == 8 * c * expand
  # Zero-init head: logits start at exactly zero.
  assert out["logits"].shape == (2, 5) and not np.asarray(out["logits"]).any()


def test_root_pads_with_zeros_before_the_max_pool():
  model = bit.resnet_v2(26, 0.5)
  x = np.random.default_rng(3).random((1, 20, 20, 3)).astype("float32")
  conv = np.asarray(model.root.conv(np.pad(2 * x - 1, [(0, 0), (3, 3), (3, 3),
                                                        (0, 0)])))
  padded = np.pad(conv, [(0, 0), (1, 1), (1, 1), (0, 0)])  # zeros, not -inf
  want = np.stack([np.stack([padded[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3].max(
      axis=(1, 2)) for j in range(5)], 1) for i in range(5)], 1)
  np.testing.assert_allclose(np.asarray(model(x)["stem"]), want, atol=1e-5)


def test_bottleneck_unit_matches_numpy():
  """block2/unit01 of a tiny R26: stride 2 on the 3x3, projection of the
  pre-activated input, symmetric padding."""
  model = bit.resnet_v2(26, 0.5)
  unit = model.blocks[1].units[0]
  rng = np.random.default_rng(4)
  for v in unit.variables:  # non-trivial GN affine parameters too
    v.assign(rng.normal(size=v.shape).astype("float32"))
  w = {v.path.split("unit01/")[1]: np.asarray(v, "float64")
       for v in unit.variables}
  x = rng.normal(size=(1, 6, 6, 128)).astype("float32")

  def pre(h, part):
    return np.maximum(np_group_norm(h, w[f"{part}/group_norm/gamma"],
                                    w[f"{part}/group_norm/beta"]), 0)

  def conv(h, part, stride=1, pad=0):
    h = np.pad(h, [(0, 0), (pad, pad), (pad, pad), (0, 0)])
    return np_conv_valid(h, np_standardize(w[f"{part}/kernel"]), stride)

  a = pre(x.astype("float64"), "a")
  shortcut = conv(a, "a/proj/standardized_conv2d", stride=2)
  h = conv(a, "a/standardized_conv2d")
  h = conv(pre(h, "b"), "b/standardized_conv2d", stride=2, pad=1)
  h = conv(pre(h, "c"), "c/standardized_conv2d")
  want = h + shortcut
  got = np.asarray(unit(x))
  assert got.shape == want.shape == (1, 3, 3, 256)
  np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)


def test_paths_stay_top_level_inside_another_model():
  class Outer(keras.Model):

    def __init__(self):
      super().__init__(name="outer")
      self.backbone = bit.resnet_v2(18, 0.5, small_image_stem=True)

    def call(self, x):
      return self.backbone(x)["features"]

  outer = Outer()
  outer(np.zeros((1, 8, 8, 3), "float32"))
  assert all(v.path.startswith("resnet/") for v in outer.variables)


@pytest.fixture
def mixed_bfloat16():
  previous = keras.mixed_precision.global_policy()
  keras.mixed_precision.set_global_policy("mixed_bfloat16")
  yield
  keras.mixed_precision.set_global_policy(previous)


def test_mixed_precision_forward_is_finite(mixed_bfloat16):
  del mixed_bfloat16
  model = bit.resnet_v2(18, 0.5, num_classes=4, small_image_stem=True)
  out = model(np.random.rand(2, 16, 16, 3).astype("float32"), training=True)
  assert {v.dtype for v in model.variables} == {"float32"}
  for name, t in out.items():
    assert t.dtype == "bfloat16", name
    assert np.isfinite(np.asarray(keras.ops.cast(t, "float32"))).all(), name


def test_bad_arguments():
  with pytest.raises(ValueError, match="depth=77"):
    bit.resnet_v2(77, 1)
  with pytest.raises(ValueError, match="multiple of 32"):
    bit.resnet_v2(50, 0.25)


def test_keras_save_and_load_round_trip(tiny, tmp_path):
  x = np.random.default_rng(5).random((2, 8, 8, 3)).astype("float32")
  tiny.save(tmp_path / "tiny.keras")
  clone = keras.saving.load_model(tmp_path / "tiny.keras")
  assert isinstance(clone, bit.ResNetV2)
  assert [v.path for v in clone.variables] == [v.path for v in tiny.variables]
  np.testing.assert_allclose(np.asarray(clone(x)["features"]),
                             np.asarray(tiny(x)["features"]), atol=1e-6)
