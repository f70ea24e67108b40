"""BYOL, MoCo v2 and MoCo v3 losses against float64 NumPy references written
from the formulas (docs/recipes.md, "BYOL", "MoCo v2", "MoCo v3") at the
reference code's scales, with central finite-difference gradients, and
against themselves on 1, 2 and 4 replicas."""

import functools

import numpy as np
import pytest
import tensorflow as tf

from numeric import fd_grad
from replicas import run_sharded
from tf_ssl.losses import byol, moco, moco_v3

TAU = 0.2
TOL = dict(rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- references
def _normalize(x):
  # BYOL's l2_normalize: x * rsqrt(max(|x|^2, 1e-12)).
  return x / np.sqrt(np.maximum(np.sum(x * x, axis=-1, keepdims=True), 1e-12))


def _logsumexp(x):
  m = np.max(x)
  return m + np.log(np.sum(np.exp(x - m)))


def np_byol(p, z):
  """The BYOL reference's form: the squared distance of the unit vectors,
  |p/|p| - z/|z||^2 = 2 - 2 cos, averaged over the rows."""
  d = _normalize(p) - _normalize(z)
  return np.mean(np.sum(d * d, axis=1))


def np_moco(q, k, queue, tau):
  """Per row: -log softmax of the positive q.k among [q.k, q.queue_j] / tau;
  the queue is used as given (it is stored normalised)."""
  q, k = _normalize(q), _normalize(k)
  losses = []
  for i in range(len(q)):
    logits = np.concatenate([[q[i] @ k[i]], queue @ q[i]]) / tau
    losses.append(_logsumexp(logits) - logits[0])
  return np.mean(losses)


def np_moco_v3(q, k, tau, offset=None):
  """2 tau times the mean over rows of -log softmax of the positive q_i.k_i
  among q_i.k_n / tau for every key n of the global batch. `offset`, if given,
  is a deliberately WRONG positive: row i uses key offset(i)."""
  q, k = _normalize(q), _normalize(k)
  losses = []
  for i in range(len(q)):
    logits = k @ q[i] / tau
    j = i if offset is None else offset(i)
    losses.append(_logsumexp(logits) - logits[j])
  return 2 * tau * np.mean(losses)


# --------------------------------------------------------------------- data
def _normal(shape, seed):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# Global batch 16 (8 per replica on 2, 4 on 4), D = 6, a queue of K = 20.
# The keys are noisy copies of the queries, so the positive wins for some
# rows and not for others and the accuracy checks mean something.
Q = _normal((16, 6), 0)
K = Q + 1.5 * _normal((16, 6), 1)
QUEUE = _normalize(_normal((20, 6), 2).astype(np.float64)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def byol_expected():
  f = lambda p: np_byol(p, K.astype(np.float64))
  return f(Q.astype(np.float64)), fd_grad(f, Q)


@functools.lru_cache(maxsize=None)
def moco_expected(queue_scale=1.0):
  queue = queue_scale * QUEUE.astype(np.float64)
  f = lambda q: np_moco(q, K.astype(np.float64), queue, TAU)
  return f(Q.astype(np.float64)), fd_grad(f, Q)


@functools.lru_cache(maxsize=None)
def moco_v3_expected(tau=TAU):
  f = lambda q: np_moco_v3(q, K.astype(np.float64), tau)
  return f(Q.astype(np.float64)), fd_grad(f, Q)


def _value_and_grads(fn, *xs):
  xs = [tf.constant(x) for x in xs]
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(xs)
    loss, metrics = fn(*xs)
  grads = tape.gradient(loss, xs)
  metric_grads = {key: tape.gradient(m, xs[0]) for key, m in metrics.items()}
  return loss, grads, metrics, metric_grads


def _softmax_stats(logits, positive):
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  acc = np.mean(logits.argmax(1) == positive)
  entropy = -np.mean(np.sum(p * np.log(p), axis=1))
  return acc, entropy


# ---------------------------------------------------------- single device
def test_byol_matches_numpy():
  loss, (grad_p, grad_z), metrics, metric_grads = _value_and_grads(byol, Q, K)
  want, want_grad = byol_expected()
  np.testing.assert_allclose(loss.numpy(), want, **TOL)
  np.testing.assert_allclose(grad_p.numpy(), want_grad, **TOL)
  assert grad_z is None  # the target gets no gradient
  cos = np.sum(_normalize(Q.astype(np.float64)) * _normalize(K.astype(np.float64)), 1)
  np.testing.assert_allclose(metrics["cosine"].numpy(), np.mean(cos), **TOL)
  assert metrics["cosine"].dtype == tf.float32
  assert all(g is None for g in metric_grads.values())


def test_byol_identical_is_zero_opposite_is_four():
  # Scale-invariant: p is a multiple of z.
  loss, (grad_p, _), metrics, _ = _value_and_grads(byol, 3 * K, K)
  np.testing.assert_allclose(loss.numpy(), 0.0, atol=1e-6)
  np.testing.assert_allclose(grad_p.numpy(), 0.0, atol=1e-6)
  np.testing.assert_allclose(metrics["cosine"].numpy(), 1.0, atol=1e-6)
  # One direction's mean is at most 4 (the method adds two directions: 8).
  loss, metrics = byol(-0.5 * K, K)
  np.testing.assert_allclose(loss.numpy(), 4.0, atol=1e-6)
  np.testing.assert_allclose(metrics["cosine"].numpy(), -1.0, atol=1e-6)


def test_moco_matches_numpy():
  fn = lambda q, k, queue: moco(q, k, queue, TAU)
  loss, (grad_q, grad_k, grad_queue), metrics, metric_grads = _value_and_grads(
      fn, Q, K, QUEUE)
  want, want_grad = moco_expected()
  np.testing.assert_allclose(loss.numpy(), want, **TOL)
  np.testing.assert_allclose(grad_q.numpy(), want_grad, **TOL)
  assert grad_k is None and grad_queue is None
  q, k = _normalize(Q.astype(np.float64)), _normalize(K.astype(np.float64))
  logits = np.concatenate([np.sum(q * k, 1, keepdims=True),
                           q @ QUEUE.astype(np.float64).T], 1) / TAU
  acc, entropy = _softmax_stats(logits, 0)
  assert 0 < acc < 1  # the data must make the check meaningful
  np.testing.assert_allclose(metrics["contrast_acc"].numpy(), acc, **TOL)
  np.testing.assert_allclose(metrics["contrast_entropy"].numpy(), entropy, **TOL)
  assert all(m.dtype == tf.float32 for m in metrics.values())
  assert all(g is None for g in metric_grads.values())


def test_moco_uses_the_queue_as_given():
  # The queue is stored normalised and not normalised again: scaling it
  # scales the negative logits.
  loss, (grad_q,), _, _ = _value_and_grads(
      lambda q: moco(q, K, 2 * QUEUE, TAU), Q)
  want, want_grad = moco_expected(2.0)
  assert abs(want - moco_expected()[0]) > 0.1
  np.testing.assert_allclose(loss.numpy(), want, **TOL)
  np.testing.assert_allclose(grad_q.numpy(), want_grad, **TOL)


@pytest.mark.parametrize("tau", [TAU, 1.0])
def test_moco_v3_matches_numpy(tau):
  fn = lambda q, k: moco_v3(q, k, tau)
  loss, (grad_q, grad_k), metrics, metric_grads = _value_and_grads(fn, Q, K)
  want, want_grad = moco_v3_expected(tau)
  np.testing.assert_allclose(loss.numpy(), want, **TOL)
  np.testing.assert_allclose(grad_q.numpy(), want_grad, **TOL)
  assert grad_k is None
  q, k = _normalize(Q.astype(np.float64)), _normalize(K.astype(np.float64))
  acc, entropy = _softmax_stats(q @ k.T / tau, np.arange(16))
  assert 0 < acc < 1
  np.testing.assert_allclose(metrics["contrast_acc"].numpy(), acc, **TOL)
  np.testing.assert_allclose(metrics["contrast_entropy"].numpy(), entropy, **TOL)
  assert all(m.dtype == tf.float32 for m in metrics.values())
  assert all(g is None for g in metric_grads.values())


@pytest.mark.parametrize("tau", [0.2, 1.0])
def test_moco_v3_is_two_tau_times_cross_entropy(tau):
  # The MoCo v3 reference multiplies its mean cross-entropy by 2 tau.
  q, k = _normalize(Q.astype(np.float64)), _normalize(K.astype(np.float64))
  logits = q @ k.T / tau
  m = logits.max(1, keepdims=True)
  log_p = logits - m - np.log(np.exp(logits - m).sum(1, keepdims=True))
  ce = -np.mean(np.diag(log_p))
  np.testing.assert_allclose(moco_v3(Q, K, tau)[0].numpy(), 2 * tau * ce, **TOL)


# ------------------------------------------------------------- replicas
def _zero_grad_for(x):
  """0 * sum(x): run_sharded differentiates every input, and a key (or a
  target) must get no gradient, which the tape reports as None. Adding this
  makes it an explicit zero tensor, so a gradient that leaked through the
  keys would show up as non-zero."""
  return 0.0 * tf.reduce_sum(x)


def test_byol_across_replicas(strategy):
  fn = lambda p, z: byol(p, z)[0] + _zero_grad_for(z)
  loss, (grad_p, grad_z) = run_sharded(strategy, fn, Q, K)
  want, want_grad = byol_expected()
  np.testing.assert_allclose(loss.numpy(), want, **TOL)
  np.testing.assert_allclose(grad_p.numpy(), want_grad, **TOL)
  assert np.all(grad_z.numpy() == 0.0)


def test_moco_across_replicas(strategy):
  queue = tf.constant(QUEUE)  # the whole queue on every replica
  fn = lambda q, k: moco(q, k, queue, TAU)[0] + _zero_grad_for(k)
  loss, (grad_q, grad_k) = run_sharded(strategy, fn, Q, K)
  want, want_grad = moco_expected()
  np.testing.assert_allclose(loss.numpy(), want, **TOL)
  np.testing.assert_allclose(grad_q.numpy(), want_grad, **TOL)
  assert np.all(grad_k.numpy() == 0.0)


def test_moco_v3_across_replicas(strategy):
  fn = lambda q, k: moco_v3(q, k, TAU)[0] + _zero_grad_for(k)
  loss, (grad_q, grad_k) = run_sharded(strategy, fn, Q, K)
  want, want_grad = moco_v3_expected()
  np.testing.assert_allclose(loss.numpy(), want, **TOL)
  np.testing.assert_allclose(grad_q.numpy(), want_grad, **TOL)
  # No gradient through the gathered keys, on any replica.
  assert np.all(grad_k.numpy() == 0.0)


def test_moco_v3_positive_uses_the_global_index(strategy_2):
  # Swapping which replica holds which half of the batch changes nothing...
  swap = np.concatenate([np.arange(8, 16), np.arange(8)])
  fn = lambda q, k: moco_v3(q, k, TAU)[0] + _zero_grad_for(k)
  loss, _ = run_sharded(strategy_2, fn, Q, K)
  swapped, _ = run_sharded(strategy_2, fn, Q[swap], K[swap])
  want = moco_v3_expected()[0]
  np.testing.assert_allclose(loss.numpy(), want, **TOL)
  np.testing.assert_allclose(swapped.numpy(), want, **TOL)
  # ...but a positive at the LOCAL index (no replica offset) would pair
  # replica 1's queries with replica 0's keys, and the swap would move it.
  local = lambda i: i % 8
  wrong = np_moco_v3(Q.astype(np.float64), K.astype(np.float64), TAU, local)
  wrong_swapped = np_moco_v3(Q[swap].astype(np.float64),
                             K[swap].astype(np.float64), TAU, local)
  assert abs(wrong - want) > 0.1 and abs(wrong_swapped - wrong) > 0.1


def test_moco_v3_metrics_are_local_and_average_to_global(strategy_4):
  @tf.function
  def run():
    local = strategy_4.experimental_distribute_values_from_function(
        lambda ctx: (tf.split(Q, 4)[ctx.replica_id_in_sync_group],
                     tf.split(K, 4)[ctx.replica_id_in_sync_group]))
    return strategy_4.run(lambda q, k: moco_v3(q, k, TAU)[1], args=local)

  metrics = run()
  want = moco_v3(Q, K, TAU)[1]
  for key in want:
    got = strategy_4.reduce("MEAN", metrics[key], axis=None)
    np.testing.assert_allclose(got.numpy(), want[key].numpy(), **TOL)


# ------------------------------------------------------- dtypes, arguments
def test_bfloat16_inputs_give_float32_loss():
  q, k = tf.cast(Q, tf.bfloat16), tf.cast(K, tf.bfloat16)
  queue = tf.cast(QUEUE, tf.bfloat16)
  f32 = lambda x: tf.cast(x, tf.float32)
  for fn, args in ((byol, (q, k)),
                   (lambda a, b, c: moco(a, b, c, TAU), (q, k, queue)),
                   (lambda a, b: moco_v3(a, b, TAU), (q, k))):
    loss, metrics = fn(*args)
    assert loss.dtype == tf.float32
    assert all(m.dtype == tf.float32 for m in metrics.values())
    want = fn(*map(f32, args))[0]
    np.testing.assert_allclose(loss.numpy(), want.numpy(), rtol=1e-6)


def test_bad_arguments_raise_value_error():
  with pytest.raises(ValueError, match=r"byol needs p, z of the same shape"):
    byol(Q, K[:4])
  with pytest.raises(ValueError, match=r"\[B, D\]"):
    byol(Q[0], K[0])
  with pytest.raises(ValueError, match=r"\[B, D\]"):
    byol(Q[None], K[None])
  for tau in (0.0, -0.1):
    with pytest.raises(ValueError, match="temperature"):
      moco(Q, K, QUEUE, tau)
    with pytest.raises(ValueError, match="temperature"):
      moco_v3(Q, K, tau)
  with pytest.raises(ValueError, match="same shape"):
    moco(Q, K[:, :5], QUEUE, TAU)
  with pytest.raises(ValueError, match=r"queue \[K, D\]"):
    moco(Q, K, QUEUE[:, :5], TAU)
  with pytest.raises(ValueError, match=r"queue \[K, D\]"):
    moco(Q, K, QUEUE[0], TAU)
  with pytest.raises(ValueError, match="same shape"):
    moco_v3(Q, K[:8], TAU)
  with pytest.raises(ValueError, match=r"\[B, D\]"):
    moco_v3(Q[0], K[0], TAU)
