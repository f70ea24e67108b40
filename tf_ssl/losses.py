"""Self-supervised losses, exact over the global batch of every replica.

Each loss takes the LOCAL (per-replica) rows. Where the method contrasts
across the batch (nt_xent, supcon, moco_v3's keys) it gathers over all
replicas with a differentiable all-gather and reduces over the local rows.
Where it needs a statistic of the global batch (sinkhorn's sums, the DINO
centre, the standardisation and cross-correlation of barlow_twins, the
variance and covariance of vicreg) it sums over replicas with an all-reduce,
whose gradient in TensorFlow is the all-reduce of the upstream gradients, so
such a term has the same value and the same input gradients on any number of
replicas. None divides by the replica count: the train step does that in
exactly one place (docs/recipes.md, "NT-Xent"; the SimCLR reference's
tf2/run.py does the same). Outside a replica context, or with one replica,
they are ordinary single-device losses.

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
  swav: the mean cross-entropy of ONE (codes crop, predicted crop) pair; the
    method averages the pairs as SwAV's main_swav.py does (docs/recipes.md,
    "SwAV").
  dino: the mean cross-entropy of ONE (teacher crop, student crop) pair; the
    method averages the pairs as DINO's DINOLoss does ("DINO").
  barlow_twins: the whole global loss, sum (1 - C_ii)^2 + lambd * sum C_ij^2,
    the same value on every replica (the Barlow Twins main.py; "Barlow
    Twins"). No scale factor (its early --scale-loss is gone).
  vicreg: 25 * invariance + 25 * variance + 1 * covariance with the variance
    term HALVED as in VICReg's main_vicreg.py, not the paper ("VICReg").
  pirl: the mean over this replica's rows of one NCE term against the
    memory bank (VISSL's NCECriterion); the method mixes the image and
    jigsaw terms with 1 - lambda and lambda ("PIRL").
  distillation: the mean over this replica's rows of the cross-entropy of
    the student's tempered softmax against the teacher's, with no
    temperature-squared factor (SimCLRv2's formula; "Distillation").
So `supcon` with distinct labels and two views is HALF of `nt_xent`.
"""

import math
import numbers

import tensorflow as tf

from tf_ssl import distribute

# NCE's epsilon beside the noise prior (float32's machine epsilon, as the
# reference's NCECriterion).
_NCE_EPSILON = 1.1920928955078125e-07
# Subtracted from a logit to drop it from a softmax. Finite (unlike -inf), so
# masked rows and their gradients never produce NaN (0 * -inf).
_MASK = 1e9


def _normalized(x):
  # Mixed precision hands us bfloat16; the softmax over thousands of logits
  # needs float32. l2_normalize clamps the squared norm at 1e-12, so a zero
  # vector maps to zero instead of NaN.
  return tf.math.l2_normalize(tf.cast(x, tf.float32), axis=-1)


def _known(value):
  """`value` if it is known before running (a number or a constant tensor),
  else None: a scheduled hyper-parameter (DINO's teacher temperature) may be
  a tensor computed in the graph, which is not checked."""
  return tf.get_static_value(value)


def _check_temperature(temperature, name="temperature"):
  t = _known(temperature)
  if t is not None and not t > 0:
    raise ValueError(f"{name} must be > 0, got {temperature}.")


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


def _check_pair(name, a, b, a_name, b_name, shape="[B, D]"):
  if a.shape.rank != 2 or a.shape != b.shape:
    raise ValueError(f"{name} needs {a_name}, {b_name} of the same shape "
                     f"{shape}; got {a.shape} and {b.shape}.")


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


# ------------------------------------------- global statistics (all-reduce)
def _all_reduce_sum(x):
  """The sum of x over all replicas; x itself outside a replica context or
  with one replica. Differentiable: the gradient of an all-reduce sum is the
  all-reduce sum of the upstream gradients, so when every replica computes a
  loss from the same global statistic, the train step's one division by the
  replica count leaves each replica's rows with the gradient of the global
  loss. A sum without that gradient (the official Barlow Twins code's
  torch.distributed.all_reduce) gives 1/R of it (lightly-ai/lightly#1977)."""
  ctx = tf.distribute.get_replica_context()
  if ctx is None or ctx.num_replicas_in_sync == 1:
    return x
  return ctx.all_reduce(tf.distribute.ReduceOp.SUM, x)


def _all_reduce_max(x):
  """The maximum of the scalar x over all replicas, without gradient.
  tf.distribute.ReduceOp has no MAX: the R scalars are gathered instead."""
  x = tf.stop_gradient(x)
  ctx = tf.distribute.get_replica_context()
  if ctx is None or ctx.num_replicas_in_sync == 1:
    return x
  return tf.reduce_max(ctx.all_gather(tf.reshape(x, [1]), axis=0))


def _globally_centered(z1, z2):
  """(z1 - mean1, z2 - mean2, n): float32 [b, D] rows minus the column means
  over the GLOBAL batch, and the global row count n as a float32 scalar. One
  all-reduce carries both branches' sums and the row count."""
  b = tf.cast(tf.shape(z1)[0], tf.float32)
  sums = _all_reduce_sum(tf.concat(
      [tf.reduce_sum(z1, axis=0), tf.reduce_sum(z2, axis=0), [b]], axis=0))
  n = sums[-1]
  mean1, mean2 = tf.split(sums[:-1] / n, 2)
  return z1 - mean1, z2 - mean2, n


def _entropy(p):
  """Mean over rows of -sum p log p (0 log 0 = 0), without gradient."""
  p = tf.stop_gradient(p)
  return -tf.reduce_mean(tf.reduce_sum(tf.math.xlogy(p, p), axis=1))


def _off_diagonal(m):
  """The square matrices of m with their diagonals set to zero."""
  return tf.linalg.set_diag(m, tf.zeros_like(tf.linalg.diag_part(m)))


# ----------------------------------------------------------------- SwAV
def sinkhorn(scores, epsilon=0.05, iterations=3, shared_scores=None):
  """SwAV's equipartitioned soft codes of this replica's rows, over the
  global batch (docs/recipes.md, "SwAV"; main_swav.py's
  distributed_sinkhorn).

  With Q = exp(S / epsilon) over the N = B_total rows of the global batch
  (all replicas' rows, plus the shared rows) and K prototypes, `iterations`
  Sinkhorn-Knopp steps alternate: each prototype's total over the N rows is
  scaled to 1/K (a GLOBAL sum, all-reduced), then each row to 1/N (a local
  sum). The result is multiplied by N, so every returned row sums to 1
  exactly (up to rounding) and each prototype's total approaches N/K as the
  iterations go on (3 do not reach it). The reference first divides Q by its
  global total; that factor cancels exactly in the first prototype step, so
  it is left out (the same codes, one pass over Q fewer).

  Everything runs in float32 without gradient. The GLOBAL maximum score is
  subtracted before the exponential: it cancels in the first prototype
  normalisation and keeps exp(1 / 0.05) = 4.9e8 (for cosine scores) from
  overflowing. Collectives: one gather of R scalars (the maximum) and one
  all-reduce of K (+1) values per iteration, so every replica must call it
  alike (also when its result is then unused). On any number of replicas the
  codes equal those of one device on the global batch.

  Args:
    scores: [b, K] scores of this replica's rows against the prototypes,
      cosines in SwAV (any float dtype; cast to float32, no gradient).
    epsilon: > 0, the entropic regularisation (0.05; 0.03 against collapse).
    iterations: >= 1 Sinkhorn-Knopp steps (3).
    shared_scores: optional [n_q, K] scores of rows that every replica holds
      identically (SwAV's queue, kept replicated like MoCo's): they take part
      in every sum exactly once, however many replicas there are, and are not
      returned.

  Returns:
    [b, K] float32 codes of this replica's rows, each row summing to 1,
    without gradient.
  """
  _check_temperature(epsilon, "sinkhorn epsilon")
  if (isinstance(iterations, bool) or not isinstance(iterations, numbers.Integral)
      or iterations < 1):
    raise ValueError(f"sinkhorn iterations must be an integer >= 1, got "
                     f"{iterations!r}.")
  scores = tf.convert_to_tensor(scores)
  if scores.shape.rank != 2:
    raise ValueError(f"sinkhorn needs scores [B, K]; got {scores.shape}.")
  s = tf.stop_gradient(tf.cast(scores, tf.float32))
  if shared_scores is None:
    shared = s[:0]  # no shared rows: [0, K]
  else:
    shared = tf.convert_to_tensor(shared_scores)
    if shared.shape.rank != 2 or shared.shape[1] != scores.shape[1]:
      raise ValueError(f"sinkhorn needs shared_scores [n_q, K] with the K of "
                       f"scores ({scores.shape[1]}); got {shared.shape}.")
    shared = tf.stop_gradient(tf.cast(shared, tf.float32))
  # Rows are samples and columns prototypes here: the reference's [K, N]
  # transposed, so prototype sums run over axis 0 and sample sums over axis 1.
  top = _all_reduce_max(tf.maximum(tf.reduce_max(s), tf.reduce_max(shared)))
  q = tf.exp((s - top) / epsilon)
  q_shared = tf.exp((shared - top) / epsilon)
  k = tf.cast(tf.shape(s)[1], tf.float32)
  b = tf.cast(tf.shape(s)[0], tf.float32)
  # The first all-reduce also counts the global rows. The shared rows are
  # added AFTER it: all-reducing them would count them once per replica.
  first = _all_reduce_sum(tf.concat([tf.reduce_sum(q, axis=0), [b]], axis=0))
  n = first[-1] + tf.cast(tf.shape(shared)[0], tf.float32)
  prototype_sums = first[:-1] + tf.reduce_sum(q_shared, axis=0)
  for step in range(iterations):
    if step:
      prototype_sums = (_all_reduce_sum(tf.reduce_sum(q, axis=0))
                        + tf.reduce_sum(q_shared, axis=0))
    q = q / (prototype_sums * k)  # each prototype: total 1/K
    q_shared = q_shared / (prototype_sums * k)
    q = q / (tf.reduce_sum(q, axis=1, keepdims=True) * n)  # each row: 1/N
    q_shared = q_shared / (tf.reduce_sum(q_shared, axis=1, keepdims=True) * n)
  return tf.stop_gradient(q * n)


def swav(scores, codes, temperature=0.1):
  """SwAV's swapped prediction loss for one pair of crops (docs/recipes.md,
  "SwAV").

  For each local row i: -sum_k codes_ik * log softmax(scores_i / tau)_k,
  where `codes` are the Sinkhorn codes of ANOTHER crop of the same image
  (`sinkhorn`) and get no gradient.

  Scale: the mean over this replica's rows of one pair. The method averages
  over pairs as the reference does: with V crops and codes from the two
  global crops a, L = 1/2 sum_a 1/(V - 1) sum_{v != a} swav(s_v, q_a). No
  gathering: the codes already carry the global batch's equipartition, and
  the mean over replicas of the per-replica means is the global mean.

  Args:
    scores: [B, K] scores of the predicted crop against the prototypes
      (cosines; any float dtype, cast to float32).
    codes: [B, K] target codes of another crop, row-aligned with scores
      (cast to float32, wrapped in tf.stop_gradient).
    temperature: softmax temperature tau > 0 (0.1).

  Returns:
    (loss, metrics): loss is a float32 scalar. metrics holds float32 scalars
    without gradient: "entropy", the mean entropy of the codes (ln K when
    uniform), and "prediction_entropy", that of softmax(scores / tau).
  """
  _check_temperature(temperature)
  scores, codes = tf.convert_to_tensor(scores), tf.convert_to_tensor(codes)
  _check_pair("swav", scores, codes, "scores", "codes", "[B, K]")
  codes = tf.stop_gradient(tf.cast(codes, tf.float32))
  log_p = tf.nn.log_softmax(tf.cast(scores, tf.float32) / temperature, axis=1)
  loss = -tf.reduce_mean(tf.reduce_sum(codes * log_p, axis=1))
  return loss, {"entropy": _entropy(codes),
                "prediction_entropy": _entropy(tf.exp(log_p))}


# ----------------------------------------------------------------- DINO
def _check_center(name, center, k):
  if tuple(center.shape) not in ((k,), (1, k)):
    raise ValueError(f"{name} needs a center [K] or [1, K] with the K of the "
                     f"logits ({k}); got {center.shape}.")


def dino(student_logits, teacher_logits, center, student_temperature=0.1,
         teacher_temperature=0.04):
  """DINO's self-distillation loss for one pair of crops (docs/recipes.md,
  "DINO").

  For each local row i: -sum_k P_t[i, k] * log P_s[i, k], with
  P_t = softmax((teacher_i - center) / teacher_temperature), without
  gradient (neither the teacher nor the centre is trained by it), and
  P_s = softmax(student_i / student_temperature). Centring and the sharper
  teacher temperature together are what keep the teacher from collapsing.

  Scale: the mean over this replica's rows of one (teacher crop, student
  crop) pair. The method averages the pairs with different crops as the
  reference's DINOLoss: 2 global and L local crops give 2 (2 + L) - 2 pairs.
  Nothing is gathered; the centre is updated after the loss with
  `dino_center`, which averages over the global batch.

  Args:
    student_logits: [B, K] student head outputs for one crop (any float
      dtype; cast to float32).
    teacher_logits: [B, K] teacher head outputs for another crop of the same
      images, row-aligned (cast to float32, no gradient).
    center: [K] or [1, K], the running centre of the teacher logits (no
      gradient).
    student_temperature: > 0 (0.1).
    teacher_temperature: > 0 (0.04; warmed up 0.04 -> 0.07 per epoch in the
      paper's recipe). Either may be a float32 tensor (a schedule).

  Returns:
    (loss, metrics): loss is a float32 scalar. metrics holds float32 scalars
    without gradient: "entropy", the mean entropy of the teacher's P_t (ln K
    means the uniform collapse), and "prediction_entropy", that of P_s.
  """
  _check_temperature(student_temperature, "dino student_temperature")
  _check_temperature(teacher_temperature, "dino teacher_temperature")
  student, teacher = (tf.convert_to_tensor(student_logits),
                      tf.convert_to_tensor(teacher_logits))
  _check_pair("dino", student, teacher, "student_logits", "teacher_logits",
              "[B, K]")
  center = tf.convert_to_tensor(center)
  _check_center("dino", center, student.shape[1])
  center = tf.stop_gradient(tf.reshape(tf.cast(center, tf.float32), [1, -1]))
  target = tf.stop_gradient(tf.nn.softmax(
      (tf.cast(teacher, tf.float32) - center) / teacher_temperature, axis=1))
  log_p = tf.nn.log_softmax(tf.cast(student, tf.float32) / student_temperature,
                            axis=1)
  loss = -tf.reduce_mean(tf.reduce_sum(target * log_p, axis=1))
  return loss, {"entropy": _entropy(target),
                "prediction_entropy": _entropy(tf.exp(log_p))}


def dino_center(teacher_logits, center, momentum=0.9):
  """DINO's new centre: momentum * center + (1 - momentum) * the mean of the
  teacher logits over the GLOBAL batch (docs/recipes.md, "DINO").

  The rows' sum and count are all-reduced together, so every replica
  returns the same centre, equal to one device's on the global batch. Call
  it after the loss (which uses the old centre) with the teacher logits of
  every global crop, e.g. both crops' rows concatenated.

  Args:
    teacher_logits: [B, K] this replica's teacher outputs (any float dtype;
      cast to float32, no gradient).
    center: [K] or [1, K], the current centre.
    momentum: in [0, 1] (0.9).

  Returns:
    The new centre, float32, shaped like `center`, without gradient.
  """
  m = _known(momentum)
  if m is not None and not 0 <= m <= 1:
    raise ValueError(f"dino_center momentum must be in [0, 1], got {momentum}.")
  teacher = tf.convert_to_tensor(teacher_logits)
  if teacher.shape.rank != 2:
    raise ValueError(f"dino_center needs teacher_logits [B, K]; got "
                     f"{teacher.shape}.")
  center = tf.convert_to_tensor(center)
  _check_center("dino_center", center, teacher.shape[1])
  teacher = tf.stop_gradient(tf.cast(teacher, tf.float32))
  center = tf.stop_gradient(tf.cast(center, tf.float32))
  rows = tf.cast(tf.shape(teacher)[0], tf.float32)
  sums = _all_reduce_sum(tf.concat([tf.reduce_sum(teacher, axis=0), [rows]], 0))
  mean = tf.reshape(sums[:-1] / sums[-1], tf.shape(center))
  return tf.stop_gradient(momentum * center + (1.0 - momentum) * mean)


# --------------------------------------------------------- Barlow Twins
# Barlow Twins standardises with an affine-free BatchNorm (PyTorch's eps).
_BARLOW_EPSILON = 1e-5


def barlow_twins(z1, z2, lambd=0.0051):
  """The Barlow Twins loss over the global batch (docs/recipes.md, "Barlow
  Twins").

  Each dimension of each branch is standardised over the GLOBAL batch of N
  rows, with its mean and BIASED variance (an affine-free BatchNorm in
  training mode, eps 1e-5): z_hat = (z - mean) / sqrt(var + eps). The
  cross-correlation C = z1_hat^T z2_hat / N is [D, D], and
  L = sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2.

  Replicas: the means and variances come from all-reduced sums; C is the
  all-reduce of each replica's z1_hat_r^T z2_hat_r, divided by N. Every
  replica returns the same global value. Because the all-reduces pass
  gradients, after the train step's division by R the summed gradients are
  the single-device gradients; the reference's torch.distributed.all_reduce
  passes none, which gives 1/R of them (lightly-ai/lightly#1977).

  Why all-reduce C rather than gather the rows: each replica multiplies only
  its own b rows (b D^2 multiply-adds, not the R times larger B D^2), as the
  reference does. The price is traffic: C and its gradient are D^2 floats
  each, while gathering both branches moves about 2 B D forward and twice
  that backward, less whenever B < D (ImageNet: D = 8192, B = 2048). The
  values and gradients are the same either way.

  Args:
    z1: [b, D] projections of the first view on this replica (any float
      dtype; cast to float32). The global batch needs at least 2 rows.
    z2: [b, D] projections of the second view, row-aligned with z1.
    lambd: >= 0, the weight of the off-diagonal (redundancy) term; 0.0051
      in the code (paper: 5e-3).

  Returns:
    (loss, metrics): loss is a float32 scalar, the global loss, identical on
    every replica (not divided by the replica count). metrics holds float32
    scalars without gradient, also global: "on_diag", the mean C_ii, and
    "off_diag", the root mean square of the C_ij with i != j.
  """
  lambd_value = _known(lambd)
  if lambd_value is not None and not lambd_value >= 0:
    raise ValueError(f"barlow_twins lambd must be >= 0, got {lambd}.")
  z1, z2 = tf.convert_to_tensor(z1), tf.convert_to_tensor(z2)
  _check_pair("barlow_twins", z1, z2, "z1", "z2")
  c1, c2, n = _globally_centered(tf.cast(z1, tf.float32),
                                 tf.cast(z2, tf.float32))
  var = _all_reduce_sum(tf.stack([tf.reduce_sum(tf.square(c1), axis=0),
                                  tf.reduce_sum(tf.square(c2), axis=0)])) / n
  z1_hat = c1 * tf.math.rsqrt(var[0] + _BARLOW_EPSILON)
  z2_hat = c2 * tf.math.rsqrt(var[1] + _BARLOW_EPSILON)
  c = _all_reduce_sum(tf.matmul(z1_hat, z2_hat, transpose_a=True)) / n
  on = tf.linalg.diag_part(c)
  off_sq = tf.reduce_sum(tf.square(_off_diagonal(c)))
  loss = tf.reduce_sum(tf.square(1.0 - on)) + lambd * off_sq
  d = tf.cast(tf.shape(c)[0], tf.float32)
  metrics = {"on_diag": tf.reduce_mean(on),
             "off_diag": tf.sqrt(tf.math.divide_no_nan(off_sq, d * (d - 1.0)))}
  return loss, {key: tf.stop_gradient(m) for key, m in metrics.items()}


# --------------------------------------------------------------- VICReg
# Added to the variance under VICReg's square root.
_VICREG_EPSILON = 1e-4


def vicreg(z1, z2, sim_weight=25.0, var_weight=25.0, cov_weight=1.0):
  """The VICReg loss in its reference code's form (docs/recipes.md,
  "VICReg").

  - invariance: the mean squared error over this replica's b x D entries;
  - variance: (v(z1) + v(z2)) / 2 with v(z) = mean_d relu(1 - std_d(z)),
    std_d = sqrt(unbiased variance over the GLOBAL batch + 1e-4). The
    reference code halves the sum; the paper's equation does not;
  - covariance: c(z1) + c(z2) with c(z) = sum_{i != j} Cov(z)_ij^2 / D and
    Cov(z) = (z - mean)^T (z - mean) / (N - 1) over the GLOBAL batch of N
    rows ([D, D]);
  loss = sim_weight * invariance + var_weight * variance
         + cov_weight * covariance.

  Replicas: the invariance term is local; with equal per-replica batches the
  mean over replicas of the local means is the global mean. The variance and
  covariance terms are global values, identical on every replica: the means
  and each replica's [D, D] centred products are all-reduced (the reference
  gathers the rows instead; see `barlow_twins` for the trade-off, the same
  here), and the all-reduce passes gradients, so the train step's division
  by R gives the single-device gradients.

  Args:
    z1: [b, D] expander outputs of the first view on this replica (any
      float dtype; cast to float32). The global batch needs at least 2 rows.
    z2: [b, D] of the second view, row-aligned with z1.
    sim_weight, var_weight, cov_weight: the weights (25, 25, 1).

  Returns:
    (loss, metrics): loss is a float32 scalar (not divided by the replica
    count). metrics holds the three unweighted terms as float32 scalars
    without gradient: "invariance" (this replica's), "variance" and
    "covariance" (global).
  """
  z1, z2 = tf.convert_to_tensor(z1), tf.convert_to_tensor(z2)
  _check_pair("vicreg", z1, z2, "z1", "z2")
  z1, z2 = tf.cast(z1, tf.float32), tf.cast(z2, tf.float32)
  invariance = tf.reduce_mean(tf.square(z1 - z2))
  c1, c2, n = _globally_centered(z1, z2)
  centered = tf.stack([c1, c2])  # [2, b, D]
  cov = _all_reduce_sum(tf.matmul(centered, centered, transpose_a=True)) / (
      n - 1.0)  # [2, D, D]
  std = tf.sqrt(tf.linalg.diag_part(cov) + _VICREG_EPSILON)  # [2, D]
  # The mean over both branches and D dimensions: (v(z1) + v(z2)) / 2.
  variance = tf.reduce_mean(tf.nn.relu(1.0 - std))
  d = tf.cast(tf.shape(z1)[1], tf.float32)
  covariance = tf.reduce_sum(tf.square(_off_diagonal(cov))) / d
  loss = (sim_weight * invariance + var_weight * variance
          + cov_weight * covariance)
  metrics = {"invariance": invariance, "variance": variance,
             "covariance": covariance}
  return loss, {key: tf.stop_gradient(m) for key, m in metrics.items()}


# ----------------------------------------------------------------- PIRL
def pirl(embedding, positive, negatives, num_examples, normaliser,
         temperature=0.07):
  """PIRL's NCE loss of embeddings against a memory bank (docs/recipes.md,
  "PIRL"; VISSL's nce_loss_with_memory with loss_type "nce", after NPID).

  For the local row i with embedding e_i (l2-normalised here), its bank row
  m_i (the positive) and N bank rows n_i1 .. n_iN (the negatives):

    x_ij = exp(e_i . n_ij / tau) / Z,  x_i0 = exp(e_i . m_i / tau) / Z,
    k = N / |D|,  c = k + eps  (eps: float32's machine epsilon, 1.19e-7),
    loss_i = -log(x_i0 / (x_i0 + c)) - sum_j log(k / (x_ij + c)),

  and the loss is the mean of loss_i over this replica's rows: an NCE
  classifier of "data" (the positive) against noise drawn uniformly from
  the |D| examples. Computed in the log domain, with
  log x = e . m / tau - log Z.

  Z is the reference's normaliser: a given value > 0, or, when `normaliser`
  is <= 0 (not yet estimated), |D| times the mean of exp(score / tau) over
  every score of the GLOBAL batch (the N + 1 scores of each row of every
  replica; all-reduced sums), which the caller stores and passes from then
  on (VISSL estimates it on the first batch and freezes it). Z, the bank
  rows and the negatives get no gradient.

  Scale: the mean over this replica's b rows (the reference's sum over the
  batch divided by its size); not divided by the replica count. PIRL mixes
  two such terms (image and jigsaw branch), lambda and 1 - lambda.

  Args:
    embedding: [b, D] this replica's embeddings (any float dtype; cast to
      float32 and l2-normalised here).
    positive: [b, D] each row's own bank row (already normalised; cast to
      float32, no gradient).
    negatives: [b, N, D] bank rows drawn for each row (as positive).
    num_examples: |D|, the bank's rows (a Python int >= 1).
    normaliser: Z, a float scalar (tensor); <= 0 means estimate it here.
    temperature: tau > 0 (0.07).

  Returns:
    (loss, metrics): loss is a float32 scalar. metrics holds float32 scalars
    without gradient: "normaliser", the Z used (the same on every replica),
    and "positive_prob", the mean over this replica's rows of the model's
    probability that the positive is data, x_i0 / (x_i0 + c).
  """
  _check_temperature(temperature)
  if int(num_examples) < 1:
    raise ValueError(f"pirl num_examples must be >= 1, got {num_examples}.")
  e, pos, neg = (tf.convert_to_tensor(x) for x in (embedding, positive, negatives))
  _check_pair("pirl", e, pos, "embedding", "positive")
  if neg.shape.rank != 3 or neg.shape[1] is None or neg.shape[2] != e.shape[1]:
    raise ValueError(f"pirl needs negatives [b, N, D] with a known N and the "
                     f"D of the embedding ({e.shape[1]}); got {neg.shape}.")
  e = _normalized(e)
  pos = tf.stop_gradient(tf.cast(pos, tf.float32))
  neg = tf.stop_gradient(tf.cast(neg, tf.float32))
  # [b, N + 1] scores over tau, the positive in column 0.
  logits = tf.concat([tf.reduce_sum(e * pos, axis=1, keepdims=True),
                      tf.einsum("bd,bnd->bn", e, neg)], axis=1) / temperature
  size, num_negatives = float(num_examples), neg.shape[1]
  k = num_negatives / size
  # The estimate: the global mean of exp(logit) times |D|. Scores are
  # cosines, so exp(logit - 1 / tau) <= 1 cannot overflow.
  top = 1.0 / temperature
  sums = _all_reduce_sum(tf.stack([
      tf.reduce_sum(tf.exp(tf.stop_gradient(logits) - top)),
      tf.cast(tf.size(logits), tf.float32)]))
  estimate = tf.math.log(sums[0] / sums[1] * size) + top
  given = tf.cast(normaliser, tf.float32)
  log_z = tf.where(given > 0, tf.math.log(tf.maximum(given, 1e-30)), estimate)
  log_z = tf.stop_gradient(log_z)
  log_x = logits - log_z
  log_c = math.log(k + _NCE_EPSILON)
  # -log(x0 / (x0 + c)) = softplus(log c - log x0);
  # -log(k / (x + c)) = softplus(log x - log c) + log c - log k.
  positive_term = tf.nn.softplus(log_c - log_x[:, 0])
  noise_term = (tf.reduce_sum(tf.nn.softplus(log_x[:, 1:] - log_c), axis=1)
                + num_negatives * (log_c - math.log(k)))
  loss = tf.reduce_mean(positive_term + noise_term)
  metrics = {"normaliser": tf.exp(log_z),
             "positive_prob": tf.reduce_mean(tf.exp(-positive_term))}
  return loss, {key: tf.stop_gradient(m) for key, m in metrics.items()}


def distillation(student_logits, teacher_logits, temperature=1.0):
  """SimCLRv2's distillation loss (docs/recipes.md, "Distillation").

  For each local row, -sum_y softmax(t / T)_y * log_softmax(s / T)_y: the
  cross-entropy of the student's tempered prediction against the frozen
  teacher's. The teacher's logits get no gradient. Per-example, so no
  gathering: with equal per-replica batches the train step's mean over
  replicas of the per-replica means is the global mean.

  Args:
    student_logits: [B, C] logits of the student on this replica's rows (any
      float dtype; float32 inside).
    teacher_logits: [B, C] logits of the teacher on the same views.
    temperature: T > 0 (1.0, the paper's).

  Returns:
    (loss, metrics): loss is a float32 scalar, not divided by the replica
    count. metrics holds "agreement", the fraction of this replica's rows
    where the student's and the teacher's argmax agree, and
    "teacher_entropy", the mean entropy of the teacher's tempered softmax
    (a sharp teacher is near 0, a uniform one ln C); both without gradient.
  """
  _check_temperature(temperature)
  s, t = tf.convert_to_tensor(student_logits), tf.convert_to_tensor(teacher_logits)
  _check_pair("distillation", s, t, "student_logits", "teacher_logits", "[B, C]")
  s = tf.cast(s, tf.float32)
  t = tf.stop_gradient(tf.cast(t, tf.float32))
  target = tf.nn.softmax(t / temperature)
  loss = tf.reduce_mean(
      -tf.reduce_sum(target * tf.nn.log_softmax(s / temperature), axis=1))
  agreement = tf.reduce_mean(tf.cast(
      tf.equal(tf.argmax(s, axis=1), tf.argmax(t, axis=1)), tf.float32))
  return loss, {"agreement": tf.stop_gradient(agreement),
                "teacher_entropy": tf.stop_gradient(_entropy(target))}
