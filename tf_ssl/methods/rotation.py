"""RotNet (Gidaris, Singh, Komodakis 2018): predict by how many quarter
turns an image was rotated (docs/recipes.md, "Rotation")."""

import dataclasses

import keras
import tensorflow as tf

from tf_ssl.data import augment
from tf_ssl.methods import base
from tf_ssl.models import heads

NUM_ROTATIONS = 4


def rotations(images):
  """images [B, S, S, C] -> (every image turned 0, 1, 2, 3 quarter turns
  counter-clockwise [4B, S, S, C], turn-major; the turns int32 [4B])."""
  turns = tf.repeat(tf.range(NUM_ROTATIONS), tf.shape(images)[0])
  return tf.concat([tf.image.rot90(images, k) for k in range(NUM_ROTATIONS)],
                   0), turns


class Rotation(base.Method):
  """Backbone -> Linear(features -> 4) -> cross-entropy of the rotation.

  Each image of the batch is in the step four times, rotated 0, 90, 180 and
  270 degrees counter-clockwise (tf.image.rot90), the paper's best setting
  (VISSL draws one rotation per image instead): the backbone sees 4B images,
  the loss is the mean cross-entropy over them, and nothing is random in
  the step, so 1 and N replicas agree trivially. The views are one crop per
  image (the --crop_min_area, colour and blur flags; docs/recipes.md says
  which to use). The online probe sees the unrotated rows. The head is the
  pretext task's, not the representation: evaluation and export take the
  backbone.
  """
  name = "rotation"
  loss_name = "rotation_loss"
  metric_names = ("rotation_acc",)
  num_views = 1
  own_views = True

  @dataclasses.dataclass(frozen=True)
  class Config:
    """No options: four rotations, cross-entropy."""

  def layers(self, backbone, make_backbone):
    del make_backbone
    head = heads.torch_linear(NUM_ROTATIONS, backbone.feature_dim,
                              name="rotation_head")
    head.build((None, backbone.feature_dim))
    return {"rotation_head": head}

  def endpoints(self, model, features, training):
    del model, features, training
    return {}

  def augment(self, data):
    return augment.SimCLRAugment(
        data.image_size, color_strength=data.color_strength,
        version=data.simclr_version, blur=data.blur,
        crop_area=(data.crop_min_area, 1.0), num_views=1)

  def forward(self, model, views, labels):
    del labels
    b = tf.shape(views)[0]
    rotated, turns = rotations(views[:, 0])
    features = model.backbone(rotated, training=True)["features"]
    logits = tf.cast(model.rotation_head(features), tf.float32)
    loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
        turns, logits, from_logits=True))
    hits = tf.equal(tf.argmax(logits, axis=1, output_type=tf.int32), turns)
    acc = tf.reduce_mean(tf.cast(hits, tf.float32))
    return base.StepOutput(loss, {"rotation_acc": acc}, features[:b])
