"""A classifier on a (pretrained) backbone: linear evaluation and fine-tuning.

`Classifier` = backbone -> optionally the first k layers of a SimCLR
projection head (SimCLRv2 fine-tunes from the first one, the reference's
ft_proj_selector) -> a linear head named "head". Its `train_step` is the
whole update of every fine-tuning mode; what is trained is decided by which
layers are frozen, before compile:

  * freeze_encoder (linear evaluation): the backbone and projection layers
    are frozen, run in inference mode (BN moving statistics untouched) and
    their output is a stop_gradient, so only the head trains and the encoder
    stays bit-identical;
  * finetune_after_block=k (SimCLR's fine_tune_after_block): the stem and
    blocks 1..k are frozen (their BN in inference mode), the rest trains;
  * neither: the whole network trains (BiT-HyperRule, SimCLR fine-tuning).

The loss is divided by the replica count in one place (as in
ContrastiveModel), so Keras' summed gradient is the global-batch gradient.
"""

import re

import keras
import tensorflow as tf

from tf_ssl import distribute
from tf_ssl import optim
from tf_ssl.models.heads import LinearHead



def _stem(backbone):
  """The stem layer of a tf_ssl backbone (BN ResNet "stem", BiT "root")."""
  for name in ("stem", "root"):
    layer = getattr(backbone, name, None)
    if layer is not None:
      return layer
  raise ValueError(f"{backbone.name} has neither a 'stem' nor a 'root' layer; "
                   "freezing by block needs a tf_ssl backbone.")


class Classifier(keras.Model):
  """Backbone (+ projection layers) + linear head, with the fine-tuning step.

  `call(images, training=False)` returns the backbone's endpoints plus
  "pre_logits" (the head's input), "logits" and "probabilities" (float32).
  Batches for `fit` are {"image", "label"}: int labels, or float one-hot
  soft labels [B, C] after MixUp.

  Args:
    backbone: a built tf_ssl backbone (dict of endpoints with "features").
    num_classes: logits of the head.
    projection_head: optional built ProjectionHead; with proj_layers = k > 0
      the head reads its "proj_k" output and its later layers are frozen.
    proj_layers: how many projection layers sit between backbone and head.
    zero_init_head: zero kernel and bias (BiT); else N(0, 0.01) as SimCLR.
    freeze_encoder: linear evaluation (see the module docstring).
    finetune_after_block: -1 trains everything; k in 0..4 freezes the stem
      and blocks 1..k.
    weight_decay: L2 penalty wd * sum(w^2) / 2 added to the loss, on every
      variable but normalisation parameters, biases and the head
      (optim.DEFAULT_EXCLUDE); use 0 with LARS, which decays inside.
    **kwargs: forwarded to keras.Model (name defaults to "classifier").
  """

  def __init__(self, backbone, num_classes, projection_head=None, proj_layers=0,
               zero_init_head=True, freeze_encoder=False, finetune_after_block=-1,
               weight_decay=0.0, **kwargs):
    kwargs.setdefault("name", "classifier")
    super().__init__(**kwargs)
    if num_classes < 1:
      raise ValueError(f"Classifier: num_classes={num_classes}; need >= 1.")
    if proj_layers and projection_head is None:
      raise ValueError(f"Classifier: proj_layers={proj_layers} needs a "
                       "projection_head.")
    if projection_head is not None and not 0 < proj_layers <= projection_head.num_layers:
      raise ValueError(
          f"Classifier: proj_layers={proj_layers} must be in 1.."
          f"{projection_head.num_layers} (the projection head's layers).")
    if not -1 <= finetune_after_block <= len(backbone.blocks):
      raise ValueError(f"Classifier: finetune_after_block={finetune_after_block}; "
                       f"pass -1 or 0..{len(backbone.blocks)}.")
    self.backbone = backbone
    self.projection_head = projection_head
    self.proj_layers = proj_layers
    self.num_classes = num_classes
    self.freeze_encoder = freeze_encoder
    self.finetune_after_block = finetune_after_block
    self.weight_decay = float(weight_decay)
    init = "zeros" if zero_init_head else keras.initializers.RandomNormal(stddev=0.01)
    # Named "head": LARS and the L2 below exclude that path (optim.DEFAULT_EXCLUDE).
    self.head = LinearHead(num_classes, kernel_initializer=init, name="head")
    self._trackers = {n: keras.metrics.Mean(name=n)
                      for n in ("loss", "grad_norm_per_replica")}
    self._accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
    self.build((None, None, None, 3))
    self._freeze()

  def build(self, input_shape):
    width = self.backbone.feature_dim
    if self.projection_head is not None:
      if not self.projection_head.built:
        self.projection_head.build((None, width))
      layer = self.projection_head.dense_layers[self.proj_layers - 1]
      width = layer.units
    self.head.build((None, width))

  def _freeze(self):
    if self.projection_head is not None:
      # Layers after the k-th get no gradient; frozen, the optimizer skips them.
      for i in range(self.proj_layers, self.projection_head.num_layers):
        for layer in (self.projection_head.dense_layers[i],
                      self.projection_head.bn_layers[i]):
          if layer is not None:
            layer.trainable = False
    if self.freeze_encoder:
      self.backbone.trainable = False
      if self.projection_head is not None:
        self.projection_head.trainable = False
    elif self.finetune_after_block >= 0:
      _stem(self.backbone).trainable = False
      for block in self.backbone.blocks[:self.finetune_after_block]:
        block.trainable = False

  def call(self, images, training=False):
    encoder_training = training and not self.freeze_encoder
    endpoints = dict(self.backbone(images, training=encoder_training))
    x = endpoints["features"]
    if self.projection_head is not None:
      x = self.projection_head(x, training=encoder_training)[f"proj_{self.proj_layers}"]
    if self.freeze_encoder:
      x = tf.stop_gradient(x)  # Linear evaluation: no backward pass below.
    endpoints["pre_logits"] = x
    logits = tf.cast(self.head(x), tf.float32)
    endpoints["logits"] = logits
    endpoints["probabilities"] = tf.nn.softmax(logits)
    return endpoints

  @property
  def metrics(self):
    return list(self._trackers.values()) + [self._accuracy]

  def decayed_variables(self):
    """Trainable variables the L2 penalty applies to."""
    return [v for v in self.trainable_variables
            if not any(re.search(p, v.path) for p in optim.DEFAULT_EXCLUDE)]

  def train_step(self, data):
    images, labels = data["image"], data["label"]
    soft = labels.dtype.is_floating  # MixUp: one-hot soft labels [B, C].
    with tf.GradientTape() as tape:
      logits = self(images, training=True)["logits"]
      if soft:
        ce = tf.nn.softmax_cross_entropy_with_logits(labels, logits)
        hard = tf.argmax(labels, axis=-1)
        weight = tf.ones_like(ce)
      else:
        # Unlabelled rows (-1) contribute nothing.
        weight = tf.cast(labels >= 0, tf.float32)
        hard = tf.maximum(labels, 0)
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(hard, logits) * weight
      loss = tf.reduce_mean(ce)
      if self.weight_decay:
        loss += self.weight_decay * tf.add_n(
            [tf.nn.l2_loss(tf.cast(v, tf.float32)) for v in self.decayed_variables()])
      # The one division by the replica count: the optimizer sums over replicas.
      scaled = loss / tf.cast(distribute.num_replicas(), tf.float32)
    variables = self.trainable_variables
    grads = tape.gradient(scaled, variables)
    self.optimizer.apply_gradients(zip(grads, variables))
    self._trackers["loss"].update_state(loss)
    self._trackers["grad_norm_per_replica"].update_state(tf.linalg.global_norm(grads))
    self._accuracy.update_state(hard, logits, sample_weight=weight)
    return {m.name: m.result() for m in self.metrics}


def build_classifier(backbone, num_classes, zero_init_head=True, projection_head=None,
                     proj_layers=0, freeze_encoder=False, finetune_after_block=-1,
                     weight_decay=0.0):
  """A built Classifier; see `Classifier` for the arguments.

  Example:
    >>> backbone = build_backbone("resnet18", small_image_stem=True)
    >>> model = build_classifier(backbone, 10, freeze_encoder=True)  # linear eval
    >>> model(images)["probabilities"].shape  # (B, 10)
  """
  return Classifier(backbone, num_classes, projection_head=projection_head,
                    proj_layers=proj_layers, zero_init_head=zero_init_head,
                    freeze_encoder=freeze_encoder,
                    finetune_after_block=finetune_after_block,
                    weight_decay=weight_decay)
