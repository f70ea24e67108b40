"""Jigsaw tiles (Noroozi & Favaro 2016) for --method=jigsaw and
--method=pirl (docs/recipes.md, "Jigsaw", "PIRL").

A random crop of the image is resized to `crop` pixels and split into a
3 x 3 grid of cells of `cell` = crop / 3 pixels; one `tile`-pixel tile is
cut from each cell at a random offset inside it (the gap between tiles
keeps the network from matching edges). `layout` gives the sizes for an
image size: 28 -> (27, 9, 7), 255 -> (255, 85, 64) as the reference.
Tiles are numbered by their cell, row-major (0 top left, 8 bottom right).

The pipeline makes the tiles in cell order (`JigsawAugment`, per example
or per batch, with the pipeline's seeds); the methods shuffle them inside
the train step (`permute`), with draws keyed by the step and the global
batch row (tf_ssl.methods.base.hashed_ints), so a batch gives the same
puzzles on any number of replicas.

`hamming_permutations` is the jigsaw task's fixed set of permutations,
generated here, the same on every machine.
"""

import functools

import numpy as np
import tensorflow as tf

from tf_ssl.data import augment as augment_lib

GRID = 3
NUM_TILES = GRID * GRID
# The reference's tile is 64 of an 85-pixel cell (VISSL, 255-pixel crops).
TILE_FRACTION = 64 / 85
# Area of the crop the tiles are cut from: PIRL's (VISSL's
# crop_scale_patches), for both methods.
CROP_AREA = (0.6, 1.0)
GLOBAL = "global"  # PIRL's image view, the multi-crop "global" group


def layout(image_size):
  """(crop, cell, tile) pixels for --image_size: the largest multiple of 3
  not above it, a third of that, and round(cell * 64 / 85) (at least 1)."""
  crop = GRID * (int(image_size) // GRID)
  cell = crop // GRID
  tile = max(1, round(cell * TILE_FRACTION))
  if cell < 1:
    raise ValueError(f"jigsaw tiles need an image of at least {GRID} pixels; "
                     f"got {image_size}.")
  return crop, cell, tile


def _all_permutations(n):
  """Every permutation of range(n), int8 [n!, n] (in insertion order)."""
  perms = np.zeros((1, 0), np.int8)
  for k in range(n):
    m = len(perms)
    out = np.empty((m * (k + 1), k + 1), np.int8)
    for i in range(k + 1):  # k inserted at position i of every shorter one
      rows = slice(i * m, (i + 1) * m)
      out[rows, :i], out[rows, i], out[rows, i + 1:] = perms[:, :i], k, perms[:, i:]
    perms = out
  return perms


@functools.lru_cache(maxsize=None)
def _hamming_permutations(count, seed):
  every = _all_permutations(NUM_TILES)
  # Candidates in a seeded order (NumPy's legacy RandomState: its stream is
  # frozen, so the set is the same with any NumPy), ties going to the first.
  every = every[np.random.RandomState(seed).permutation(len(every))]
  columns = np.ascontiguousarray(every.T)
  nearest = np.full(len(every), NUM_TILES + 1, np.int32)
  total = np.zeros(len(every), np.int32)
  chosen = []
  for _ in range(count):
    # The largest distance to the nearest chosen permutation, then the
    # largest total distance to all of them.
    j = int(np.argmax(nearest.astype(np.int64) * (count * NUM_TILES + 1) + total))
    chosen.append(every[j])
    distance = np.zeros(len(every), np.int32)
    for k in range(NUM_TILES):
      distance += columns[k] != every[j, k]
    np.minimum(nearest, distance, out=nearest)
    total += distance
    nearest[j] = -1  # never again
  out = np.stack(chosen).astype(np.int32)
  out.setflags(write=False)
  return out


def hamming_permutations(count, seed=0):
  """`count` permutations of the 9 tiles, far apart in Hamming distance:
  int32 [count, 9], read-only, the same for the same (count, seed).

  Greedy, as Noroozi & Favaro: the first is a seeded draw, and each next
  one is the permutation farthest from those chosen. Their Algorithm 1
  maximises the AVERAGE distance to the chosen ones; here the distance to
  the NEAREST chosen one comes first (the average breaks ties), which
  raises the set's minimum pairwise distance (tests/test_pretext.py). All
  9! = 362,880 permutations are candidates: a few ms per permutation
  chosen (100: 6, 1000: 5 at least between any two), cached per process.
  """
  count = int(count)
  if not 1 <= count <= 362880:
    raise ValueError(f"hamming_permutations: count={count} must be in [1, 9!].")
  return _hamming_permutations(count, int(seed))


def cut_tiles(crops, offsets, cell, tile):
  """The 9 tiles of each crop, in cell order.

  Args:
    crops: [N, crop, crop, C] (crop = 3 * cell).
    offsets: int [N, 9, 2], each tile's (y, x) offset inside its cell, in
      [0, cell - tile].
    cell, tile: Python ints.

  Returns:
    [N, 9, tile, tile, C]: tile k of crop n is crops[n, y0 + dy, x0 + dx]
    for dy, dx < tile, where (y0, x0) = (k // 3 * cell, k % 3 * cell) +
    offsets[n, k].
  """
  n = tf.shape(crops)[0]
  k = tf.range(NUM_TILES)
  corner = tf.stack([k // GRID, k % GRID], axis=1) * cell  # [9, 2]
  start = tf.cast(offsets, tf.int32) + corner[None]  # [N, 9, 2]
  steps = tf.range(tile)
  ys = start[..., 0:1] + steps  # [N, 9, tile]
  xs = start[..., 1:2] + steps
  rows = tf.gather(crops, tf.reshape(ys, [n, -1]), axis=1, batch_dims=1)
  rows = tf.reshape(rows, tf.concat([[n, NUM_TILES, tile], tf.shape(crops)[2:]], 0))
  return tf.gather(rows, xs, axis=3, batch_dims=2)


def sample_offsets(seed, n, cell, tile):
  """int32 [n, 9, 2]: uniform (y, x) offsets of each tile inside its cell."""
  return tf.random.stateless_uniform([n, NUM_TILES, 2], seed, 0, cell - tile + 1,
                                     dtype=tf.int32)


def permute(tiles, permutations):
  """Puzzles: position k of row n gets tile permutations[n, k].

  tiles: [N, 9, ...] in cell order; permutations: int [N, 9]. (VISSL's
  ShuffleImgPatches orders tiles the same way: out[k] = tiles[perm[k]].)
  """
  return tf.gather(tiles, permutations, axis=1, batch_dims=1)


class JigsawAugment:
  """The 9 tiles of a random crop, each distorted on its own; optionally
  also a view of the whole image (PIRL's image branch).

  It stands in for a SimCLRAugment in pipeline.build_pretrain (batch_level:
  crops per example or per batch, distortion per batch). A batch's "views"
  are the tiles, float32 [B, 9, tile, tile, 3] in cell order, or with
  `image` {"global": [B, 1, S, S, 3], "tiles": [B, 9, tile, tile, 3]}.

  Per image: a random-resized crop of area `crop_area` (PIRL's (0.6, 1)),
  resized (bilinear) to `crop` pixels; a tile at a uniform offset in each
  cell (`cut_tiles`); then each tile is flipped, colour-jittered and
  grey-scaled independently (a SimCLRAugment of the tile size with the
  given colour strength, without blur), as VISSL's PIRL augments every
  patch on its own.

  Args:
    image_size: the side the crop is fitted to (`layout`).
    color_strength, version: the tiles' colour jitter (0 still flips and
      greys: SimCLRAugment's).
    image: None, or a SimCLRAugment with num_views=1: the "global" view.
    crop_area: (min, max) area of the crop the tiles are cut from.
  """
  batch_level = True

  def __init__(self, image_size, color_strength=0.5, version=2, image=None,
               crop_area=CROP_AREA):
    self.crop, self.cell, self.tile = layout(image_size)
    if image is not None and image.num_views != 1:
      raise ValueError("JigsawAugment: the image view is one SimCLRAugment "
                       f"view; got num_views={image.num_views}.")
    self.image = image
    self.crop_area = tuple(crop_area)
    self.tiles = augment_lib.SimCLRAugment(
        self.tile, color_strength=color_strength, version=version, blur=False,
        num_views=NUM_TILES)
    self.image_size = image.image_size if image is not None else self.tile
    self.num_views = NUM_TILES + (1 if image is not None else 0)

  def _split(self, seed):
    return tf.random.experimental.stateless_split(seed, 3)

  def _views(self, image, tiles):
    if self.image is None:
      return tiles
    return {GLOBAL: image, "tiles": tiles}

  def crop_batch(self, images, seed):
    """uint8 [B, H, W, 3] -> the views of a batch, in [0, 1]."""
    images = tf.convert_to_tensor(images)
    shape = tf.shape(images)
    s = self._split(seed)
    boxes = augment_lib.sample_crops(s[0], shape[0], shape[1], shape[2],
                                     self.crop_area)
    crops = augment_lib.resize_boxes(images, boxes, tf.range(shape[0]), self.crop)
    tiles = cut_tiles(crops, sample_offsets(s[1], shape[0], self.cell, self.tile),
                      self.cell, self.tile)
    image = None if self.image is None else self.image.crop_batch(images, s[2])
    return self._views(image, tiles)

  def _crops_255(self, record, seed):
    """One example: {"image"|"encoded"} -> its views before distortion,
    values in [0, 255] (one decode, of the boxes' union for a JPEG)."""
    s = self._split(seed)

    def boxes(h, w):
      out = [augment_lib.sample_crops(s[0], 1, h, w, self.crop_area)]
      if self.image is not None:
        out.append(self.image._boxes(s[2], h, w))  # pylint: disable=protected-access
      return tf.concat(out, 0)
    window, bxs = augment_lib._window_and_boxes(record, boxes)  # pylint: disable=protected-access
    b = bxs[0]
    crop = tf.image.resize(window[b[0]:b[0] + b[2], b[1]:b[1] + b[3]],
                           [self.crop, self.crop], method="bilinear")
    tiles = cut_tiles(crop[None], sample_offsets(s[1], 1, self.cell, self.tile),
                      self.cell, self.tile)[0]
    image = None
    if self.image is not None:
      image = self.image._resize_crops(window, bxs[1:])  # pylint: disable=protected-access
    return self._views(image, tiles)

  def distort(self, views, seed):
    """Each tile (and the image view) distorted independently."""
    return self._distort(views, seed, 1.)

  def _distort(self, views, seed, scale):
    s = tf.random.experimental.stateless_split(seed, 2)
    if self.image is None:
      return self.tiles._distort(views, s[0], scale)  # pylint: disable=protected-access
    return {GLOBAL: self.image._distort(  # pylint: disable=protected-access
                views[GLOBAL], s[1], scale),
            "tiles": self.tiles._distort(views["tiles"], s[0], scale)}  # pylint: disable=protected-access

  def __call__(self, record, seed):
    """Both stages on one example (values in [0, 1])."""
    s = tf.random.experimental.stateless_split(seed, 2)
    return self._distort(self._crops_255(record, s[0]), s[1], 1. / 255.)
