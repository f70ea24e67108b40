"""PIRL (Misra & van der Maaten 2020): an image and its jigsaw tiles embed
close to the image's row of a memory bank, far from other examples' rows
(docs/recipes.md, "PIRL")."""

import dataclasses

import tensorflow as tf

from tf_ssl import distribute
from tf_ssl import losses
from tf_ssl.data import augment
from tf_ssl.data import jigsaw as tiles_lib
from tf_ssl.methods import base
from tf_ssl.methods import jigsaw
from tf_ssl.models import heads
from tf_ssl.models.memory_bank import MemoryBank

# Keys of the step's draws (tf_ssl.methods.base.hashed_ints), one per use.
SHUFFLE_KEY, NEGATIVES_KEY = 1, 2


def random_permutations(key, rows):
  """int32 [len(rows), 9]: one uniformly random order of the 9 tiles per
  global row (any of the 9!, as VISSL's PIRL shuffles), the argsort of 9
  hashed draws of (key..., row)."""
  draws = base.hashed_ints(key, rows, tiles_lib.NUM_TILES, 2**31)
  return tf.argsort(draws, axis=1, stable=True)


class PIRL(base.Method):
  """Image branch f: backbone -> Linear(F, 128), l2-normalised. Jigsaw
  branch g: the 9 tiles of another crop, shuffled, each through the
  backbone -> Linear(F, 128), concatenated -> Linear(1152, 128),
  l2-normalised (VISSL's "linear head" PIRL; 128 is --proj_dim).

  Memory bank: one normalised 128-d row m_i per training example (a
  MemoryBank, the same on every replica). Loss, with `negatives` bank rows
  drawn uniformly for each example (shared by both terms):
    lambd * pirl(g, m_i, negatives) + (1 - lambd) * pirl(f, m_i, negatives)
  (tf_ssl.losses.pirl: NCE at `temperature`). After each update the rows of
  the global batch move to the image branch's embeddings:
  m_i <- normalise(momentum * m_i + (1 - momentum) * f_i). Z is estimated on
  the first batch from the jigsaw term (VISSL's first output) and kept in
  the bank's checkpointed `normaliser`.

  Draws in the step (the tile order and the negatives of each row) come
  from a hash of (seed, step, global row), so 1 and N replicas draw the
  same. The batch carries each example's "index" (its bank row). The
  backbone is the representation; the heads and the bank are not.
  """
  name = "pirl"
  loss_name = "pirl_loss"
  metric_names = ("image_nce", "jigsaw_nce", "normaliser")
  num_views = 1 + tiles_lib.NUM_TILES
  own_views = True
  batch_entries = ("index",)

  @dataclasses.dataclass(frozen=True)
  class Config:
    temperature: float = 0.07
    negatives: int = 4096  # 32000 in the paper (ImageNet's 1.28M rows).
    momentum: float = 0.5
    lambd: float = 0.5

    def __post_init__(self):
      check = base.check_option
      check(self.temperature > 0, "temperature", self.temperature, "must be positive.")
      check(self.negatives >= 1, "pirl_negatives", self.negatives, "must be >= 1.")
      check(0 <= self.momentum < 1, "pirl_momentum", self.momentum, "must be in [0, 1).")
      check(0 <= self.lambd <= 1, "pirl_lambd", self.lambd, "must be in [0, 1].")

  def __init__(self, config=None, **kwargs):
    super().__init__(config, **kwargs)
    if not self.num_examples:
      raise ValueError("--method=pirl keeps one memory-bank row per training "
                       "example: pass num_examples (the training set's size).")

  def layers(self, backbone, make_backbone):
    del make_backbone
    dim = getattr(self.head, "output_dim", 128)
    f = backbone.feature_dim
    image_head = heads.torch_linear(dim, f, name="image_head")
    image_head.build((None, f))
    return {"image_head": image_head,
            "jigsaw_head": jigsaw.TileHead(dim, dim, f, bn=False, name="jigsaw_head"),
            "memory_bank": MemoryBank(self.num_examples, dim)}

  def endpoints(self, model, features, training):
    del training
    return {"projection": model.image_head(features)}

  def augment(self, data):
    image = augment.SimCLRAugment(
        data.image_size, color_strength=data.color_strength,
        version=data.simclr_version, blur=data.blur,
        crop_area=(data.crop_min_area, 1.0), num_views=1)
    return tiles_lib.JigsawAugment(data.image_size, data.color_strength,
                                   data.simclr_version, image=image)

  def forward(self, model, views, labels, index):
    del labels
    cfg = self.config
    images, tiles = views[tiles_lib.GLOBAL][:, 0], views["tiles"]
    b = tf.shape(images)[0]
    rows = base.global_rows(b)
    step = model.optimizer.iterations
    order = random_permutations((self.seed, step, SHUFFLE_KEY), rows)
    features = model.backbone(images, training=True)["features"]
    _, per_puzzle = jigsaw.tile_features(model.backbone,
                                         tiles_lib.permute(tiles, order))
    f = model.image_head(features)
    g = model.jigsaw_head(per_puzzle)
    bank = model.memory_bank
    positive = bank.read(index)
    negatives = bank.read(base.hashed_ints((self.seed, step, NEGATIVES_KEY), rows,
                                           cfg.negatives, self.num_examples))
    jigsaw_loss, jigsaw_metrics = losses.pirl(
        g, positive, negatives, self.num_examples, bank.normaliser, cfg.temperature)
    z = jigsaw_metrics["normaliser"]
    image_loss, _ = losses.pirl(f, positive, negatives, self.num_examples, z,
                                cfg.temperature)
    loss = cfg.lambd * jigsaw_loss + (1.0 - cfg.lambd) * image_loss
    metrics = {"image_nce": tf.stop_gradient(image_loss),
               "jigsaw_nce": tf.stop_gradient(jigsaw_loss), "normaliser": z}
    rows_f = tf.stop_gradient(tf.math.l2_normalize(tf.cast(f, tf.float32), axis=1))
    return base.StepOutput(loss, metrics, features,
                           {"rows": rows_f, "index": index, "normaliser": z})

  def after_update(self, model, state, step):
    del step
    model.memory_bank.update(distribute.cross_replica_concat(state["rows"]),
                             distribute.cross_replica_concat(state["index"]),
                             self.config.momentum)
    model.memory_bank.set_normaliser(state["normaliser"])
