"""LARS, the warmup-cosine schedule and learning-rate scaling of SimCLR/SupCon.

The maths is docs/recipes.md "LARS" (You et al. 2017, "Large Batch Training of
Convolutional Networks", as used by SimCLR). Which variables skip weight decay
and layer adaptation is decided by regular expressions on the Keras 3
`variable.path` ("conv/kernel", "resnet/head/conv2d/bias"). In Keras 3
`v.name` is only the last component ("kernel", "gamma"), so the reference's
substring matching on layer names would silently exclude nothing but biases.
"""

import math
import re

import keras
import tensorflow as tf
from absl import logging

# Regexes (re.search on variable.path) that LARS exempts from weight decay and
# from layer adaptation by default (docs/recipes.md: normalisation parameters,
# biases and the supervised / linear-probe head).
DEFAULT_EXCLUDE = (
    r"(^|/)(gamma|beta)$",  # BatchNorm, GroupNorm, LayerNorm scale and offset.
    r"(^|/)bias$",
    # Classification heads: BiT's "resnet/head/...", the online probe of the
    # contrastive model and the linear-evaluation head. The layer name must
    # match exactly, so SimCLR's "projection_head" is still decayed and adapted.
    r"(^|/)(head|probe_head|linear_head)/",
)


def _compile_patterns(patterns, arg_name):
  """Validates a sequence of regexes and returns it as a tuple of strings."""
  if patterns is None:
    return ()
  if isinstance(patterns, str):
    raise TypeError(
        f"LARS({arg_name}={patterns!r}): pass a tuple of regular expressions, "
        f"e.g. {arg_name}=({patterns!r},), not a bare string.")
  patterns = tuple(patterns)
  for pattern in patterns:
    try:
      re.compile(pattern)
    except (re.error, TypeError) as e:
      raise ValueError(
          f"LARS({arg_name}=...): {pattern!r} is not a valid regular "
          f"expression ({e}).") from e
  return patterns


def _matches(patterns, path):
  return any(re.search(p, path) for p in patterns)


@keras.saving.register_keras_serializable(package="tf_ssl")
class LARS(keras.optimizers.Optimizer):
  """Layer-wise Adaptive Rate Scaling with classic (or Nesterov) momentum.

  For each variable w with gradient g (docs/recipes.md "LARS"):

      g' = g + weight_decay * w          (unless excluded from weight decay)
      trust = eeta * |w| / |g'|          (1 if either norm is 0, or excluded
                                          from adaptation)
      v = momentum * v + lr * trust * g'
      w = w - v                          (nesterov: w - (momentum * v + lr *
                                          trust * g'))

  Weight decay is part of the gradient, as in SimCLR, not the decoupled decay
  of the Keras base class, whose `weight_decay` stays None. The base method
  `exclude_from_weight_decay(var_list=...)` still works before the first step
  and adds to the exclusions given here.

  Per-variable decisions are taken once, in `build()`. Under tf.distribute the
  gradients are summed over replicas before `update_step`, so the norms are
  those of the global gradient. In a custom training loop call
  `optimizer.build(model.trainable_variables)` inside `strategy.scope()` before
  the first `tf.function` step. tf.train.Checkpoint saves the momentum slots
  and restores them whether `build()` runs before or after the restore.

  Args:
    learning_rate: a float, or a LearningRateSchedule such as `WarmupCosine`.
    momentum: momentum coefficient in [0, 1).
    weight_decay: L2 coefficient added to the gradient (1e-6 SimCLR v1
      ImageNet, 1e-4 v2 and CIFAR).
    eeta: LARS trust coefficient.
    nesterov: use Nesterov momentum.
    exclude_from_weight_decay: regexes matched with re.search against each
      `variable.path`; a match skips weight decay. None excludes nothing.
    exclude_from_adaptation: the same for the trust ratio (trust = 1).
    lr_multipliers: ((regex, factor), ...): a variable whose path matches a
      regex (the first that does) takes factor * the learning rate (Barlow
      Twins' separate, smaller rate for biases and BN parameters).
    name: the optimizer's name.
    **kwargs: passed to `keras.optimizers.Optimizer` (clipnorm, use_ema, ...).

  Example:
    >>> lr = WarmupCosine(scale_learning_rate(0.3, 512), 100, 1000)
    >>> optimizer = LARS(lr, weight_decay=1e-6)
  """

  def __init__(self, learning_rate, momentum=0.9, weight_decay=0.0,
               eeta=0.001, nesterov=False,
               exclude_from_weight_decay=DEFAULT_EXCLUDE,
               exclude_from_adaptation=DEFAULT_EXCLUDE, lr_multipliers=(),
               name="lars", **kwargs):
    super().__init__(learning_rate=learning_rate, name=name, **kwargs)
    if not 0.0 <= momentum < 1.0:
      raise ValueError(f"LARS(momentum={momentum}): must be in [0, 1).")
    if weight_decay is None or weight_decay < 0:
      raise ValueError(
          f"LARS(weight_decay={weight_decay}): must be >= 0 (0 disables it).")
    if eeta <= 0:
      raise ValueError(f"LARS(eeta={eeta}): must be > 0 (0.001 in SimCLR).")
    self.momentum = float(momentum)
    self.lars_weight_decay = float(weight_decay)
    self.eeta = float(eeta)
    self.nesterov = bool(nesterov)
    # Not named after the arguments: `exclude_from_weight_decay` is a method of
    # the base class that must keep working.
    self.weight_decay_exclusions = _compile_patterns(
        exclude_from_weight_decay, "exclude_from_weight_decay")
    self.adaptation_exclusions = _compile_patterns(
        exclude_from_adaptation, "exclude_from_adaptation")
    self.lr_multipliers = tuple((p, float(f)) for p, f in lr_multipliers)
    _compile_patterns([p for p, _ in self.lr_multipliers], "lr_multipliers")

  def build(self, variables):
    if self.built:
      return
    super().build(variables)
    paths = []
    for variable in variables:
      if not hasattr(variable, "path"):
        raise TypeError(
            f"LARS matches its exclusions against keras.Variable.path, but "
            f"{variable!r} has none: create model weights with Keras layers "
            "or keras.Variable.")
      paths.append(variable.path)
    for pattern in dict.fromkeys(self.weight_decay_exclusions +
                                 self.adaptation_exclusions):
      if not any(re.search(pattern, p) for p in paths):
        logging.warning(
            "%s: exclusion pattern %r matches none of the %d variable "
            "paths; check the layer names if it should exclude something.",
            self.name, pattern, len(paths))
    # Python bools, so each variable's update is traced without branches.
    self._use_decay = tuple(
        self.lars_weight_decay > 0 and self._use_weight_decay(v) and
        not _matches(self.weight_decay_exclusions, p)
        for v, p in zip(variables, paths))
    self._use_adaptation = tuple(
        not _matches(self.adaptation_exclusions, p) for p in paths)
    self._lr_factor = tuple(
        next((f for pattern, f in self.lr_multipliers if re.search(pattern, p)), 1.0)
        for p in paths)
    logging.info("%s: %d variables, %d with weight decay, %d adapted.", self.name,
                 len(paths), sum(self._use_decay), sum(self._use_adaptation))
    self.momentums = [
        self.add_variable_from_reference(v, name="momentum") for v in variables
    ]

  def update_step(self, gradient, variable, learning_rate):
    index = self._get_variable_index(variable)
    dtype = variable.dtype
    gradient = tf.cast(tf.convert_to_tensor(gradient), dtype)
    if self._use_decay[index]:
      gradient += tf.constant(self.lars_weight_decay, dtype) * variable
    scaled_lr = tf.cast(learning_rate, dtype)
    if self._lr_factor[index] != 1.0:
      scaled_lr *= tf.constant(self._lr_factor[index], dtype)
    if self._use_adaptation[index]:
      w_norm = tf.norm(variable)
      g_norm = tf.norm(gradient)
      # Trust 1 when either norm is 0 (a fresh zero-init layer, an unused
      # variable); the inner where only keeps the unused branch finite.
      one = tf.ones_like(w_norm)
      ratio = (tf.constant(self.eeta, dtype) * w_norm /
               tf.where(g_norm > 0, g_norm, one))
      trust = tf.where((w_norm > 0) & (g_norm > 0), ratio, one)
      scaled_lr *= trust
    # tf.constant, not tf.cast, for Python floats here and above: a cast goes
    # through float32 and would perturb float64 variables.
    momentum = tf.constant(self.momentum, dtype)
    velocity = self.momentums[index]
    new_velocity = momentum * velocity + scaled_lr * gradient
    self.assign(velocity, new_velocity)
    if self.nesterov:
      self.assign_sub(variable, momentum * new_velocity + scaled_lr * gradient)
    else:
      self.assign_sub(variable, new_velocity)

  def get_config(self):
    config = super().get_config()
    config.update({
        "momentum": self.momentum,
        "weight_decay": self.lars_weight_decay,
        "eeta": self.eeta,
        "nesterov": self.nesterov,
        "exclude_from_weight_decay": list(self.weight_decay_exclusions),
        "exclude_from_adaptation": list(self.adaptation_exclusions),
        "lr_multipliers": [list(m) for m in self.lr_multipliers],
    })
    return config


def momentum_sgd(learning_rate, momentum=0.9, weight_decay=0.0, nesterov=False,
                 exclude_from_weight_decay=DEFAULT_EXCLUDE):
  """Momentum SGD with weight decay added to the gradient, before momentum.

      g' = g + weight_decay * w   (unless excluded)
      v = momentum * v + lr * g';  w = w - v

  This is PyTorch's SGD(weight_decay=...) (the SupCon reference) and the L2
  loss term of the SimCLR reference. Keras' SGD(weight_decay=...) decays
  decoupled instead (w -= lr * wd * w), which at momentum 0.9 is about 10x
  weaker in steady state. It is LARS with the trust ratio off for every
  variable, so it shares LARS' exclusions (norms, biases, heads) and tests.
  """
  return LARS(learning_rate, momentum=momentum, weight_decay=weight_decay,
              nesterov=nesterov, exclude_from_weight_decay=exclude_from_weight_decay,
              exclude_from_adaptation=("",), name="sgd")


def scale_learning_rate(base_lr, global_batch_size, scaling="linear"):
  """Scales a base learning rate with the global batch size (SimCLR).

  Args:
    base_lr: learning rate per the rule (0.3 linear for SimCLR v1, 0.075
      sqrt for v2).
    global_batch_size: examples per step summed over all replicas.
    scaling: "linear" (base_lr * B / 256) or "sqrt" (base_lr * sqrt(B)).

  Returns:
    The learning rate as a float.

  Raises:
    ValueError: for an unknown `scaling` or a non-positive batch size.
  """
  if global_batch_size <= 0:
    raise ValueError(
        f"global_batch_size={global_batch_size}: must be positive.")
  if scaling == "linear":
    return float(base_lr * global_batch_size / 256.0)
  if scaling == "sqrt":
    return float(base_lr * math.sqrt(global_batch_size))
  raise ValueError(
      f"learning-rate scaling={scaling!r} is not one of 'linear', 'sqrt'.")


def _check_steps(value, name):
  if isinstance(value, bool) or int(value) != value or value < 0:
    raise ValueError(f"WarmupCosine({name}={value}): must be an integer >= 0.")
  return int(value)


@keras.saving.register_keras_serializable(package="tf_ssl")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
  """Linear warmup from 0 to `peak_lr`, then cosine decay to 0 (SimCLR).

  lr(step) = peak_lr * step / warmup_steps            for step < warmup_steps,
             peak_lr * (1 + cos(pi * t)) / 2           up to total_steps, with
                 t = (step - warmup_steps) / (total_steps - warmup_steps),
             0                                         from total_steps on.

  With warmup_steps == total_steps it is a pure warmup that drops to 0 at
  total_steps.

  Args:
    peak_lr: the learning rate at the end of warmup (already scaled with the
      batch size, see `scale_learning_rate`).
    warmup_steps: steps of linear warmup (SimCLR: 10 epochs; 5% is common).
    total_steps: training steps; the rate is 0 from here on.

  Example:
    >>> schedule = WarmupCosine(4.0, warmup_steps=50, total_steps=1000)
    >>> float(schedule(25)), float(schedule(50)), float(schedule(1000))
    (2.0, 4.0, 0.0)
  """

  def __init__(self, peak_lr, warmup_steps, total_steps):
    if peak_lr < 0:
      raise ValueError(f"WarmupCosine(peak_lr={peak_lr}): must be >= 0.")
    self.peak_lr = float(peak_lr)
    self.warmup_steps = _check_steps(warmup_steps, "warmup_steps")
    self.total_steps = _check_steps(total_steps, "total_steps")
    if self.total_steps == 0 or self.warmup_steps > self.total_steps:
      raise ValueError(
          f"WarmupCosine(warmup_steps={warmup_steps}, total_steps="
          f"{total_steps}): need 0 <= warmup_steps <= total_steps and "
          "total_steps > 0.")

  def __call__(self, step):
    step = tf.cast(step, tf.float32)
    warmup = self.peak_lr * step / max(self.warmup_steps, 1)
    progress = tf.clip_by_value(
        (step - self.warmup_steps) /
        max(self.total_steps - self.warmup_steps, 1), 0.0, 1.0)
    cosine = 0.5 * self.peak_lr * (1.0 + tf.cos(math.pi * progress))
    lr = tf.where(step < self.warmup_steps, warmup, cosine)
    return tf.where(step >= self.total_steps, tf.zeros_like(lr), lr)

  def get_config(self):
    return {
        "peak_lr": self.peak_lr,
        "warmup_steps": self.warmup_steps,
        "total_steps": self.total_steps,
    }
