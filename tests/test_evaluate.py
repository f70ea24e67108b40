"""k-NN and linear evaluation against NumPy / scikit-learn and the published
raw-pixel Fashion-MNIST baselines of docs/recipes.md."""

import gzip
import os

import numpy as np
import pytest

from tf_ssl import evaluate

FMNIST = "/usr/share/datasets/fashion-mnist"


def _numpy_knn(train, train_labels, test, num_classes, k, temperature):
  train = train / np.linalg.norm(train, axis=1, keepdims=True)
  test = test / np.linalg.norm(test, axis=1, keepdims=True)
  predictions = []
  for row in test @ train.T:
    nearest = np.argsort(-row)[:k]
    votes = np.zeros(num_classes)
    np.add.at(votes, train_labels[nearest], np.exp(row[nearest] / temperature))
    predictions.append(np.argmax(votes))
  return np.array(predictions)


def test_knn_matches_numpy():
  rng = np.random.default_rng(0)
  train = rng.normal(size=(300, 16))
  labels = rng.integers(0, 5, 300)
  test = rng.normal(size=(50, 16))
  for k, t in [(1, 0.1), (20, 0.1), (200, 0.5)]:
    ours = evaluate.knn_predict(train, labels, test, 5, k=k, temperature=t, chunk_size=17)
    np.testing.assert_array_equal(ours, _numpy_knn(train, labels, test, 5, k, t))


def test_knn_on_its_own_bank_leaves_each_query_out():
  """Data without a held-out split: bank = queries. Leave-one-out must equal a
  NumPy k-NN over the bank without the query's row; without it, k=1 finds
  each query itself (100%), the inflated figure results.json used to show."""
  rng = np.random.default_rng(1)
  bank = rng.normal(size=(120, 8))
  labels = rng.integers(0, 4, 120)
  for k in (1, 7):
    ours = evaluate.knn_predict(bank, labels, bank, 4, k=k, temperature=0.1,
                                chunk_size=50, exclude_self=True)
    reference = [_numpy_knn(np.delete(bank, i, 0), np.delete(labels, i), bank[i:i + 1],
                            4, k, 0.1)[0] for i in range(len(bank))]
    np.testing.assert_array_equal(ours, reference)
  assert evaluate.knn_accuracy(bank, labels, bank, labels, 4, k=1) == 1.0
  assert evaluate.knn_accuracy(bank, labels, bank, labels, 4, k=1, exclude_self=True) < 0.5
  with pytest.raises(ValueError, match="exclude_self"):
    evaluate.knn_predict(bank, labels, bank[:5], 4, exclude_self=True)


def test_linear_close_to_sklearn():
  from sklearn.linear_model import LogisticRegression
  from sklearn.preprocessing import StandardScaler
  rng = np.random.default_rng(1)
  centers = rng.normal(size=(4, 20)) * 0.7
  labels = rng.integers(0, 4, 2000)
  x = centers[labels] + rng.normal(size=(2000, 20))
  x_train, x_test, y_train, y_test = x[:1500], x[1500:], labels[:1500], labels[1500:]
  ours = evaluate.linear_accuracy(x_train, y_train, x_test, y_test, 4)
  scaler = StandardScaler().fit(x_train)
  reference = LogisticRegression(max_iter=1000).fit(scaler.transform(x_train), y_train)
  theirs = reference.score(scaler.transform(x_test), y_test)
  assert 0.5 < theirs < 0.95, "the problem should be neither trivial nor hopeless"
  assert abs(ours - theirs) < 0.015


def _idx(name):
  with gzip.open(os.path.join(FMNIST, name)) as f:
    data = f.read()
  if "labels" in name:
    return np.frombuffer(data, np.uint8, offset=8).astype(np.int64)
  return np.frombuffer(data, np.uint8, offset=16).reshape(-1, 784).astype(np.float32) / 255


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(FMNIST), reason="apt-get install dataset-fashion-mnist")
def test_raw_pixel_baselines_match_published():
  # docs/recipes.md, measured on the test set: k-NN (k=200, cosine, T=0.1) 78.9%;
  # logistic regression on standardised pixels 83.7%.
  x_train, y_train = _idx("train-images-idx3-ubyte.gz"), _idx("train-labels-idx1-ubyte.gz")
  x_test, y_test = _idx("t10k-images-idx3-ubyte.gz"), _idx("t10k-labels-idx1-ubyte.gz")
  knn = evaluate.knn_accuracy(x_train, y_train, x_test, y_test, 10)
  assert knn == pytest.approx(0.789, abs=0.005)
  linear = evaluate.linear_accuracy(x_train, y_train, x_test, y_test, 10)
  assert linear == pytest.approx(0.837, abs=0.01)


def test_distributed_extraction_equals_host_extraction(strategy):
  # 13 examples in global batches of 4: padding on the last batch, and on
  # 4 replicas one example per replica per step. Every replica's rows are
  # gathered, padding dropped, each example's features equal the host's.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tf_ssl.data import from_arrays, pipeline  # pylint: disable=g-import-not-at-top
  from tf_ssl.models import build_backbone  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  source = from_arrays(rng.integers(0, 256, (13, 8, 8, 3), np.uint8), np.arange(13) % 4)
  with strategy.scope():
    backbone = build_backbone("resnet18x0.25", small_image_stem=True)
  host, host_labels = evaluate.extract_features(
      backbone, pipeline.build_eval(source, 4, 8))
  ours, labels = evaluate.extract_features_distributed(
      strategy, backbone, pipeline.eval_dataset(strategy, source, 4, 8))
  assert ours.shape == host.shape == (13, backbone.feature_dim)
  order = lambda f: np.lexsort(f.T)
  np.testing.assert_allclose(ours[order(ours)], host[order(host)], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(labels[order(ours)], host_labels[order(host)])
  assert tf.reduce_any(ours != 0)
