"""LARS against a NumPy reference, its exclusions on a real model, 1 vs 2
replicas, checkpoints and configs; the warmup-cosine schedule and LR scaling
against docs/recipes.md."""

import copy
import logging
import math
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_ssl import optim


def numpy_lars(weights, grad_steps, lr, momentum, weight_decay, eeta,
               nesterov, decay, adapt):
  """Plain float64 LARS (docs/recipes.md); returns weights and velocities."""
  weights = [np.array(w, np.float64) for w in weights]
  velocities = [np.zeros_like(w) for w in weights]
  for grads in grad_steps:
    for i, g in enumerate(grads):
      w, g = weights[i], np.array(g, np.float64)
      if decay[i]:
        g = g + weight_decay * w
      trust = 1.0
      w_norm, g_norm = np.linalg.norm(w), np.linalg.norm(g)
      if adapt[i] and w_norm > 0 and g_norm > 0:
        trust = eeta * w_norm / g_norm
      velocities[i] = momentum * velocities[i] + lr * trust * g
      step = velocities[i]
      if nesterov:
        step = momentum * velocities[i] + lr * trust * g
      weights[i] = w - step
  return weights, velocities


def assert_matches_reference(optimizer, variables, w0, grad_steps, decay,
                             adapt, nesterov, weight_decay, lr, eeta):
  want_w, want_v = numpy_lars(w0, grad_steps, lr, optimizer.momentum,
                              weight_decay, eeta, nesterov, decay, adapt)
  for var, w_init, want, vel, want_vel in zip(variables, w0, want_w,
                                              optimizer.momentums, want_v):
    # Compare the displacement, not the weight: a LARS step is small next to
    # the weight, so a wrong step would hide under rtol on the weight itself.
    # atol is the rounding of the weight in its own dtype (a few ulps).
    atol = 8 * np.finfo(var.dtype).eps * np.abs(w_init).max()
    np.testing.assert_allclose(var.numpy() - w_init, want - w_init,
                               rtol=1e-6, atol=atol, err_msg=var.path)
    np.testing.assert_allclose(vel.numpy(), want_vel, rtol=1e-6, atol=atol,
                               err_msg=var.path)


@pytest.mark.parametrize("nesterov", [False, True], ids=["classic", "nesterov"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["wd0", "wd"])
def test_lars_matches_numpy_reference(weight_decay, nesterov):
  rng = np.random.default_rng(0)
  shapes = {"a": (3, 4), "b": (5,), "skip": (4,), "zero_grad": (2, 2),
            "zero_w": (3,)}
  w0 = [rng.normal(size=s) for s in shapes.values()]
  w0[4][:] = 0  # |w| = 0: trust must fall back to 1.
  # float64, so that rtol 1e-6 on the displacement checks the maths, not
  # float32 rounding (the model test below runs in float32).
  variables = [keras.Variable(w, name=n, dtype="float64")
               for n, w in zip(shapes, w0)]
  lr, eeta = 0.5, 0.05
  optimizer = optim.LARS(lr, weight_decay=weight_decay, eeta=eeta,
                         nesterov=nesterov, exclude_from_weight_decay=("skip",),
                         exclude_from_adaptation=("^skip$",))
  grad_steps = []
  for _ in range(10):
    grads = [rng.normal(size=s) for s in shapes.values()]
    grads[3][:] = 0  # |g| = 0 (|g'| too unless weight decay is on).
    grad_steps.append(grads)
  decay = [weight_decay > 0 and n != "skip" for n in shapes]
  adapt = [n != "skip" for n in shapes]
  applied = 0
  for done in (1, 10):
    for grads in grad_steps[applied:done]:
      optimizer.apply_gradients(zip(grads, variables))
    applied = done
    assert optimizer.iterations.numpy() == done
    assert_matches_reference(optimizer, variables, w0, grad_steps[:done],
                             decay, adapt, nesterov, weight_decay, lr, eeta)


@pytest.mark.parametrize("nesterov", [False, True], ids=["classic", "nesterov"])
def test_momentum_sgd_adds_weight_decay_to_the_gradient(nesterov):
  """PyTorch's SGD(momentum, weight_decay): g + wd * w before the momentum,
  the excluded variable undecayed and no trust ratio anywhere."""
  rng = np.random.default_rng(1)
  shapes = {"dense/kernel": (3, 4), "dense/bias": (4,), "bn/gamma": (4,)}
  w0 = [rng.normal(size=s) for s in shapes.values()]
  variables = [keras.Variable(w, name=n.replace("/", "_"), dtype="float64")
               for n, w in zip(shapes, w0)]
  lr, weight_decay = 0.3, 0.1
  optimizer = optim.momentum_sgd(lr, momentum=0.9, weight_decay=weight_decay,
                                 nesterov=nesterov,
                                 exclude_from_weight_decay=("gamma$", "bias$"))
  grad_steps = [[rng.normal(size=s) for s in shapes.values()] for _ in range(5)]
  for grads in grad_steps:
    optimizer.apply_gradients(zip(grads, variables))
  decay = [n == "dense/kernel" for n in shapes]
  assert_matches_reference(optimizer, variables, w0, grad_steps, decay,
                           [False] * 3, nesterov, weight_decay, lr, eeta=1.0)


def make_model():
  """A small model with every kind of variable the default exclusions name."""
  inputs = keras.Input((6, 6, 3))
  x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
  x = keras.layers.BatchNormalization(name="bn")(x)
  x = keras.layers.ReLU()(x)
  x = keras.layers.Conv2D(4, 3, use_bias=False, name="conv_nobias")(x)
  x = keras.layers.GroupNormalization(groups=2, epsilon=1e-5, name="gn")(x)
  x = keras.layers.GlobalAveragePooling2D()(x)
  x = keras.layers.Dense(6, name="hidden")(x)
  projection = keras.layers.Dense(4, name="projection_head")(x)
  probe = keras.layers.Dense(3, name="probe_head")(keras.ops.stop_gradient(x))
  return keras.Model(inputs, [projection, probe])


def test_default_exclusions_on_a_real_model(caplog):
  keras.utils.set_random_seed(1)
  model = make_model()
  variables = model.trainable_variables
  paths = [v.path for v in variables]
  # Every default pattern must have something to exclude on this model, or
  # this test would not be checking it.
  for pattern in optim.DEFAULT_EXCLUDE:
    assert any(re.search(pattern, p) for p in paths), (pattern, paths)

  def excluded(path):
    return (path.endswith(("/gamma", "/beta", "/bias")) or
            path.startswith("probe_head/"))

  expect_excluded = [excluded(p) for p in paths]
  both = [p for p, e in zip(paths, expect_excluded) if not e]
  assert sorted(both) == ["conv/kernel", "conv_nobias/kernel", "hidden/kernel",
                          "projection_head/kernel"]
  assert {"bn/gamma", "bn/beta", "gn/gamma", "gn/beta", "conv/bias",
          "probe_head/kernel", "probe_head/bias",
          "projection_head/bias"} <= set(paths)

  # Random weights: zero biases and betas would hide a missing exclusion
  # (trust is 1 and decay is 0 at w = 0 either way).
  rng = np.random.default_rng(1)
  w0 = [rng.normal(size=v.shape).astype(np.float32) for v in variables]
  for v, w in zip(variables, w0):
    v.assign(w)
  grads = [rng.normal(size=v.shape).astype(np.float32) for v in variables]
  optimizer = optim.LARS(0.1, weight_decay=0.1)
  with caplog.at_level(logging.WARNING):
    optimizer.apply_gradients(zip(grads, variables))
  assert "matches none" not in caplog.text
  assert_matches_reference(
      optimizer, variables, w0, [grads],
      decay=[not e for e in expect_excluded],
      adapt=[not e for e in expect_excluded],
      nesterov=False, weight_decay=0.1, lr=0.1, eeta=0.001)


@pytest.mark.parametrize("path,excluded", [
    ("resnet/head/conv2d/kernel", True),
    ("linear_head/kernel", True),
    ("model/probe_head/kernel", True),
    ("resnet/block1/unit01/a/group_norm/gamma", True),
    ("layer_normalization/beta", True),
    ("projection_head/kernel", False),
    ("projection_head/dense_1/kernel", False),
    ("my_head/kernel", False),
    ("resnet/root_block/standardized_conv2d/kernel", False),
    ("bias_free_dense/kernel", False),
])
def test_default_exclude_patterns(path, excluded):
  assert any(re.search(p, path) for p in optim.DEFAULT_EXCLUDE) == excluded


def test_unmatched_pattern_warns_and_base_exclusion_still_works(caplog):
  a = keras.Variable(np.ones(3, np.float32), name="a")
  b = keras.Variable(np.ones(3, np.float32), name="b")
  optimizer = optim.LARS(0.1, weight_decay=0.5, eeta=1.0,
                         exclude_from_weight_decay=("no_such_layer/",),
                         exclude_from_adaptation=None)
  # The base class' method keeps its meaning and adds to the exclusions.
  optimizer.exclude_from_weight_decay(var_list=[b])
  assert optimizer.weight_decay is None  # No decoupled decay on top.
  grad = tf.constant([1.0, 0.0, 0.0])
  with caplog.at_level(logging.WARNING):
    optimizer.apply_gradients([(grad, a), (grad, b)])
  assert "'no_such_layer/' matches none" in caplog.text
  # Weight decay (0.5 * w) is what moves the components whose gradient is 0.
  np.testing.assert_array_equal(b.numpy()[1:], 1.0)
  assert np.all(a.numpy()[1:] < 0.99)


def test_bad_arguments_raise():
  with pytest.raises(TypeError, match="tuple of regular expressions"):
    optim.LARS(0.1, exclude_from_weight_decay="bias")
  with pytest.raises(ValueError, match="not a valid regular expression"):
    optim.LARS(0.1, exclude_from_adaptation=("(",))
  with pytest.raises(ValueError, match="momentum"):
    optim.LARS(0.1, momentum=1.5)
  with pytest.raises(ValueError, match="weight_decay"):
    optim.LARS(0.1, weight_decay=-1.0)


def _train_step_fn(model, optimizer, global_batch):

  def step(x, y):
    with tf.GradientTape() as tape:
      # Sum over the local rows / global batch: summed over replicas by the
      # optimizer, this is the gradient of the global mean.
      loss = tf.reduce_sum((model(x) - y)**2) / global_batch
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))

  return step


def _run_one_step(strategy, w0, x, y):
  with strategy.scope():
    model = keras.Sequential([keras.Input((4,)),
                              keras.layers.Dense(3, name="hidden"),
                              keras.layers.Dense(2, name="head")])
    model.set_weights(w0)
    optimizer = optim.LARS(0.5, weight_decay=0.1, eeta=0.01, nesterov=True)
    optimizer.build(model.trainable_variables)
  n = strategy.num_replicas_in_sync
  step = _train_step_fn(model, optimizer, x.shape[0])

  @tf.function
  def run():
    local = strategy.experimental_distribute_values_from_function(
        lambda ctx: (tf.split(x, n)[ctx.replica_id_in_sync_group],
                     tf.split(y, n)[ctx.replica_id_in_sync_group]))
    strategy.run(step, args=local)

  run()
  return model.get_weights(), [v.numpy() for v in optimizer.momentums]


def test_two_replicas_equal_one_device(strategy_1, strategy_2):
  rng = np.random.default_rng(2)
  w0 = [rng.normal(size=s).astype(np.float32)
        for s in [(4, 3), (3,), (3, 2), (2,)]]
  x = tf.constant(rng.normal(size=(8, 4)), tf.float32)
  y = tf.constant(rng.normal(size=(8, 2)), tf.float32)
  weights_1, momenta_1 = _run_one_step(strategy_1, w0, x, y)
  weights_2, momenta_2 = _run_one_step(strategy_2, w0, x, y)
  for a, b, w in zip(weights_1, weights_2, w0):
    assert not np.allclose(a, w)
    np.testing.assert_allclose(b - w, a - w, rtol=1e-5, atol=1e-7)
  for a, b in zip(momenta_1, momenta_2):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("build_first", [True, False],
                         ids=["built", "deferred"])
def test_checkpoint_restores_momentum(tmp_path, build_first):
  rng = np.random.default_rng(3)

  def make(build=True):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    optimizer = optim.LARS(0.3, weight_decay=1e-2, eeta=0.1)
    if build:
      optimizer.build(model.trainable_variables)
    return model, optimizer

  grads = [[rng.normal(size=s).astype(np.float32) for s in [(4, 3), (3,)]]
           for _ in range(3)]
  model, optimizer = make()
  for g in grads[:2]:
    optimizer.apply_gradients(zip(g, model.trainable_variables))
  path = tf.train.Checkpoint(model=model, optimizer=optimizer).save(
      str(tmp_path / "ckpt"))

  model_2, optimizer_2 = make(build=build_first)
  status = tf.train.Checkpoint(model=model_2, optimizer=optimizer_2).restore(
      path)
  # Not built yet: the slots are restored when build() creates them.
  optimizer_2.build(model_2.trainable_variables)
  status.assert_consumed()
  assert optimizer_2.iterations.numpy() == 2
  for a, b in zip(optimizer.momentums, optimizer_2.momentums):
    assert np.abs(a.numpy()).min() > 0
    np.testing.assert_array_equal(b.numpy(), a.numpy())
  # The restored state carries on exactly as the original.
  optimizer.apply_gradients(zip(grads[2], model.trainable_variables))
  optimizer_2.apply_gradients(zip(grads[2], model_2.trainable_variables))
  for a, b in zip(model.get_weights(), model_2.get_weights()):
    np.testing.assert_array_equal(b, a)


def test_config_round_trip():
  schedule = optim.WarmupCosine(4.8, warmup_steps=10, total_steps=100)
  optimizer = optim.LARS(schedule, momentum=0.8, weight_decay=1e-4,
                         eeta=0.002, nesterov=True,
                         exclude_from_weight_decay=("bias$",),
                         exclude_from_adaptation=(), clipnorm=1.0)
  config = optimizer.get_config()
  assert config["weight_decay"] == 1e-4
  assert config["exclude_from_weight_decay"] == ["bias$"]
  assert config["exclude_from_adaptation"] == []
  # from_config replaces the schedule's config by the object in place.
  restored = optim.LARS.from_config(copy.deepcopy(config))
  assert restored.get_config() == config
  assert callable(restored.exclude_from_weight_decay)
  # Through Keras' own (de)serialisation, as model.save would.
  again = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
  assert isinstance(again, optim.LARS)
  assert again.get_config() == config
  assert optim.WarmupCosine.from_config(schedule.get_config()).get_config() \
      == schedule.get_config()


def test_warmup_cosine_values():
  peak, warmup, total = 4.8, 10, 110
  schedule = optim.WarmupCosine(peak, warmup, total)

  def expected(step):
    if step < warmup:
      return peak * step / warmup
    if step >= total:
      return 0.0
    t = (step - warmup) / (total - warmup)
    return 0.5 * peak * (1 + math.cos(math.pi * t))

  steps = [0, 5, warmup, 35, 60, 85, total - 1, total, total + 50]
  # A tensor step inside a tf.function, as the optimizer calls it.
  values = tf.function(lambda s: tf.map_fn(schedule, s, tf.float32))(
      tf.constant(steps, tf.int64)).numpy()
  np.testing.assert_allclose(values, [expected(s) for s in steps], rtol=1e-6,
                             atol=1e-7)
  assert values[0] == 0.0
  assert values[2] == pytest.approx(peak)
  assert values[4] == pytest.approx(peak / 2)  # Half-way through the cosine.
  assert values[7] == 0.0 and values[8] == 0.0
  assert float(optim.WarmupCosine(1.0, 0, 10)(0)) == pytest.approx(1.0)
  warmup_only = optim.WarmupCosine(1.0, 10, 10)
  assert float(warmup_only(5)) == pytest.approx(0.5)
  assert float(warmup_only(10)) == 0.0


@pytest.mark.parametrize("args", [(1.0, 20, 10), (1.0, -1, 10), (1.0, 0, -5),
                                  (-1.0, 1, 10), (1.0, 2.5, 10), (1.0, 0, 0)])
def test_warmup_cosine_rejects_bad_arguments(args):
  with pytest.raises(ValueError, match="WarmupCosine"):
    optim.WarmupCosine(*args)


def test_scale_learning_rate():
  assert optim.scale_learning_rate(0.075, 4096, "sqrt") == pytest.approx(4.8)
  assert optim.scale_learning_rate(0.3, 4096, "linear") == pytest.approx(4.8)
  assert optim.scale_learning_rate(0.3, 256) == pytest.approx(0.3)
  with pytest.raises(ValueError, match="'square'"):
    optim.scale_learning_rate(0.3, 256, "square")
  with pytest.raises(ValueError, match="global_batch_size"):
    optim.scale_learning_rate(0.3, 0)


def test_lr_multipliers_scale_the_matched_variables_steps():
  """Barlow Twins' biases-and-BN rate: a matched variable's update is the
  factor times the one it would take; others are untouched by it."""
  def steps(multipliers):
    a = keras.Variable(np.full(3, 2.0, np.float32), name="a")
    b = keras.Variable(np.full(3, 2.0, np.float32), name="b")
    opt = optim.LARS(0.5, momentum=0.9, exclude_from_adaptation=(r"^b$",),
                     exclude_from_weight_decay=None, lr_multipliers=multipliers)
    grads = [np.array([1.0, -2.0, 0.5], np.float32)] * 2
    for _ in range(2):
      opt.apply_gradients(zip(grads, [a, b]))
    return np.array(a) - 2.0, np.array(b) - 2.0
  base_a, base_b = steps(())
  a, b = steps(((r"^b$", 0.024),))
  np.testing.assert_allclose(a, base_a, rtol=1e-6)
  np.testing.assert_allclose(b, 0.024 * base_b, rtol=1e-5)
  assert not np.allclose(b, base_b)
