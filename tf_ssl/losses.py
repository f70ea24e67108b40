"""Self-supervised losses, exact over the global batch of every replica.

Each loss takes the LOCAL (per-replica) rows, gathers over all replicas with
a differentiable all-gather where the method contrasts across the batch
(nt_xent, supcon, moco_v3's keys), and reduces over the local rows only.
None divides by the replica count: the train step does that in exactly one
place (docs/recipes.md, "NT-Xent"; the SimCLR reference's tf2/run.py does
the same). Outside a replica context they are ordinary single-device losses.

Scales follow each method's reference code, which matters under LARS (the
trust ratio cancels the loss scale for adapted variables but not for the
excluded BN parameters and biases, and weight decay is added to the gradient
before the ratio) and under SGD (it is the learning rate):
  nt_xent: the SUM of the two directions' batch means, loss_a + loss_b, as
    both SimCLR codebases optimise (objective.py, tf2/objective.py).
  supcon: the mean over all anchors (SupContrast's losses.py).
  byol: one direction's mean of 2 - 2 cos; the method adds both directions.
  moco: the mean cross-entropy over the queries (MoCo v2's one direction).
  moco_v3: the mean cross-entropy times 2 * temperature, one direction.
So `supcon` with distinct labels and two views is HALF of `nt_xent`.
"""

import tensorflow as tf

from tf_ssl import distribute

# Subtracted from a logit to drop it from a softmax. Finite (unlike -inf), so
# masked rows and their gradients never produce NaN (0 * -inf).
_MASK = 1e9


def _normalized(x):
  # Mixed precision hands us bfloat16; the softmax over thousands of logits
  # needs float32. l2_normalize clamps the squared norm at 1e-12, so a zero
  # vector maps to zero instead of NaN.
  return tf.math.l2_normalize(tf.cast(x, tf.float32), axis=-1)


def _check_temperature(temperature):
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}.")


def nt_xent(z1, z2, temperature):
  """SimCLR's NT-Xent loss over the global batch of all replicas.

  For the local row i with global index g = i + replica_id * B, the anchor
  z1_i is scored against z2 of every example (the positive is z2_g) and z1 of
  every other example; the z2 side is symmetric (docs/recipes.md, "NT-Xent").

  Scale: the reference's loss_a + loss_b, i.e. mean_i CE(ab|aa)_i +
  mean_i CE(ba|bb)_i over the B local rows (SimCLR's objective.py and
  tf2/objective.py). This is twice the mean over the 2B anchors, and twice
  `supcon` with distinct labels, two views and base_temperature ==
  temperature. Halving it is not harmless: under LARS it halves the step of
  the variables excluded from adaptation (BN, biases) and doubles weight
  decay relative to the gradient; under SGD it halves the learning rate.

  Args:
    z1: [B, D] projections of the first view on this replica (any float dtype;
      they are cast to float32 and l2-normalised here).
    z2: [B, D] projections of the second view, row-aligned with z1.
    temperature: softmax temperature tau > 0 (0.1 ImageNet, 0.5 CIFAR).

  Returns:
    (loss, metrics): loss is a float32 scalar, the sum of the two directions'
    means over this replica's rows (not divided by the replica count).
    metrics holds float32 scalars without gradient: "contrast_acc", the top-1
    accuracy of the positive among the cross-view logits (z1 vs all z2 and z2
    vs all z1, averaged), and "contrast_entropy", the mean entropy of
    softmax(z1 . z2_all / tau).
  """
  _check_temperature(temperature)
  z1, z2 = tf.convert_to_tensor(z1), tf.convert_to_tensor(z2)
  if z1.shape.rank != 2 or z1.shape != z2.shape:
    raise ValueError(f"nt_xent needs z1, z2 of the same shape [B, D]; got "
                     f"{z1.shape} and {z2.shape}.")
  z1, z2 = _normalized(z1), _normalized(z2)
  b = tf.shape(z1)[0]
  # One gather of [B, 2D] instead of two of [B, D]: half the collectives.
  both = distribute.cross_replica_concat(tf.concat([z1, z2], axis=1))
  z1_all, z2_all = tf.split(both, 2, axis=1)
  n = tf.shape(both)[0]
  # Columns [0, N) are the z1 of every example, [N, 2N) the z2. One [2B, 2N]
  # matmul replaces the reference's four [B, N] ones plus two concatenations;
  # the order of columns inside a softmax is irrelevant, only the labels move.
  # Dividing the [2B, D] anchors rather than the [2B, 2N] logits by tau saves
  # a pass over (and a copy of) the largest tensor.
  anchors = tf.concat([z1, z2], axis=0) / temperature
  logits = tf.matmul(anchors, tf.concat([z1_all, z2_all], axis=0),
                     transpose_b=True)
  g = tf.range(b) + distribute.replica_id() * b
  positive = tf.concat([g + n, g], axis=0)  # z1_i <-> z2_g, z2_i <-> z1_g
  self_idx = tf.concat([g, g + n], axis=0)
  rows = tf.range(2 * b)
  # Drop each anchor's similarity with itself (always 1/tau) from its softmax.
  logits = tf.tensor_scatter_nd_sub(
      logits, tf.stack([rows, self_idx], axis=1),
      tf.fill([2 * b], tf.constant(_MASK, tf.float32)))
  # Sum over the 2B anchors / B: each direction's batch mean, added.
  loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
      labels=positive, logits=logits)) / tf.cast(b, tf.float32)

  logits = tf.stop_gradient(logits)
  # Cross-view blocks: rows z1 against columns z2_all, rows z2 against z1_all.
  logits_ab, logits_ba = logits[:b, n:], logits[b:, :n]
  hits = tf.concat([tf.argmax(logits_ab, axis=1, output_type=tf.int32),
                    tf.argmax(logits_ba, axis=1, output_type=tf.int32)], 0)
  acc = tf.reduce_mean(tf.cast(tf.equal(hits, tf.concat([g, g], 0)), tf.float32))
  log_p = tf.nn.log_softmax(logits_ab, axis=1)
  entropy = -tf.reduce_mean(tf.reduce_sum(tf.exp(log_p) * log_p, axis=1))
  return loss, {"contrast_acc": acc, "contrast_entropy": entropy}


def _masked_logsumexp(x, mask):
  """logsumexp of x over axis 1 where mask is 1; about -1e9 on empty rows."""
  return tf.reduce_logsumexp(x - _MASK * (1.0 - mask), axis=1)


def supcon(features, labels, temperature, base_temperature=0.07,
           contrast_mode="all", summation="outside", denominator="all"):
  """Supervised Contrastive loss (Khosla et al. 2020) over all replicas.

  Anchors are this replica's views; the contrast set is every view of every
  example on every replica (features and labels are gathered). For an anchor
  i, P(i) are the views with i's label other than i itself, A(i) all views
  except i, and s_ia = z_i . z_a / temperature (docs/recipes.md, "Supervised
  Contrastive loss").

  Unlabelled examples (label < 0, the pipeline's -1) are not one class: each
  gets an id of its own over the global batch, so its views' only positives
  are the other views of the same example (SimCLR's positives). Treating -1
  as a label would pull every unlabelled image towards every other one.

  Per anchor, with log_prob(i, p) = s_ip - log(sum_{a in D(i, p)} exp(s_ia)):
    summation="outside" (L_out, the paper's recommended Eq. 2):
      -1/|P(i)| sum_{p in P(i)} log_prob(i, p)
    summation="inside" (L_in, Eq. 3):
      -log(1/|P(i)| sum_{p in P(i)} exp(log_prob(i, p)))
  where the denominator set D(i, p) is
    denominator="all": A(i), every other view, positives included;
    denominator="negatives": p itself plus the views with a different label;
      the other positives are left out (the TF reference's "one_positive"
      mode; its "only_negatives", which drops p too, is not offered).
  An anchor with no positive (possible with one view or contrast_mode "one"
  and a label seen once) contributes 0. The loss is the mean over ALL local
  anchors (those with no positive included, as in the PyTorch reference),
  times temperature / base_temperature, and is not divided by the replica
  count (SupContrast's losses.py reduces the same way). With distinct labels,
  V=2, contrast_mode="all" and base_temperature == temperature it equals
  half of `nt_xent(features[:, 0], features[:, 1], ...)`, whose reference
  scale sums the two directions.

  Args:
    features: [B, V, D] local projections, V views per example (any float
      dtype; cast to float32 and l2-normalised here).
    labels: [B] integer class labels of this replica's examples; negative
      means unlabelled (positives: the example's own other views only).
    temperature: softmax temperature tau > 0 (0.1 in the paper).
    base_temperature: the loss is scaled by temperature / base_temperature
      (0.07 in the PyTorch reference); pass temperature for no scaling.
    contrast_mode: "all" (every local view is an anchor) or "one" (only view
      0 is; all views stay in the contrast set).
    summation: "outside" (L_out) or "inside" (L_in).
    denominator: "all" or "negatives", as above.

  Returns:
    (loss, metrics): loss is a float32 scalar. metrics holds float32 scalars
    without gradient: "contrast_acc", the fraction of anchors with a positive
    whose most similar view in A(i) is a positive, and "contrast_entropy", the
    mean entropy of the softmax over A(i).
  """
  _check_temperature(temperature)
  if not base_temperature > 0:
    raise ValueError(f"base_temperature must be > 0, got {base_temperature}.")
  for name, value, allowed in (("contrast_mode", contrast_mode, ("all", "one")),
                               ("summation", summation, ("outside", "inside")),
                               ("denominator", denominator, ("all", "negatives"))):
    if value not in allowed:
      raise ValueError(f"supcon {name}={value!r}; choose one of {allowed}.")
  features = tf.convert_to_tensor(features)
  if features.shape.rank != 3:
    raise ValueError(f"supcon needs features [B, V, D]; got {features.shape}. "
                     "For one view per example, add an axis: x[:, None].")
  features = _normalized(features)
  labels = tf.reshape(tf.cast(labels, tf.int32), [-1])
  b, v, d = tf.unstack(tf.shape(features))
  # An unlabelled row becomes class -(1 + its global index): unique over
  # the global batch and never equal to a real (non-negative) label.
  global_idx = tf.range(b) + distribute.replica_id() * b
  labels = tf.where(labels < 0, -1 - global_idx, labels)
  all_features = distribute.cross_replica_concat(features)
  all_labels = distribute.cross_replica_concat(labels)
  # Example-major contrast set: view j of global example m is row m * V + j,
  # so this replica's views are the contiguous rows from replica_id * B * V.
  contrast = tf.reshape(all_features, [-1, d])
  contrast_labels = tf.repeat(all_labels, v)
  first = distribute.replica_id() * b * v
  if contrast_mode == "all":
    anchors = tf.reshape(features, [-1, d])
    anchor_idx = first + tf.range(b * v)
    anchor_labels = tf.repeat(labels, v)
  else:
    anchors = features[:, 0]
    anchor_idx = first + tf.range(b) * v
    anchor_labels = labels

  logits = tf.matmul(anchors / temperature, contrast, transpose_b=True)
  self_mask = tf.one_hot(anchor_idx, tf.shape(contrast)[0], dtype=tf.float32)
  same = tf.cast(tf.equal(anchor_labels[:, None], contrast_labels[None, :]),
                 tf.float32)
  positives = same - self_mask  # an anchor always shares its own label
  num_pos = tf.reduce_sum(positives, axis=1)

  log_denominator_all = _masked_logsumexp(logits, 1.0 - self_mask)[:, None]
  if denominator == "all":
    log_prob = logits - log_denominator_all
  else:
    # log(e^s / (e^s + e^L)) = -softplus(L - s), L = logsumexp of negatives.
    log_negatives = _masked_logsumexp(logits, 1.0 - same)[:, None]
    log_prob = -tf.nn.softplus(log_negatives - logits)
  if summation == "outside":
    per_anchor = -tf.math.divide_no_nan(
        tf.reduce_sum(positives * log_prob, axis=1), num_pos)
  else:
    log_mean = (_masked_logsumexp(log_prob, positives)
                - tf.math.log(tf.maximum(num_pos, 1.0)))
    # tf.where passes a zero gradient to the unused branch, so the ~1e9 of an
    # anchor without positives never reaches the loss or the gradients.
    per_anchor = tf.where(num_pos > 0, -log_mean, tf.zeros_like(log_mean))
  loss = (temperature / base_temperature) * tf.reduce_mean(per_anchor)

  log_p = tf.stop_gradient(logits - log_denominator_all)
  entropy = -tf.reduce_mean(tf.reduce_sum(
      (1.0 - self_mask) * tf.exp(log_p) * log_p, axis=1))
  best = tf.argmax(log_p - _MASK * self_mask, axis=1, output_type=tf.int32)
  hit = tf.gather(positives, best, batch_dims=1)
  has_pos = tf.cast(num_pos > 0, tf.float32)
  acc = tf.math.divide_no_nan(tf.reduce_sum(hit * has_pos),
                              tf.reduce_sum(has_pos))
  return loss, {"contrast_acc": acc, "contrast_entropy": entropy}


def _check_pair(name, a, b, a_name, b_name):
  if a.shape.rank != 2 or a.shape != b.shape:
    raise ValueError(f"{name} needs {a_name}, {b_name} of the same shape "
                     f"[B, D]; got {a.shape} and {b.shape}.")


def _contrast_metrics(logits, positive):
  """(top-1 accuracy of `positive`, mean softmax entropy) of [B, C] logits,
  float32 scalars without gradient."""
  logits = tf.stop_gradient(logits)
  hits = tf.argmax(logits, axis=1, output_type=tf.int32)
  acc = tf.reduce_mean(tf.cast(tf.equal(hits, positive), tf.float32))
  log_p = tf.nn.log_softmax(logits, axis=1)
  entropy = -tf.reduce_mean(tf.reduce_sum(tf.exp(log_p) * log_p, axis=1))
  return {"contrast_acc": acc, "contrast_entropy": entropy}


def byol(p, z):
  """BYOL's regression loss, one direction (docs/recipes.md, "BYOL").

  For each local row i, 2 - 2 cos(p_i, z_i), with both vectors l2-normalised
  as x * rsqrt(max(|x|^2, 1e-12)) (a zero vector has cosine 0 with anything).
  z is the target network's projection and gets no gradient.

  Scale: the mean over this replica's B rows of one direction. The method
  optimises the SUM of the two directions, byol(p1, z2) + byol(p2, z1), as
  the BYOL reference does (not their mean). No gathering is needed: with
  equal per-replica batches the train step's mean over replicas of the
  per-replica means is the global mean.

  Args:
    p: [B, D] online predictions of one view on this replica (any float
      dtype; cast to float32 and l2-normalised here).
    z: [B, D] target projections of the other view, row-aligned with p
      (wrapped in tf.stop_gradient here).

  Returns:
    (loss, metrics): loss is a float32 scalar in [0, 4], not divided by the
    replica count. metrics holds "cosine", the mean cos(p_i, z_i) over this
    replica's rows, a float32 scalar without gradient.
  """
  p, z = tf.convert_to_tensor(p), tf.convert_to_tensor(z)
  _check_pair("byol", p, z, "p", "z")
  p, z = _normalized(p), tf.stop_gradient(_normalized(z))
  cosine = tf.reduce_sum(p * z, axis=1)
  loss = tf.reduce_mean(2.0 - 2.0 * cosine)
  return loss, {"cosine": tf.stop_gradient(tf.reduce_mean(cosine))}


def moco(q, k, queue, temperature):
  """MoCo v2's InfoNCE loss against a queue of negatives (docs/recipes.md,
  "MoCo v2").

  For each local row i the logits are [q_i . k_i, q_i . queue_1, ...,
  q_i . queue_K] / temperature with q and k l2-normalised; the positive is
  column 0. The keys and the queue get no gradient. The queue is used as
  given: it holds keys that were normalised before they were enqueued. No
  gathering is needed: every replica scores its own queries against its own
  keys and the whole (shared) queue.

  Scale: the mean cross-entropy over this replica's B rows (the reference's
  nn.CrossEntropyLoss), not divided by the replica count. A symmetrised
  variant would add moco(q1, k2, ...) + moco(q2, k1, ...).

  Args:
    q: [B, D] query projections on this replica (any float dtype; cast to
      float32 and l2-normalised here).
    k: [B, D] key (momentum encoder) projections, row-aligned with q
      (l2-normalised and wrapped in tf.stop_gradient here).
    queue: [K, D] negatives, already l2-normalised (cast to float32 and
      wrapped in tf.stop_gradient here, not normalised again).
    temperature: softmax temperature tau > 0 (0.2 in MoCo v2).

  Returns:
    (loss, metrics): loss is a float32 scalar. metrics holds float32 scalars
    without gradient: "contrast_acc", the fraction of rows whose positive is
    the largest of the K + 1 logits, and "contrast_entropy", the mean entropy
    of the softmax over them.
  """
  _check_temperature(temperature)
  q, k, queue = (tf.convert_to_tensor(x) for x in (q, k, queue))
  _check_pair("moco", q, k, "q", "k")
  if queue.shape.rank != 2 or queue.shape[1] != q.shape[1]:
    raise ValueError(f"moco needs a queue [K, D] with the D of q "
                     f"({q.shape[1]}); got {queue.shape}.")
  q, k = _normalized(q), tf.stop_gradient(_normalized(k))
  queue = tf.stop_gradient(tf.cast(queue, tf.float32))
  # Dividing the [B, D] queries rather than the [B, K + 1] logits by tau:
  # K is the large dimension (65536 in MoCo v2).
  q = q / temperature
  logits = tf.concat([tf.reduce_sum(q * k, axis=1, keepdims=True),
                      tf.matmul(q, queue, transpose_b=True)], axis=1)
  positive = tf.zeros([tf.shape(q)[0]], tf.int32)
  loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
      labels=positive, logits=logits))
  return loss, _contrast_metrics(logits, positive)


def moco_v3(q, k, temperature):
  """MoCo v3's contrastive loss against the keys of the global batch
  (docs/recipes.md, "MoCo v3").

  The keys of every replica are gathered (without gradient: the gather sees
  tf.stop_gradient(k)). For the local row i with global index
  g = i + replica_id * B, the logits are q_i . k_n / temperature over all N
  gathered keys, q and k l2-normalised, and the positive is k_g.

  Scale: the mean cross-entropy over this replica's B rows times
  2 * temperature, as the MoCo v3 reference multiplies it; not divided by
  the replica count. The method sums the two directions,
  moco_v3(q1, k2, tau) + moco_v3(q2, k1, tau), as the reference does.

  Args:
    q: [B, D] query projections (predictor outputs) on this replica (any
      float dtype; cast to float32 and l2-normalised here).
    k: [B, D] this replica's key (momentum encoder) projections, row-aligned
      with q (l2-normalised and wrapped in tf.stop_gradient here).
    temperature: softmax temperature tau > 0 (1.0 for ResNet-50, 0.2 for
      ViT in MoCo v3).

  Returns:
    (loss, metrics): loss is a float32 scalar. metrics holds float32 scalars
    without gradient: "contrast_acc", the fraction of local rows whose
    positive is the largest of the N logits, and "contrast_entropy", the mean
    entropy of the softmax over them.
  """
  _check_temperature(temperature)
  q, k = tf.convert_to_tensor(q), tf.convert_to_tensor(k)
  _check_pair("moco_v3", q, k, "q", "k")
  q, k = _normalized(q), _normalized(k)
  k_all = distribute.cross_replica_concat(tf.stop_gradient(k))
  b = tf.shape(q)[0]
  logits = tf.matmul(q / temperature, k_all, transpose_b=True)
  positive = tf.range(b) + distribute.replica_id() * b
  loss = (2.0 * temperature) * tf.reduce_mean(
      tf.nn.sparse_softmax_cross_entropy_with_logits(labels=positive,
                                                     logits=logits))
  return loss, _contrast_metrics(logits, positive)
