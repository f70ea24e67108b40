"""NT-Xent and SupCon against float64 NumPy references written from the
formulas (docs/recipes.md) at the reference code's scales, with central
finite-difference gradients, and against themselves on 1, 2 and 4 replicas."""

import functools
import itertools

import numpy as np
import pytest
import tensorflow as tf

from replicas import run_sharded
from tf_ssl import distribute
from tf_ssl.losses import nt_xent, supcon

TAU = 0.1
BASE_TAU = 0.07
TOL = dict(rtol=1e-5, atol=1e-5)
OPTIONS = list(itertools.product(("all", "one"), ("outside", "inside"),
                                 ("all", "negatives")))


# ---------------------------------------------------------------- references
def _normalize(x):
  # As tf.math.l2_normalize: the squared norm is clamped at 1e-12.
  return x / np.sqrt(np.maximum(np.sum(x * x, axis=-1, keepdims=True), 1e-12))


def _logsumexp(x):
  m = np.max(x)
  return m + np.log(np.sum(np.exp(x - m)))


def np_nt_xent(z1, z2, tau):
  """SimCLR's loss_a + loss_b (objective.py, tf2/objective.py): for each
  direction, the batch mean of -log softmax of the positive among the other
  view of every example and the same view of every other example; the two
  means are added, not averaged."""
  z1, z2 = _normalize(z1), _normalize(z2)
  n = len(z1)
  total = 0.0
  for a, b in ((z1, z2), (z2, z1)):
    losses = []
    for i in range(n):
      others = np.concatenate([b @ a[i], np.delete(a @ a[i], i)]) / tau
      losses.append(-(b[i] @ a[i] / tau - _logsumexp(others)))
    total += np.mean(losses)
  return total


def np_supcon(features, labels, tau, base_tau, mode, summation, denominator):
  """SupCon from the paper's Eq. 2 (outside) / Eq. 3 (inside), one anchor at
  a time; `labels` and `features` are the global batch. A view's positives
  are the other views of its example and, if its label is >= 0, the views
  of every example with that label (a negative label is "unlabelled")."""
  n, v, _ = features.shape
  z = _normalize(features).reshape(n * v, -1)
  lab = np.repeat(labels, v)
  example = np.repeat(np.arange(n), v)
  anchors = range(n * v) if mode == "all" else range(0, n * v, v)
  losses = []
  for i in anchors:
    s = z @ z[i] / tau
    others = np.arange(n * v) != i
    same = (example == example[i]) | ((lab == lab[i]) & (lab[i] >= 0))
    pos = np.flatnonzero(others & same)
    neg = ~same
    if len(pos) == 0:
      losses.append(0.0)
      continue
    log_probs = []
    for p in pos:
      denom = s[others] if denominator == "all" else np.append(s[neg], s[p])
      log_probs.append(s[p] - _logsumexp(denom))
    if summation == "outside":
      losses.append(-np.mean(log_probs))
    else:
      losses.append(-np.log(np.mean(np.exp(log_probs))))
  return tau / base_tau * np.mean(losses)


def fd_grads(f, *xs, h=1e-6):
  """Central finite differences of the scalar f(*xs) for every input."""
  xs = [np.array(x, np.float64) for x in xs]
  grads = []
  for x in xs:
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
      old = x[idx]
      x[idx] = old + h
      up = f(*xs)
      x[idx] = old - h
      down = f(*xs)
      x[idx] = old
      g[idx] = (up - down) / (2 * h)
    grads.append(g)
  return grads


# --------------------------------------------------------------------- data
def _normal(shape, seed):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# Global batch 8 so that 4 replicas still get 2 examples each.
Z1, Z2 = _normal((8, 5), 0), _normal((8, 5), 1)
# Duplicated labels, each class split over several replicas, two views.
FEATS = _normal((8, 2, 5), 2)
LABELS = np.array([0, 1, 0, 2, 1, 0, 3, 2], np.int32)
# One view and singleton classes: some anchors have no positive at all.
FEATS_1VIEW = _normal((6, 1, 5), 3)
LABELS_1VIEW = np.array([0, 0, 1, 2, 2, 3], np.int32)
# Labelled and unlabelled (-1) rows mixed, every replica holding both kinds
# on 2 replicas; three views so an unlabelled anchor has two positives.
FEATS_3VIEW = _normal((8, 3, 5), 5)
LABELS_MIXED = np.array([0, -1, 1, -1, 0, -1, -1, 1], np.int32)
CASES = {"2views": (FEATS, LABELS), "1view_singletons": (FEATS_1VIEW, LABELS_1VIEW),
         "unlabelled_2views": (FEATS, LABELS_MIXED),
         "unlabelled_3views": (FEATS_3VIEW, LABELS_MIXED)}


@functools.lru_cache(maxsize=None)
def nt_xent_expected(tau):
  f = lambda a, b: np_nt_xent(a, b, tau)
  return f(Z1, Z2), fd_grads(f, Z1, Z2)


@functools.lru_cache(maxsize=None)
def supcon_expected(case, mode, summation, denominator):
  feats, labels = CASES[case]
  f = lambda x: np_supcon(x, labels, TAU, BASE_TAU, mode, summation, denominator)
  return f(feats), fd_grads(f, feats)[0]


def _value_and_grads(fn, *xs):
  xs = [tf.constant(x) for x in xs]
  with tf.GradientTape() as tape:
    tape.watch(xs)
    loss, metrics = fn(*xs)
  return loss, tape.gradient(loss, xs), metrics


# ---------------------------------------------------------- single device
@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_nt_xent_matches_numpy(tau):
  loss, grads, _ = _value_and_grads(lambda a, b: nt_xent(a, b, tau), Z1, Z2)
  want, want_grads = nt_xent_expected(tau)
  np.testing.assert_allclose(loss.numpy(), want, **TOL)
  for got, want_g in zip(grads, want_grads):
    np.testing.assert_allclose(got.numpy(), want_g, **TOL)


def test_nt_xent_metrics_match_numpy():
  _, metrics = nt_xent(Z1, Z2, TAU)
  z1, z2 = _normalize(Z1.astype(np.float64)), _normalize(Z2.astype(np.float64))
  ab, ba = z1 @ z2.T / TAU, z2 @ z1.T / TAU
  acc = np.mean(np.concatenate([ab.argmax(1), ba.argmax(1)]) == np.tile(np.arange(8), 2))
  p = np.exp(ab - ab.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  entropy = -np.mean(np.sum(p * np.log(p), axis=1))
  assert 0 < acc < 1  # the data must make the check meaningful
  np.testing.assert_allclose(metrics["contrast_acc"].numpy(), acc, **TOL)
  np.testing.assert_allclose(metrics["contrast_entropy"].numpy(), entropy, **TOL)
  assert all(m.dtype == tf.float32 for m in metrics.values())


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("mode,summation,denominator", OPTIONS)
def test_supcon_matches_numpy(case, mode, summation, denominator):
  feats, labels = CASES[case]
  fn = lambda x: supcon(x, labels, TAU, BASE_TAU, mode, summation, denominator)
  loss, (grad,), _ = _value_and_grads(fn, feats)
  want, want_grad = supcon_expected(case, mode, summation, denominator)
  np.testing.assert_allclose(loss.numpy(), want, **TOL)
  np.testing.assert_allclose(grad.numpy(), want_grad, **TOL)


def test_supcon_options_differ():
  # Guards the reference test: every option must change the value here.
  values = {opts: supcon_expected("2views", *opts)[0] for opts in OPTIONS}
  assert len({round(v, 6) for v in values.values()}) == len(OPTIONS)


def test_supcon_metrics_match_numpy():
  _, metrics = supcon(FEATS, LABELS, TAU)
  z = _normalize(FEATS.astype(np.float64)).reshape(16, -1)
  lab = np.repeat(LABELS, 2)
  s = z @ z.T / TAU - 1e9 * np.eye(16)
  p = np.exp(s - s.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  entropy = -np.mean(np.sum(np.where(p > 0, p * np.log(np.maximum(p, 1e-300)), 0), 1))
  acc = np.mean(lab[s.argmax(1)] == lab)
  np.testing.assert_allclose(metrics["contrast_acc"].numpy(), acc, **TOL)
  np.testing.assert_allclose(metrics["contrast_entropy"].numpy(), entropy, **TOL)


def test_supcon_with_distinct_labels_is_half_nt_xent():
  # Each reference's scale: SupCon averages over the 2B anchors, SimCLR adds
  # the two directions' batch means.
  feats = np.stack([Z1, Z2], axis=1)
  want = nt_xent(Z1, Z2, TAU)[0]
  for summation, denominator in itertools.product(("outside", "inside"),
                                                  ("all", "negatives")):
    got = supcon(feats, np.arange(8), TAU, TAU, "all", summation, denominator)[0]
    np.testing.assert_allclose(2 * got.numpy(), want.numpy(), rtol=1e-6)


def test_nt_xent_is_the_sum_of_both_directions():
  # loss_a + loss_b of objective.py, each a mean over the B rows: twice the
  # mean over all 2B anchors.
  z1, z2 = _normalize(Z1.astype(np.float64)), _normalize(Z2.astype(np.float64))
  logits_ab, logits_aa = z1 @ z2.T / TAU, z1 @ z1.T / TAU - 1e9 * np.eye(8)
  logits_ba, logits_bb = z2 @ z1.T / TAU, z2 @ z2.T / TAU - 1e9 * np.eye(8)
  def ce(ab, aa):
    full = np.concatenate([ab, aa], axis=1)
    m = full.max(1, keepdims=True)
    return np.log(np.exp(full - m).sum(1)) + m[:, 0] - np.diag(ab)
  want = np.mean(ce(logits_ab, logits_aa)) + np.mean(ce(logits_ba, logits_bb))
  np.testing.assert_allclose(nt_xent(Z1, Z2, TAU)[0].numpy(), want, **TOL)


def test_supcon_unlabelled_rows_are_not_one_class():
  # All unlabelled: the positives are the example's own other views, as in
  # SimCLR, whatever the label value; with two views that is half NT-Xent.
  feats = np.stack([Z1, Z2], axis=1)
  unlabelled = supcon(feats, np.full(8, -1), TAU, TAU)[0]
  np.testing.assert_allclose(2 * unlabelled.numpy(),
                             nt_xent(Z1, Z2, TAU)[0].numpy(), rtol=1e-6)
  # A -1 row and a labelled row never attract: relabelling the unlabelled
  # rows with fresh distinct classes changes nothing.
  fresh = np.where(LABELS_MIXED < 0, 100 + np.arange(8), LABELS_MIXED)
  for feats in (FEATS, FEATS_3VIEW):
    np.testing.assert_allclose(supcon(feats, LABELS_MIXED, TAU)[0].numpy(),
                               supcon(feats, fresh, TAU)[0].numpy(), rtol=1e-6)


# ------------------------------------------------------------- replicas
def _local(global_labels):
  """This replica's contiguous slice of a global label vector."""
  n = distribute.num_replicas()
  return tf.reshape(tf.constant(global_labels), [n, -1])[distribute.replica_id()]


def test_nt_xent_across_replicas(strategy):
  loss, grads = run_sharded(strategy, lambda a, b: nt_xent(a, b, TAU)[0], Z1, Z2)
  want, want_grads = nt_xent_expected(TAU)
  np.testing.assert_allclose(loss.numpy(), want, **TOL)
  for got, want_g in zip(grads, want_grads):
    np.testing.assert_allclose(got.numpy(), want_g, **TOL)


@pytest.mark.parametrize("case", ["2views", "unlabelled_3views"])
@pytest.mark.parametrize("mode,summation,denominator",
                         [("all", "outside", "all"), ("one", "inside", "negatives")])
def test_supcon_across_replicas(strategy, case, mode, summation, denominator):
  feats, labels = CASES[case]
  fn = lambda x: supcon(x, _local(labels), TAU, BASE_TAU, mode, summation,
                        denominator)[0]
  loss, (grad,) = run_sharded(strategy, fn, feats)
  want, want_grad = supcon_expected(case, mode, summation, denominator)
  np.testing.assert_allclose(loss.numpy(), want, **TOL)
  np.testing.assert_allclose(grad.numpy(), want_grad, **TOL)


def test_supcon_is_half_nt_xent_across_replicas(strategy):
  fn = lambda a, b: 2 * supcon(tf.stack([a, b], 1), _local(np.arange(8)), TAU, TAU)[0]
  loss, grads = run_sharded(strategy, fn, Z1, Z2)
  want, want_grads = nt_xent_expected(TAU)
  np.testing.assert_allclose(loss.numpy(), want, **TOL)
  for got, want_g in zip(grads, want_grads):
    np.testing.assert_allclose(got.numpy(), want_g, **TOL)


def test_nt_xent_metrics_are_local_and_average_to_global(strategy_4):
  def step(a, b):
    return nt_xent(a, b, TAU)[1]

  @tf.function
  def run():
    local = strategy_4.experimental_distribute_values_from_function(
        lambda ctx: (tf.split(Z1, 4)[ctx.replica_id_in_sync_group],
                     tf.split(Z2, 4)[ctx.replica_id_in_sync_group]))
    return strategy_4.run(step, args=local)

  metrics = run()
  want = nt_xent(Z1, Z2, TAU)[1]
  for key in want:
    got = strategy_4.reduce("MEAN", metrics[key], axis=None)
    np.testing.assert_allclose(got.numpy(), want[key].numpy(), **TOL)


# ------------------------------------------------------- degenerate inputs
def _degenerate_batches():
  base = _normal((8, 5), 4)
  dup = base.copy()
  dup[1::2] = dup[::2]  # every row twice
  zeros = base.copy()
  zeros[[0, 3]] = 0.0
  return {"identical": np.tile(base[:1], (8, 1)), "duplicates": dup,
          "zero_vectors": zeros, "all_zero": np.zeros_like(base)}


@pytest.mark.parametrize("name", sorted(_degenerate_batches()))
def test_nt_xent_finite_on_degenerate_inputs(name):
  x = _degenerate_batches()[name]
  loss, grads, metrics = _value_and_grads(lambda a, b: nt_xent(a, b, TAU), x, x)
  for t in [loss, *grads, *metrics.values()]:
    assert np.all(np.isfinite(t.numpy())), name


@pytest.mark.parametrize("labels", [np.zeros(8, np.int32), np.arange(8)],
                         ids=["one_class", "distinct"])
@pytest.mark.parametrize("name", sorted(_degenerate_batches()))
def test_supcon_finite_on_degenerate_inputs(name, labels):
  x = _degenerate_batches()[name]
  for views in (np.stack([x, x], 1), x[:, None]):
    for opts in OPTIONS:
      loss, (grad,), metrics = _value_and_grads(
          lambda f: supcon(f, labels, TAU, BASE_TAU, *opts), views)
      for t in [loss, grad, *metrics.values()]:
        assert np.all(np.isfinite(t.numpy())), (name, views.shape, opts)


def test_supcon_without_positives_is_zero():
  # One view and all labels distinct: no anchor has a positive.
  for opts in OPTIONS:
    loss, (grad,), _ = _value_and_grads(
        lambda f: supcon(f, np.arange(8), TAU, BASE_TAU, *opts), Z1[:, None])
    assert loss.numpy() == 0.0 and np.all(grad.numpy() == 0.0), opts


def test_bfloat16_inputs_give_float32_loss():
  a, b = tf.cast(Z1, tf.bfloat16), tf.cast(Z2, tf.bfloat16)
  loss, metrics = nt_xent(a, b, TAU)
  assert loss.dtype == tf.float32
  assert all(m.dtype == tf.float32 for m in metrics.values())
  want = nt_xent(tf.cast(a, tf.float32), tf.cast(b, tf.float32), TAU)[0]
  np.testing.assert_allclose(loss.numpy(), want.numpy(), rtol=1e-6)
  feats = tf.stack([a, b], 1)
  loss = supcon(feats, LABELS, TAU)[0]
  assert loss.dtype == tf.float32
  want = supcon(tf.cast(feats, tf.float32), LABELS, TAU)[0]
  np.testing.assert_allclose(loss.numpy(), want.numpy(), rtol=1e-6)


def test_bad_arguments_say_what_to_do():
  with pytest.raises(ValueError, match="contrast_mode='both'"):
    supcon(FEATS, LABELS, TAU, contrast_mode="both")
  with pytest.raises(ValueError, match="denominator"):
    supcon(FEATS, LABELS, TAU, denominator="only_negatives")
  with pytest.raises(ValueError, match=r"\[B, V, D\]"):
    supcon(Z1, LABELS, TAU)
  with pytest.raises(ValueError, match="temperature"):
    nt_xent(Z1, Z2, 0.0)
  with pytest.raises(ValueError, match="same shape"):
    nt_xent(Z1, Z2[:4], TAU)
