"""StdConv2D and BiT's GroupNorm against plain NumPy references."""

import keras
import numpy as np
import pytest

from tf_ssl.models.layers import StdConv2D, group_norm, symmetric_pad


def np_conv_valid(x, w, stride=1):
  """NHWC x HWIO 'VALID' convolution, written out with explicit loops."""
  kh, kw = w.shape[:2]
  oh = (x.shape[1] - kh) // stride + 1
  ow = (x.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], oh, ow, w.shape[3]))
  for i in range(oh):
    for j in range(ow):
      patch = x[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]
      out[:, i, j, :] = np.einsum("bhwc,hwco->bo", patch, w)
  return out


def np_standardize(w, eps=1e-10):
  mean = w.mean(axis=(0, 1, 2), keepdims=True)
  var = w.var(axis=(0, 1, 2), keepdims=True)
  return (w - mean) / np.sqrt(var + eps)


def np_group_norm(x, gamma, beta, groups=32, eps=1e-5):
  b, h, w, c = x.shape
  g = x.reshape(b, h, w, groups, c // groups)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = g.var(axis=(1, 2, 4), keepdims=True)
  g = (g - mean) / np.sqrt(var + eps)
  return g.reshape(b, h, w, c) * gamma + beta


@pytest.mark.parametrize("stride", [1, 2])
def test_std_conv_matches_numpy(stride):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 7, 7, 4)).astype("float32")
  conv = StdConv2D(5, 3, strides=stride)
  conv.build(x.shape)
  # A kernel far from standardised, so that skipping WS would be visible.
  w = (3.0 + 2.0 * rng.normal(size=(3, 3, 4, 5))).astype("float32")
  conv.kernel.assign(w)
  got = np.asarray(conv(x))
  want = np_conv_valid(x, np_standardize(w.astype("float64")), stride)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  # The variable keeps the raw kernel: released .npz files load unchanged.
  np.testing.assert_array_equal(np.asarray(conv.kernel), w)


def test_std_conv_statistics_are_float32_under_mixed_precision():
  # Mean 100 with spread 0.01: bfloat16 (8 mantissa bits) rounds every weight
  # to 100, so standardising a bfloat16 kernel would give all zeros. The
  # layer must read the float32 kernel and only cast the standardised one.
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 5, 5, 3)).astype("float32")
  w = (100.0 + 0.01 * rng.normal(size=(3, 3, 3, 8))).astype("float32")
  conv = StdConv2D(8, 3, dtype="mixed_bfloat16")
  conv.build(x.shape)
  conv.kernel.assign(w)
  assert conv.kernel.dtype == "float32"
  got = conv(x)
  assert got.dtype == "bfloat16"
  want = np_conv_valid(x, np_standardize(w.astype("float64")))
  got = np.asarray(keras.ops.cast(got, "float32"))
  assert np.abs(want).max() > 1.0
  np.testing.assert_allclose(got, want, rtol=0.05, atol=0.15)


def test_std_conv_rejects_bias_and_round_trips_config():
  with pytest.raises(ValueError, match="no bias"):
    StdConv2D(4, 3, use_bias=True)
  conv = StdConv2D(4, 3, strides=2, name="standardized_conv2d")
  clone = StdConv2D.from_config(conv.get_config())
  assert (clone.filters, clone.strides, clone.ws_epsilon, clone.use_bias) == (
      4, (2, 2), 1e-10, False)


def test_group_norm_matches_numpy():
  rng = np.random.default_rng(2)
  # Small activations (variance ~1e-4): eps 1e-5 vs Keras' default 1e-3
  # changes the output by far more than the tolerance.
  x = (0.01 * rng.normal(size=(2, 3, 3, 64)) + 0.5).astype("float32")
  gn = group_norm()
  gn.build(x.shape)
  gamma = rng.normal(size=64).astype("float32")
  beta = rng.normal(size=64).astype("float32")
  gn.gamma.assign(gamma)
  gn.beta.assign(beta)
  want = np_group_norm(x.astype("float64"), gamma, beta)
  np.testing.assert_allclose(np.asarray(gn(x)), want, rtol=1e-3, atol=1e-3)
  assert (gn.groups, gn.epsilon, gn.name) == (32, 1e-5, "group_norm")


def test_symmetric_pad():
  x = np.ones((1, 2, 3, 1), "float32")
  y = np.asarray(symmetric_pad(x, 2))
  assert y.shape == (1, 6, 7, 1)
  assert y.sum() == 6 and y[0, 2:4, 2:5, 0].sum() == 6
