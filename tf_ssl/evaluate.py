"""Evaluation of frozen features: weighted k-NN and a linear classifier.

Both follow the protocol under which the Fashion-MNIST baselines of
docs/recipes.md were measured, so the numbers are comparable:
- k-NN (Wu et al. 2018, as used by SimCLR re-implementations): cosine
  similarity to every training feature, the k most similar vote for their
  class with weight exp(similarity / T); k=200, T=0.1.
- Linear: multinomial logistic regression on standardised features (mean and
  std of the training features), trained full-batch to convergence.
"""

import keras
import numpy as np
import tensorflow as tf


def extract_features(embed_fn, batches, endpoint="features"):
  """Runs `embed_fn` over eval batches and keeps the real (unpadded) rows.

  Args:
    embed_fn: images [B, H, W, 3] in [0, 1] -> dict of endpoints (a backbone
      or a ContrastiveModel called with training=False).
    batches: an iterable of {"image", "label", "mask"} batches (the padded
      eval batches of tf_ssl.data), each example appearing exactly once with
      mask 1.
    endpoint: which endpoint to keep.

  Returns:
    (features float32 [N, D], labels int64 [N]) as NumPy arrays.
  """
  embed = tf.function(lambda images: embed_fn(images, training=False)[endpoint])
  features, labels = [], []
  for batch in batches:
    keep = np.asarray(batch["mask"]) > 0
    out = tf.cast(embed(batch["image"]), tf.float32).numpy()
    features.append(out.reshape(out.shape[0], -1)[keep])
    labels.append(np.asarray(batch["label"])[keep])
  if not features:
    raise ValueError("extract_features got no batches: is the eval split empty?")
  return np.concatenate(features), np.concatenate(labels)


def extract_pooled_features(embed_fn, batches, endpoints):
  """Globally average-pooled features of several endpoints in one pass.

  For layer-wise probes (tools/layer_probe.py): feature maps [B, H, W, C]
  (a backbone's "stem", "block1".."block4") are averaged over H and W to
  [B, C] inside the traced function, so no map is kept; [B, D] endpoints
  ("features") are kept as they are.

  Args:
    embed_fn: as in extract_features.
    batches: as in extract_features.
    endpoints: the names to keep, e.g. ["stem", "block1", "features"].

  Returns:
    ({endpoint: float32 [N, C]} in the order of `endpoints`, labels int64
    [N]) as NumPy arrays.
  """
  def pooled(images):
    out = embed_fn(images, training=False)
    result = {}
    for name in endpoints:
      x = tf.cast(out[name], tf.float32)
      result[name] = tf.reduce_mean(x, axis=[1, 2]) if x.shape.rank == 4 else x
    return result

  embed = tf.function(pooled)
  features, labels = {name: [] for name in endpoints}, []
  for batch in batches:
    keep = np.asarray(batch["mask"]) > 0
    out = embed(batch["image"])
    for name in endpoints:
      features[name].append(out[name].numpy()[keep])
    labels.append(np.asarray(batch["label"])[keep])
  if not labels:
    raise ValueError("extract_features got no batches: is the eval split empty?")
  return ({name: np.concatenate(features[name]) for name in endpoints},
          np.concatenate(labels))


def extract_features_distributed(strategy, embed_fn, batches, endpoint="features"):
  """extract_features on every replica of `strategy`, gathered on each host.

  Args:
    strategy: the tf.distribute strategy `batches` was distributed with.
    embed_fn: as in extract_features; its variables (if any) were created
      under `strategy.scope()`.
    batches: distributed eval batches (tf_ssl.data.pipeline.eval_dataset):
      every example once over all replicas, padding rows with mask 0.
    endpoint: which endpoint to keep.

  Returns:
    (features float32 [N, D], labels int64 [N]) as NumPy arrays, the same
    on every worker: the features are computed where the model lives (TPU
    cores, GPUs, every worker's CPUs) and gathered across all replicas, so
    the k-NN and linear fits that follow see the whole split. Row order
    follows the replicas, not the source.
  """
  def embed(batch):
    out = tf.cast(embed_fn(batch["image"], training=False)[endpoint], tf.float32)
    return (tf.reshape(out, [tf.shape(out)[0], -1]), batch["label"], batch["mask"])

  @tf.function
  def step(batch):
    return [strategy.gather(t, axis=0)
            for t in strategy.run(embed, args=(batch,))]

  features, labels = [], []
  for batch in batches:
    out, label, mask = (t.numpy() for t in step(batch))
    keep = mask > 0
    features.append(out[keep])
    labels.append(label[keep])
  if not features:
    raise ValueError("extract_features got no batches: is the eval split empty?")
  return np.concatenate(features), np.concatenate(labels)


def knn_predict(train_features, train_labels, test_features, num_classes, k=200,
                temperature=0.1, chunk_size=1024, exclude_self=False):
  """Weighted k-NN class predictions for each test feature (cosine similarity).

  exclude_self: the test features are the training features, row for row
  (data without a held-out split); query i then never votes for itself, as
  bank row i is left out of its neighbours (leave-one-out).
  """
  if k < 1:
    raise ValueError(f"k={k} must be >= 1.")
  if exclude_self and len(test_features) != len(train_features):
    raise ValueError(f"exclude_self needs the bank as queries: {len(train_features)} "
                     f"bank rows but {len(test_features)} queries.")
  k = min(k, len(train_features) - int(exclude_self))
  train = tf.math.l2_normalize(tf.constant(train_features, tf.float32), axis=1)
  labels = tf.one_hot(tf.constant(train_labels, tf.int64), num_classes)
  predictions = []
  for start in range(0, len(test_features), chunk_size):
    test = tf.math.l2_normalize(
        tf.constant(test_features[start:start + chunk_size], tf.float32), axis=1)
    similarity = tf.matmul(test, train, transpose_b=True)
    if exclude_self:
      rows = tf.range(tf.shape(test)[0])
      similarity = tf.tensor_scatter_nd_update(
          similarity, tf.stack([rows, rows + start], axis=1),
          tf.fill(tf.shape(rows), -float("inf")))
    similarity, index = tf.math.top_k(similarity, k=k)
    weights = tf.exp(similarity / temperature)
    votes = tf.einsum("nk,nkc->nc", weights, tf.gather(labels, index))
    predictions.append(tf.argmax(votes, axis=1).numpy())
  return np.concatenate(predictions)


def knn_accuracy(train_features, train_labels, test_features, test_labels,
                 num_classes, k=200, temperature=0.1, exclude_self=False):
  """Top-1 accuracy of `knn_predict` on the test set."""
  predicted = knn_predict(train_features, train_labels, test_features, num_classes,
                          k=k, temperature=temperature, exclude_self=exclude_self)
  return float(np.mean(predicted == np.asarray(test_labels)))


def linear_accuracy(train_features, train_labels, test_features, test_labels,
                    num_classes, l2=1e-4, steps=1000, learning_rate=0.05):
  """Top-1 test accuracy of logistic regression on standardised features.

  Full-batch Adam on the mean cross-entropy plus `l2` times the squared
  weight norm (no penalty on the bias). Features are standardised with the
  training mean and std; constant features are left at zero.
  """
  train = np.asarray(train_features, np.float32)
  mean, std = train.mean(0), train.std(0)
  std[std == 0] = 1.0
  x = tf.constant((train - mean) / std)
  x_test = tf.constant((np.asarray(test_features, np.float32) - mean) / std)
  y = tf.constant(train_labels, tf.int64)
  w = tf.Variable(tf.zeros((x.shape[1], num_classes)))
  b = tf.Variable(tf.zeros((num_classes,)))
  optimizer = keras.optimizers.Adam(learning_rate)

  @tf.function
  def step():
    with tf.GradientTape() as tape:
      logits = tf.matmul(x, w) + b
      loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
      loss += l2 * tf.reduce_sum(tf.square(w))
    optimizer.apply_gradients(zip(tape.gradient(loss, [w, b]), [w, b]))

  for _ in range(steps):
    step()
  predicted = tf.argmax(tf.matmul(x_test, w) + b, axis=1).numpy()
  return float(np.mean(predicted == np.asarray(test_labels)))
