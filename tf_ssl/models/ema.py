"""Target networks: copies of online layers moved by an exponential moving
average (BYOL's target, MoCo's key encoder, DINO's teacher).

Only trainable parameters are averaged, as every reference does; a target's
BatchNorm moving statistics come from its own forward passes in training
mode (docs/recipes.md, "Target networks"). Updates run locally on every
replica's copy (`tf_ssl.distribute.update_replicated`): the online weights
are the same everywhere, so the targets stay identical without
communication.
"""

import math

import tensorflow as tf

from tf_ssl import distribute


def cosine_momentum(step, total_steps, base):
  """m(k) = 1 - (1 - base) * (cos(pi * k / K) + 1) / 2: base at k = 0, 1 at
  k = K (BYOL, MoCo v3, DINO); float32 scalar tensor, clamped past K."""
  fraction = tf.minimum(tf.cast(step, tf.float32) / float(max(total_steps, 1)), 1.0)
  return 1.0 - (1.0 - base) * (tf.cos(math.pi * fraction) + 1.0) / 2.0


def paired_variables(online_layers, target_layers):
  """(online, target) lists of the online layers' trainable variables and
  their counterparts in the target layers.

  Variables pair by position in `layer.variables`: a target built like its
  online layer creates its variables in the same order, whatever Keras
  named its sub-layers.

  Raises:
    ValueError: when the target's variables differ in number or shapes.
  """
  online, target = [], []
  for o_layer, t_layer in zip(online_layers, target_layers):
    o_vars, t_vars = o_layer.variables, t_layer.variables
    shapes = lambda vs: [tuple(v.shape) for v in vs]
    if shapes(o_vars) != shapes(t_vars):
      raise ValueError(
          f"target {t_layer.name!r} is not built like {o_layer.name!r}: "
          f"{len(t_vars)} variables against {len(o_vars)}, or other shapes.")
    for o, t in zip(o_vars, t_vars):
      if o.trainable:
        online.append(o)
        target.append(t)
  return online, target


def freeze(layers):
  """Marks every variable of `layers` as not trained (the optimizer and
  `model.trainable_variables` leave them out). The layers themselves stay
  trainable, so their BatchNorm still uses batch statistics in training
  mode, as the targets of BYOL and MoCo do."""
  for layer in layers:
    for variable in layer.variables:
      variable.trainable = False


def update(online, target, momentum):
  """target <- momentum * target + (1 - momentum) * online, on every replica.

  momentum 0 copies the online weights (a target's first step).
  """
  def average(t, o, m):
    m = tf.cast(m, t.dtype)
    return t.assign(m * t + (1.0 - m) * tf.cast(o, t.dtype))

  distribute.update_replicated(average, target, list(online),
                               tf.cast(momentum, tf.float32))
