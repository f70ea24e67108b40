"""Jigsaw puzzles (Noroozi & Favaro 2016): the 9 tiles of a crop, shuffled
by one of a fixed set of permutations; predict which (docs/recipes.md,
"Jigsaw")."""

import dataclasses
import math

import keras
import tensorflow as tf

from tf_ssl.data import jigsaw as tiles_lib
from tf_ssl.methods import base
from tf_ssl.models import heads

# Keys of the step's draws (tf_ssl.methods.base.hashed_ints), one per use.
PERMUTATION_KEY = 1


class TileHead(keras.layers.Layer):
  """The 9 tiles' features [B, 9, F] -> [B, output_dim]: one Linear (+ BN +
  ReLU with `bn`) shared by every tile, the 9 results concatenated in
  puzzle-position order, then a Linear (VISSL's mlp, siamese_concat_view,
  mlp; PyTorch's Linear initialisation, BN momentum 0.1 in PyTorch's sense,
  epsilon 1e-5)."""

  def __init__(self, hidden_dim, output_dim, feature_dim, bn=True, sync_bn=False,
               **kwargs):
    super().__init__(**kwargs)
    self.hidden_dim, self.feature_dim = int(hidden_dim), int(feature_dim)
    width = tiles_lib.NUM_TILES * self.hidden_dim
    self.tile = heads.torch_linear(self.hidden_dim, self.feature_dim,
                                   name="tile_dense", dtype=self.dtype_policy)
    self.bn = None
    if bn:
      self.bn = keras.layers.BatchNormalization(
          momentum=heads.BN_MOMENTUM, epsilon=heads.BN_EPSILON,
          synchronized=sync_bn, name="tile_batch_norm", dtype=self.dtype_policy)
    self.out = heads.torch_linear(output_dim, width, name="dense",
                                  dtype=self.dtype_policy)
    self.build((None, tiles_lib.NUM_TILES, self.feature_dim))

  def build(self, input_shape):
    # Inside the layer's name scope: the variables are jigsaw_head/dense/...
    del input_shape
    self.tile.build((None, self.feature_dim))
    if self.bn is not None:
      self.bn.build((None, self.hidden_dim))
    self.out.build((None, tiles_lib.NUM_TILES * self.hidden_dim))

  def call(self, features, training=None):
    x = self.tile(tf.reshape(features, [-1, self.feature_dim]))
    if self.bn is not None:
      x = tf.nn.relu(self.bn(x, training=training))
    return self.out(tf.reshape(x, [-1, tiles_lib.NUM_TILES * self.hidden_dim]))


def tile_features(backbone, puzzles):
  """The backbone's features of every tile, training mode: ([9B, F]
  position-major, for the probe; [B, 9, F] per puzzle, for a TileHead)."""
  features = backbone(base.views_major(puzzles), training=True)["features"]
  per_puzzle = tf.reshape(features, [tiles_lib.NUM_TILES, -1, tf.shape(features)[-1]])
  return features, tf.transpose(per_puzzle, [1, 0, 2])


class Jigsaw(base.Method):
  """The 9 tiles, put in the order of one of `permutations` fixed
  permutations (tf_ssl.data.jigsaw.hamming_permutations), each through the
  backbone; a TileHead of the features (per tile Linear(F, H) + BN + ReLU,
  concatenated, Linear(9H, permutations)), cross-entropy of the
  permutation's index.

  The tiles come from the pipeline in cell order (JigsawAugment); the
  permutation of each image is drawn in the step from a hash of (seed,
  step, global row), the same on any number of replicas. H is --proj_hidden_dim
  (0: the backbone's feature width; VISSL's ResNet-50 uses 1000). The online
  probe sees every tile's features with its image's label. The head is the
  pretext task's, not the representation: evaluation and export take the
  backbone.
  """
  name = "jigsaw"
  loss_name = "jigsaw_loss"
  metric_names = ("jigsaw_acc",)
  num_views = tiles_lib.NUM_TILES
  own_views = True

  @dataclasses.dataclass(frozen=True)
  class Config:
    permutations: int = 100

    def __post_init__(self):
      base.check_option(2 <= self.permutations <= math.factorial(9),
                        "jigsaw_permutations", self.permutations,
                        "must be in [2, 9! = 362880] (1000 in the paper; 100, "
                        "2000 in VISSL).")

  def __init__(self, config=None, **kwargs):
    super().__init__(config, **kwargs)
    self.permutations = tiles_lib.hamming_permutations(self.config.permutations)

  def layers(self, backbone, make_backbone):
    del make_backbone
    hidden = getattr(self.head, "hidden_dim", None) or backbone.feature_dim
    return {"jigsaw_head": TileHead(
        hidden, self.config.permutations, backbone.feature_dim, bn=True,
        sync_bn=getattr(self.head, "sync_bn", False), name="jigsaw_head")}

  def endpoints(self, model, features, training):
    del model, features, training
    return {}

  def augment(self, data):
    return tiles_lib.JigsawAugment(data.image_size, data.color_strength,
                                   data.simclr_version)

  def forward(self, model, views, labels):
    del labels
    b = tf.shape(views)[0]
    step = model.optimizer.iterations
    index = base.hashed_ints((self.seed, step, PERMUTATION_KEY),
                             base.global_rows(b), 1, self.config.permutations)[:, 0]
    order = tf.gather(tf.constant(self.permutations), index)
    features, per_puzzle = tile_features(model.backbone,
                                         tiles_lib.permute(views, order))
    logits = tf.cast(model.jigsaw_head(per_puzzle, training=True), tf.float32)
    loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
        index, logits, from_logits=True))
    hits = tf.equal(tf.argmax(logits, axis=1), index)
    acc = tf.reduce_mean(tf.cast(hits, tf.float32))
    return base.StepOutput(loss, {"jigsaw_acc": acc}, features)
