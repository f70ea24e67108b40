"""Sinkhorn, SwAV, DINO, Barlow Twins and VICReg losses against float64 NumPy
references written from the formulas (docs/recipes.md, "SwAV", "DINO",
"Barlow Twins", "VICReg"), with central finite-difference gradients, and
against themselves on 1, 2 and 4 replicas: the global statistics (Sinkhorn's
sums, the DINO centre, the standardisation, cross-correlation and covariance)
must make every replica count compute what one device does."""

import numpy as np
import pytest
import tensorflow as tf

from numeric import fd_grad
from replicas import run_sharded
from tf_ssl import losses
from tf_ssl.losses import barlow_twins, dino, dino_center, sinkhorn, swav, vicreg

TOL = dict(rtol=1e-5, atol=1e-5)
EPS, ITERS, TAU = 0.05, 3, 0.1
TAU_S, TAU_T = 0.1, 0.04


# ---------------------------------------------------------------- references
def _log_softmax(x):
  m = x.max(axis=1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))


def _entropy(p):
  return -np.mean(np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0),
                         axis=1))


def np_sinkhorn_all(scores, eps=EPS, iters=ITERS):
  """The reference's steps on every row: Q = exp(S / eps)^T [K, N], divided
  by its total, then `iters` times each prototype row to 1/K and each sample
  column to 1/N; times N, transposed back to [N, K]. No max subtraction:
  float64 holds exp(1 / 0.05)."""
  q = np.exp(scores / eps).T
  q = q / q.sum()
  k, n = q.shape
  for _ in range(iters):
    q = q / q.sum(axis=1, keepdims=True) / k
    q = q / q.sum(axis=0, keepdims=True) / n
  return (q * n).T


def np_sinkhorn(scores, eps=EPS, iters=ITERS, shared=None):
  """Codes of the batch rows of Sinkhorn on [shared; batch]."""
  if shared is None:
    return np_sinkhorn_all(scores, eps, iters)
  return np_sinkhorn_all(np.concatenate([shared, scores]), eps, iters)[len(shared):]


def np_swav(scores, codes, tau=TAU):
  return -np.mean(np.sum(codes * _log_softmax(scores / tau), axis=1))


def np_dino_target(teacher, center, tau_t=TAU_T):
  return np.exp(_log_softmax((teacher - np.reshape(center, [1, -1])) / tau_t))


def np_dino(student, teacher, center, tau_s=TAU_S, tau_t=TAU_T):
  target = np_dino_target(teacher, center, tau_t)
  return -np.mean(np.sum(target * _log_softmax(student / tau_s), axis=1))


def np_barlow_c(z1, z2):
  """The cross-correlation of the affine-free BN outputs (batch mean, biased
  variance, eps 1e-5)."""
  bn = lambda z: (z - z.mean(0)) / np.sqrt(z.var(0) + 1e-5)
  return bn(z1).T @ bn(z2) / len(z1)


def np_barlow(z1, z2, lambd=0.0051):
  c = np_barlow_c(z1, z2)
  on = np.diag(c)
  return np.sum((1 - on) ** 2) + lambd * (np.sum(c ** 2) - np.sum(on ** 2))


def np_vicreg_terms(z1, z2):
  """(invariance, variance, covariance) as VICReg's main_vicreg.py: the
  variance term halved, std from the unbiased variance plus 1e-4."""
  inv = np.mean((z1 - z2) ** 2)
  v = lambda z: np.mean(np.maximum(0.0, 1.0 - np.sqrt(z.var(0, ddof=1) + 1e-4)))

  def c(z):
    zc = z - z.mean(0)
    cov = zc.T @ zc / (len(z) - 1)
    return (np.sum(cov ** 2) - np.sum(np.diag(cov) ** 2)) / z.shape[1]

  return inv, (v(z1) + v(z2)) / 2, c(z1) + c(z2)


def np_vicreg(z1, z2, weights=(25.0, 25.0, 1.0)):
  return float(np.dot(weights, np_vicreg_terms(z1, z2)))


# --------------------------------------------------------------------- data
def _normal(shape, seed):
  return np.random.default_rng(seed).normal(size=shape)


def _unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


# Global batch 16 (8 rows per replica on 2, 4 on 4). SwAV: 8-d projections
# against K = 10 prototypes, cosine scores of two crops, and a queue of 12
# earlier projections. The replicas' maxima differ, so a local maximum in
# Sinkhorn would change the codes.
_PROTOS = _unit(_normal((10, 8), 0))
_Z_A = _unit(_normal((16, 8), 1))
SCORES_A = (_Z_A @ _PROTOS.T).astype(np.float32)
SCORES_B = (_unit(_Z_A + 0.7 * _normal((16, 8), 2)) @ _PROTOS.T).astype(np.float32)
QUEUE_SCORES = (_unit(_normal((12, 8), 3)) @ _PROTOS.T).astype(np.float32)
# DINO: K = 12 logits; the teacher is a noisy copy of the student.
STUDENT = (2 * _normal((16, 12), 4)).astype(np.float32)
TEACHER = (STUDENT + 2 * _normal((16, 12), 5)).astype(np.float32)
CENTER = (2 * _normal((12,), 6)).astype(np.float32)
# Barlow Twins / VICReg: D = 8, each dimension with its own offset and scale
# (so the standardisation matters, and VICReg's hinge is active for some
# dimensions and not others); the second view is a noisy copy.
_SCALE = np.linspace(0.3, 2.0, 8)
_OFFSET = np.linspace(-1.0, 3.0, 8)
Z1 = (_OFFSET + _SCALE * _normal((16, 8), 7)).astype(np.float32)
Z2 = (Z1 + 0.6 * _SCALE * _normal((16, 8), 8)).astype(np.float32)


def f64(x):
  return np.asarray(x, np.float64)


def _value_and_grads(fn, *xs):
  xs = [tf.constant(x) for x in xs]
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(xs)
    loss, metrics = fn(*xs)
  grads = tape.gradient(loss, xs)
  metric_grads = [tape.gradient(m, xs) for m in metrics.values()]
  return loss, grads, metrics, metric_grads


def _no_metric_gradient(metrics, metric_grads):
  assert all(m.dtype == tf.float32 and m.shape == () for m in metrics.values())
  assert all(g is None for grads in metric_grads for g in grads)


def _zero_grad_for(x):
  """0 * sum(x): run_sharded differentiates every input; an input without
  gradient becomes an explicit zero, so a gradient that leaked through it
  would show up as non-zero."""
  return 0.0 * tf.reduce_sum(tf.cast(x, tf.float32))


def run_per_replica(strategy, fn, *global_inputs):
  """fn(*local_inputs) -> tensor on every replica, each input split into
  equal contiguous slices in replica order; the replicas' results as a list
  of NumPy arrays, in replica order."""
  n = strategy.num_replicas_in_sync

  @tf.function
  def run():
    local = strategy.experimental_distribute_values_from_function(
        lambda ctx: tuple(tf.split(x, n)[ctx.replica_id_in_sync_group]
                          for x in global_inputs))
    return strategy.run(fn, args=local)

  return [t.numpy() for t in strategy.experimental_local_results(run())]


# ------------------------------------------------------------------ Sinkhorn
@pytest.mark.parametrize("shared", [None, QUEUE_SCORES], ids=["batch", "queue"])
def test_sinkhorn_matches_numpy(shared):
  x = tf.constant(SCORES_A)
  with tf.GradientTape() as tape:
    tape.watch(x)
    codes = sinkhorn(x, EPS, ITERS, shared_scores=shared)
  assert tape.gradient(codes, x) is None
  assert codes.dtype == tf.float32 and codes.shape == SCORES_A.shape
  want = np_sinkhorn(f64(SCORES_A), shared=None if shared is None else f64(shared))
  np.testing.assert_allclose(codes.numpy(), want, **TOL)
  # After the last (row) normalisation every row sums to 1.
  np.testing.assert_allclose(codes.numpy().sum(1), 1.0, atol=1e-6)
  if shared is not None:
    # The queue takes part: the codes differ from the batch-only ones...
    assert np.abs(want - np_sinkhorn(f64(SCORES_A))).max() > 0.01
    # ...and equal the batch rows of Sinkhorn on [queue; batch].
    both = sinkhorn(np.concatenate([shared, SCORES_A]), EPS, ITERS)
    np.testing.assert_allclose(codes.numpy(), both.numpy()[len(shared):], **TOL)


def test_sinkhorn_prototype_totals_approach_equipartition():
  # Each prototype's total over all N rows is N/K right after a prototype
  # step; the row step that follows moves it. The L1 distance of the totals
  # from N/K does not grow with the iterations and goes to 0; 3 iterations
  # are far from it on this data.
  everything = np.concatenate([QUEUE_SCORES, SCORES_A])
  n, k = everything.shape

  def distance(iterations):
    codes = sinkhorn(everything, EPS, iterations).numpy()
    np.testing.assert_allclose(codes.sum(1), 1.0, atol=1e-5)
    return np.abs(codes.sum(0) * k / n - 1).sum()

  dist = [distance(i) for i in (1, 2, 3, 6, 100)]
  assert all(b <= a + 1e-5 for a, b in zip(dist, dist[1:])), dist
  assert dist[2] > 0.5 and dist[-1] < 1e-4, dist
  want = np_sinkhorn_all(f64(everything), iters=3)
  np.testing.assert_allclose(dist[2], np.abs(want.sum(0) * k / n - 1).sum(),
                             rtol=1e-4)


def test_sinkhorn_subtracts_the_maximum():
  # Shifting every score by 100 changes nothing; without the max subtraction
  # exp(101 / 0.05) overflows even float64. float32 holds 100 + s to about
  # 8e-6, i.e. 1.5e-4 in the exponent: hence the looser tolerance.
  shifted = sinkhorn(SCORES_A + 100, EPS, ITERS,
                     shared_scores=QUEUE_SCORES + 100).numpy()
  assert np.all(np.isfinite(shifted))
  want = np_sinkhorn(f64(SCORES_A), shared=f64(QUEUE_SCORES))
  np.testing.assert_allclose(shifted, want, rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("shared", [None, QUEUE_SCORES], ids=["batch", "queue"])
def test_sinkhorn_across_replicas(strategy, shared):
  # The shared (queue) rows are the same on every replica and must count
  # once: all-reducing them would weigh them R times.
  fn = lambda s: sinkhorn(s, EPS, ITERS, shared_scores=shared)
  codes = np.concatenate(run_per_replica(strategy, fn, SCORES_A))
  want = np_sinkhorn(f64(SCORES_A), shared=None if shared is None else f64(shared))
  np.testing.assert_allclose(codes, want, **TOL)


# --------------------------------------------------------------------- SwAV
def test_swav_matches_numpy():
  codes = np_sinkhorn(f64(SCORES_A)).astype(np.float32)
  loss, (grad_s, grad_c), metrics, metric_grads = _value_and_grads(
      lambda s, c: swav(s, c, TAU), SCORES_B, codes)
  f = lambda s: np_swav(s, f64(codes))
  np.testing.assert_allclose(loss.numpy(), f(f64(SCORES_B)), **TOL)
  np.testing.assert_allclose(grad_s.numpy(), fd_grad(f, SCORES_B), **TOL)
  assert grad_c is None  # the codes are targets
  np.testing.assert_allclose(metrics["entropy"].numpy(), _entropy(f64(codes)),
                             **TOL)
  p = np.exp(_log_softmax(f64(SCORES_B) / TAU))
  np.testing.assert_allclose(metrics["prediction_entropy"].numpy(),
                             _entropy(p), **TOL)
  _no_metric_gradient(metrics, metric_grads)


def test_swav_with_sinkhorn_codes_across_replicas(strategy):
  # The swapped prediction of two crops, codes from Sinkhorn on each
  # replica: value and input gradients equal one device's.
  def fn(a, b):
    return (swav(b, sinkhorn(a, EPS, ITERS), TAU)[0]
            + swav(a, sinkhorn(b, EPS, ITERS), TAU)[0])

  loss, (grad_a, grad_b) = run_sharded(strategy, fn, SCORES_A, SCORES_B)
  codes_a, codes_b = np_sinkhorn(f64(SCORES_A)), np_sinkhorn(f64(SCORES_B))
  want = np_swav(f64(SCORES_B), codes_a) + np_swav(f64(SCORES_A), codes_b)
  np.testing.assert_allclose(loss.numpy(), want, **TOL)
  np.testing.assert_allclose(
      grad_a.numpy(), fd_grad(lambda s: np_swav(s, codes_b), SCORES_A), **TOL)
  np.testing.assert_allclose(
      grad_b.numpy(), fd_grad(lambda s: np_swav(s, codes_a), SCORES_B), **TOL)


# --------------------------------------------------------------------- DINO
@pytest.mark.parametrize("center_shape", [(12,), (1, 12)])
def test_dino_matches_numpy(center_shape):
  center = CENTER.reshape(center_shape)
  loss, (grad_s, grad_t, grad_c), metrics, metric_grads = _value_and_grads(
      lambda s, t, c: dino(s, t, c, TAU_S, TAU_T), STUDENT, TEACHER, center)
  f = lambda s: np_dino(s, f64(TEACHER), f64(CENTER))
  np.testing.assert_allclose(loss.numpy(), f(f64(STUDENT)), **TOL)
  np.testing.assert_allclose(grad_s.numpy(), fd_grad(f, STUDENT), **TOL)
  assert grad_t is None and grad_c is None
  # The centre matters on this data, and it is subtracted before the
  # temperature divides (after it, it would act as tau_t * center).
  for other in (0 * CENTER, TAU_T * CENTER):
    assert abs(f(f64(STUDENT)) - np_dino(f64(STUDENT), f64(TEACHER), other)) > 0.1
  target = np_dino_target(f64(TEACHER), f64(CENTER))
  np.testing.assert_allclose(metrics["entropy"].numpy(), _entropy(target), **TOL)
  p = np.exp(_log_softmax(f64(STUDENT) / TAU_S))
  np.testing.assert_allclose(metrics["prediction_entropy"].numpy(),
                             _entropy(p), **TOL)
  _no_metric_gradient(metrics, metric_grads)


def test_dino_takes_a_scheduled_teacher_temperature():
  # The method's warm-up computes the temperature in the graph: a tensor
  # whose value is unknown when the loss is built is used, not checked.
  @tf.function
  def run(epoch):
    tau_t = 0.04 + 0.001 * epoch
    return dino(STUDENT, TEACHER, CENTER, TAU_S, tau_t)[0]

  want = np_dino(f64(STUDENT), f64(TEACHER), f64(CENTER), tau_t=0.07)
  np.testing.assert_allclose(run(tf.constant(30.0)).numpy(), want, **TOL)


@pytest.mark.parametrize("center_shape", [(12,), (1, 12)])
def test_dino_center_matches_numpy(center_shape):
  center = tf.constant(CENTER.reshape(center_shape))
  teacher = tf.constant(TEACHER)
  with tf.GradientTape() as tape:
    tape.watch([teacher, center])
    new = dino_center(teacher, center, 0.9)
  assert tape.gradient(new, [teacher, center]) == [None, None]
  assert new.dtype == tf.float32 and new.shape == center_shape
  want = 0.9 * f64(CENTER) + 0.1 * f64(TEACHER).mean(0)
  np.testing.assert_allclose(new.numpy().reshape(-1), want, **TOL)


def test_dino_across_replicas(strategy):
  center = tf.constant(CENTER)  # replicated state, the same everywhere
  fn = lambda s, t: dino(s, t, center, TAU_S, TAU_T)[0] + _zero_grad_for(t)
  loss, (grad_s, grad_t) = run_sharded(strategy, fn, STUDENT, TEACHER)
  f = lambda s: np_dino(s, f64(TEACHER), f64(CENTER))
  np.testing.assert_allclose(loss.numpy(), f(f64(STUDENT)), **TOL)
  np.testing.assert_allclose(grad_s.numpy(), fd_grad(f, STUDENT), **TOL)
  assert np.all(grad_t.numpy() == 0.0)

  # Every replica computes the centre of the GLOBAL batch's mean; a local
  # mean would differ by more than 0.1 on this data.
  new = run_per_replica(strategy, lambda t: dino_center(t, center, 0.9),
                        TEACHER)
  want = 0.9 * f64(CENTER) + 0.1 * f64(TEACHER).mean(0)
  n = strategy.num_replicas_in_sync
  for r, got in enumerate(new):
    np.testing.assert_allclose(got, want, **TOL)
    if n > 1:
      local = 0.9 * f64(CENTER) + 0.1 * np.split(f64(TEACHER), n)[r].mean(0)
      assert np.abs(local - want).max() > 0.1


# ------------------------------------------------------------- Barlow Twins
def barlow_expected():
  f1 = lambda z: np_barlow(z, f64(Z2))
  f2 = lambda z: np_barlow(f64(Z1), z)
  return f1(f64(Z1)), fd_grad(f1, Z1), fd_grad(f2, Z2)


def test_barlow_twins_matches_numpy():
  loss, (g1, g2), metrics, metric_grads = _value_and_grads(barlow_twins, Z1, Z2)
  want, want_g1, want_g2 = barlow_expected()
  np.testing.assert_allclose(loss.numpy(), want, **TOL)
  np.testing.assert_allclose(g1.numpy(), want_g1, **TOL)
  np.testing.assert_allclose(g2.numpy(), want_g2, **TOL)
  c = np_barlow_c(f64(Z1), f64(Z2))
  off = c[~np.eye(8, dtype=bool)]
  np.testing.assert_allclose(metrics["on_diag"].numpy(), np.mean(np.diag(c)), **TOL)
  np.testing.assert_allclose(metrics["off_diag"].numpy(),
                             np.sqrt(np.mean(off ** 2)), **TOL)
  _no_metric_gradient(metrics, metric_grads)


def test_barlow_twins_standardises_each_dimension():
  # A positive scale and a shift per dimension of either view change nothing
  # (up to BN's eps), so the statistics are per dimension over the batch.
  scale, shift = np.linspace(0.5, 4.0, 8), np.linspace(-5.0, 5.0, 8)
  moved = barlow_twins(scale * Z1 + shift, Z2 / scale - shift)[0]
  np.testing.assert_allclose(moved.numpy(), barlow_twins(Z1, Z2)[0].numpy(),
                             rtol=1e-3)


def test_barlow_twins_across_replicas(strategy):
  loss, (g1, g2) = run_sharded(strategy, lambda a, b: barlow_twins(a, b)[0],
                               Z1, Z2)
  want, want_g1, want_g2 = barlow_expected()
  np.testing.assert_allclose(loss.numpy(), want, **TOL)
  np.testing.assert_allclose(g1.numpy(), want_g1, **TOL)
  np.testing.assert_allclose(g2.numpy(), want_g2, **TOL)


def test_barlow_twins_gradient_needs_the_all_reduce_gradient(strategy_4,
                                                             monkeypatch):
  """The official code sums C over replicas with torch.distributed.all_reduce,
  which passes no gradient to the other replicas (lightly-ai/lightly#1977);
  its SyncBN's reductions do. Breaking the same way only the all-reduce of
  C ([D, D]) leaves the loss unchanged but gives every replica's rows
  exactly 1/R of the gradient: each replica's (1/R-scaled) copy of the loss
  reaches C only through its own product. On 4 replicas that is 1/4, which
  test_barlow_twins_across_replicas would reject: the replica tests catch
  the bug."""
  real = losses._all_reduce_sum  # pylint: disable=protected-access

  def broken(x):
    if x.shape != (8, 8):  # the standardisation's sums stay differentiable
      return real(x)
    return x + tf.stop_gradient(real(x) - x)  # C's value, the local gradient

  monkeypatch.setattr(losses, "_all_reduce_sum", broken)
  loss, (g1, g2) = run_sharded(strategy_4, lambda a, b: barlow_twins(a, b)[0],
                               Z1, Z2)
  want, want_g1, want_g2 = barlow_expected()
  np.testing.assert_allclose(loss.numpy(), want, **TOL)
  np.testing.assert_allclose(g1.numpy(), want_g1 / 4, **TOL)
  np.testing.assert_allclose(g2.numpy(), want_g2 / 4, **TOL)
  assert np.abs(g1.numpy() - want_g1).max() > 0.1


# ------------------------------------------------------------------- VICReg
def vicreg_expected():
  f1 = lambda z: np_vicreg(z, f64(Z2))
  f2 = lambda z: np_vicreg(f64(Z1), z)
  return f1(f64(Z1)), fd_grad(f1, Z1), fd_grad(f2, Z2)


def test_vicreg_matches_numpy():
  # The hinge is active for some dimensions and not others in both views,
  # and no std is within a finite-difference step of the kink.
  for z in (Z1, Z2):
    std = np.sqrt(f64(z).var(0, ddof=1) + 1e-4)
    assert 0 < np.sum(std < 1) < 8 and np.abs(std - 1).min() > 1e-3
  loss, (g1, g2), metrics, metric_grads = _value_and_grads(vicreg, Z1, Z2)
  want, want_g1, want_g2 = vicreg_expected()
  np.testing.assert_allclose(loss.numpy(), want, **TOL)
  np.testing.assert_allclose(g1.numpy(), want_g1, **TOL)
  np.testing.assert_allclose(g2.numpy(), want_g2, **TOL)
  for key, value in zip(("invariance", "variance", "covariance"),
                        np_vicreg_terms(f64(Z1), f64(Z2))):
    np.testing.assert_allclose(metrics[key].numpy(), value, **TOL)
  _no_metric_gradient(metrics, metric_grads)
  # The weights are the ones given.
  weights = (1.0, 2.0, 0.5)
  np.testing.assert_allclose(vicreg(Z1, Z2, *weights)[0].numpy(),
                             np_vicreg(f64(Z1), f64(Z2), weights), **TOL)


def test_vicreg_across_replicas(strategy):
  loss, (g1, g2) = run_sharded(strategy, lambda a, b: vicreg(a, b)[0], Z1, Z2)
  want, want_g1, want_g2 = vicreg_expected()
  np.testing.assert_allclose(loss.numpy(), want, **TOL)
  np.testing.assert_allclose(g1.numpy(), want_g1, **TOL)
  np.testing.assert_allclose(g2.numpy(), want_g2, **TOL)


def test_vicreg_metrics_on_replicas(strategy_4):
  # Invariance is each replica's own mean (their mean is the global one);
  # variance and covariance are the global values on every replica.
  terms = run_per_replica(
      strategy_4, lambda a, b: tf.stack(list(vicreg(a, b)[1].values())), Z1, Z2)
  inv, var, cov = np_vicreg_terms(f64(Z1), f64(Z2))
  for r, (got_inv, got_var, got_cov) in enumerate(terms):
    local = np.split(f64(Z1) - f64(Z2), 4)[r]
    np.testing.assert_allclose(got_inv, np.mean(local ** 2), **TOL)
    np.testing.assert_allclose([got_var, got_cov], [var, cov], **TOL)
  np.testing.assert_allclose(np.mean([t[0] for t in terms]), inv, **TOL)


# ------------------------------------------------------- dtypes, arguments
def test_bfloat16_inputs_compute_in_float32():
  cases = (
      (lambda s: (sinkhorn(s, EPS, ITERS, shared_scores=QUEUE_SCORES), {}),
       (SCORES_A,)),
      (lambda s, c: swav(s, c, TAU), (SCORES_B, np_sinkhorn(f64(SCORES_A)))),
      (lambda s, t: dino(s, t, CENTER), (STUDENT, TEACHER)),
      (lambda t: (dino_center(t, CENTER), {}), (TEACHER,)),
      (barlow_twins, (Z1, Z2)),
      (vicreg, (Z1, Z2)),
  )
  for fn, args in cases:
    low = [tf.cast(tf.constant(a, tf.float32), tf.bfloat16) for a in args]
    out, metrics = fn(*low)
    want, want_metrics = fn(*[tf.cast(a, tf.float32) for a in low])
    assert out.dtype == tf.float32
    assert np.all(np.isfinite(out.numpy()))
    np.testing.assert_allclose(out.numpy(), want.numpy(), rtol=1e-6, atol=1e-7)
    for key, m in metrics.items():
      assert m.dtype == tf.float32
      np.testing.assert_allclose(m.numpy(), want_metrics[key].numpy(),
                                 rtol=1e-6, atol=1e-7)


def test_bad_arguments_raise_value_error():
  for eps in (0.0, -0.05):
    with pytest.raises(ValueError, match="epsilon"):
      sinkhorn(SCORES_A, eps)
  for iters in (0, -1, 1.5, "3"):
    with pytest.raises(ValueError, match="iterations"):
      sinkhorn(SCORES_A, EPS, iters)
  for bad in (SCORES_A[0], SCORES_A[None]):
    with pytest.raises(ValueError, match=r"scores \[B, K\]"):
      sinkhorn(bad)
  for bad in (QUEUE_SCORES[:, :5], QUEUE_SCORES[0]):
    with pytest.raises(ValueError, match=r"shared_scores \[n_q, K\]"):
      sinkhorn(SCORES_A, shared_scores=bad)

  with pytest.raises(ValueError, match="temperature"):
    swav(SCORES_B, SCORES_A, 0.0)
  with pytest.raises(ValueError, match=r"swav needs scores, codes of the same shape \[B, K\]"):
    swav(SCORES_B, SCORES_A[:8])
  with pytest.raises(ValueError, match=r"\[B, K\]"):
    swav(SCORES_B[0], SCORES_A[0])

  with pytest.raises(ValueError, match="student_temperature"):
    dino(STUDENT, TEACHER, CENTER, student_temperature=0.0)
  with pytest.raises(ValueError, match="teacher_temperature"):
    dino(STUDENT, TEACHER, CENTER, teacher_temperature=-0.04)
  with pytest.raises(ValueError, match="teacher_temperature"):
    dino(STUDENT, TEACHER, CENTER, teacher_temperature=tf.constant(0.0))
  with pytest.raises(ValueError, match="same shape"):
    dino(STUDENT, TEACHER[:, :6], CENTER)
  for bad in (CENTER[:6], CENTER.reshape(2, 6), CENTER[None, None]):
    with pytest.raises(ValueError, match=r"center \[K\] or \[1, K\]"):
      dino(STUDENT, TEACHER, bad)
    with pytest.raises(ValueError, match=r"center \[K\] or \[1, K\]"):
      dino_center(TEACHER, bad)
  for m in (-0.1, 1.5):
    with pytest.raises(ValueError, match="momentum"):
      dino_center(TEACHER, CENTER, m)
  with pytest.raises(ValueError, match=r"teacher_logits \[B, K\]"):
    dino_center(TEACHER[0], CENTER)

  for fn in (barlow_twins, vicreg):
    with pytest.raises(ValueError, match="same shape"):
      fn(Z1, Z2[:8])
    with pytest.raises(ValueError, match=r"\[B, D\]"):
      fn(Z1[None], Z2[None])
  with pytest.raises(ValueError, match="lambd"):
    barlow_twins(Z1, Z2, lambd=-0.1)
