"""Rotation, jigsaw and PIRL beyond the shared method tests: the rotation
and tile transforms against hand-made images, the permutation set's
Hamming distances, the step's hashed draws, the PIRL loss against a
float64 NumPy reference (values and input gradients, on 1 and 4 replicas),
each example's index from every kind of source to the batch, and the
flags."""

import numpy as np
import pytest
import tensorflow as tf

from conftest import mirrored
from numeric import fd_grad
from replicas import run_sharded
from test_data_sources import TinyImages
from tf_ssl import losses
from tf_ssl import methods
from tf_ssl import runner
from tf_ssl import train
from tf_ssl.data import files, jigsaw, pipeline, sources, subsets
from tf_ssl.data import augment
from tf_ssl.methods import base, rotation


# ---------------------------------------------------------------- rotation
def test_rotations_turn_a_marked_image_counter_clockwise():
  image = np.zeros((1, 5, 5, 1), np.float32)
  image[0, 0, 1] = 1.0  # top row, second column
  rotated, turns = rotation.rotations(tf.constant(image))
  assert turns.numpy().tolist() == [0, 1, 2, 3]
  marks = [tuple(np.argwhere(r[..., 0] == 1.0)[0]) for r in rotated.numpy()]
  # (y, x) -> (S-1-x, y) per quarter turn counter-clockwise.
  assert marks == [(0, 1), (3, 0), (4, 3), (1, 4)]


# ------------------------------------------------------------------ jigsaw
def test_layout_of_the_reference_and_of_fashion_mnist():
  assert jigsaw.layout(255) == (255, 85, 64)  # VISSL
  assert jigsaw.layout(28) == (27, 9, 7)
  assert jigsaw.layout(32) == (30, 10, 8)


def _cells_image():
  """27 x 27 uint8: channel 0 the row, 1 the column, 2 the 3 x 3 cell's
  number k (row-major) times 20."""
  y, x = np.mgrid[:27, :27]
  return np.stack([y, x, (y // 9 * 3 + x // 9) * 20], axis=-1).astype(np.uint8)


def _check_tiles(tiles, tile=7, cell=9):
  """Every tile k of `tiles` [9, tile, tile, 3] (values 0..255) is a
  contiguous tile x tile block of cell k."""
  for k, t in enumerate(tiles):
    np.testing.assert_array_equal(t[..., 2], 20 * k)
    y0, x0 = t[0, 0, 0], t[0, 0, 1]
    assert 0 <= y0 - k // 3 * cell <= cell - tile
    assert 0 <= x0 - k % 3 * cell <= cell - tile
    steps = np.arange(tile)
    np.testing.assert_array_equal(t[..., 0], np.broadcast_to(y0 + steps[:, None], t.shape[:2]))
    np.testing.assert_array_equal(t[..., 1], np.broadcast_to(x0 + steps[None], t.shape[:2]))


def test_tiles_of_a_hand_made_image_land_where_the_permutation_says():
  # The crop is the whole 27-pixel image (area 1), resized 27 -> 27: exact.
  views = jigsaw.JigsawAugment(27, crop_area=(1.0, 1.0))
  images = np.stack([_cells_image()] * 4)
  batch = np.rint(views.crop_batch(images, tf.constant([1, 2])).numpy() * 255)
  assert batch.shape == (4, 9, 7, 7, 3)
  for tiles in batch:
    _check_tiles(tiles)
  # The offsets are random: not all tiles sit at the same place in their cell.
  assert len({(t[0, 0, 0] % 9, t[0, 0, 1] % 9) for t in batch.reshape(-1, 7, 7, 3)}) > 1
  # One example through the per-example path (a PNG, decoded once).
  record = {"encoded": tf.io.encode_png(_cells_image()), "label": tf.constant(0, tf.int64)}
  _check_tiles(np.rint(views._crops_255(record, tf.constant([3, 4])).numpy()))  # pylint: disable=protected-access
  # The puzzle: position p holds the tile of cell permutation[p].
  perms = jigsaw.hamming_permutations(10)[:4]
  puzzles = jigsaw.permute(tf.constant(batch), tf.constant(perms)).numpy()
  np.testing.assert_array_equal(puzzles[..., 0, 0, 2], 20 * perms)


def test_permutation_set_is_fixed_and_far_apart():
  perms = jigsaw.hamming_permutations(100)
  assert perms.shape == (100, 9) and perms.dtype == np.int32
  assert (np.sort(perms, axis=1) == np.arange(9)).all()  # permutations of 9
  distance = (perms[:, None] != perms[None]).sum(-1)
  off = ~np.eye(100, dtype=bool)
  # The greedy farthest choice: at least 6 tiles differ between any two
  # (Noroozi & Favaro's average-distance choice reaches 2 at 1000).
  assert distance[off].min() == 6 and distance[off].mean() > 8.0
  rng = np.random.default_rng(0)
  drawn = np.stack([rng.permutation(9) for _ in range(100)])
  assert (drawn[:, None] != drawn[None]).sum(-1)[off].min() <= 4
  # The same set everywhere: a frozen seeded order (NumPy's RandomState).
  assert perms[:2].tolist() == [[6, 1, 4, 3, 5, 8, 2, 7, 0],
                                [0, 7, 2, 6, 4, 1, 8, 5, 3]]
  assert jigsaw.hamming_permutations(10).tolist() == perms[:10].tolist()


def test_hashed_draws_are_in_range_uniform_and_keyed():
  rows = tf.range(2000)
  draws = base.hashed_ints((0, 5, 1), rows, 50, 7).numpy()
  assert draws.shape == (2000, 50) and draws.min() == 0 and draws.max() == 6
  counts = np.bincount(draws.ravel(), minlength=7)
  np.testing.assert_allclose(counts / draws.size, 1 / 7, rtol=0.02)
  # A row's draws depend on the row, not on the rows beside it.
  np.testing.assert_array_equal(
      base.hashed_ints((0, 5, 1), rows[1000:1003], 50, 7).numpy(), draws[1000:1003])
  assert not np.array_equal(base.hashed_ints((0, 6, 1), rows, 50, 7).numpy(), draws)
  assert not np.array_equal(base.hashed_ints((1, 5, 1), rows, 50, 7).numpy(), draws)


# ------------------------------------------------------------------- PIRL
TAU = 0.07
SIZE = 50  # bank rows |D|


def _pirl_numpy(e, pos, neg, z, tau=TAU, size=SIZE):
  """float64 reference: (loss, the Z used)."""
  e = e / np.linalg.norm(e, axis=1, keepdims=True)
  scores = np.concatenate([np.sum(e * pos, 1, keepdims=True),
                           np.einsum("bd,bnd->bn", e, neg)], 1) / tau
  if z <= 0:
    z = np.mean(np.exp(scores)) * size
  x = np.exp(scores) / z
  k = neg.shape[1] / size
  c = k + np.finfo(np.float32).eps
  loss = -np.log(x[:, 0] / (x[:, 0] + c)) - np.sum(np.log(k / (x[:, 1:] + c)), 1)
  return np.mean(loss), z


def _pirl_inputs():
  rng = np.random.default_rng(0)
  unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)
  e = rng.normal(size=(8, 6))
  bank = unit(rng.normal(size=(SIZE, 6)))
  index = rng.integers(0, SIZE, 8)
  pos = unit(0.7 * bank[index] + 0.3 * unit(e))  # near the embeddings
  neg = bank[rng.integers(0, SIZE, (8, 5))]
  return e, pos, neg


def _zero(x):
  """0 * sum(x): run_sharded differentiates every input; the bank rows get
  no gradient (None), which this makes an explicit zero."""
  return 0.0 * tf.reduce_sum(x)


@pytest.mark.parametrize("z", [0.0, 700.0], ids=["estimated_z", "given_z"])
def test_pirl_loss_against_numpy_on_1_and_4_replicas(z):
  e, pos, neg = _pirl_inputs()
  want, want_z = _pirl_numpy(e, pos, neg, z)
  # The input gradient of the loss with Z held at the value used.
  want_grad = fd_grad(lambda x: _pirl_numpy(x, pos, neg, want_z)[0], e)
  inputs = [tf.constant(a, tf.float32) for a in (e, pos, neg)]
  pirl = lambda x, p, n: losses.pirl(x, p, n, SIZE, tf.constant(z, tf.float32), TAU)
  for replicas in (1, 4):
    strategy = mirrored(replicas)
    loss, (grad, grad_pos, grad_neg) = run_sharded(
        strategy, lambda x, p, n: pirl(x, p, n)[0] + _zero(p) + _zero(n), *inputs)
    np.testing.assert_allclose(loss.numpy(), want, rtol=1e-5)
    np.testing.assert_allclose(grad.numpy(), want_grad, rtol=1e-4, atol=1e-6)
    assert not grad_pos.numpy().any() and not grad_neg.numpy().any()
    # Every replica used the one global Z.
    shards = strategy.experimental_distribute_values_from_function(
        lambda ctx: [tf.split(a, replicas)[ctx.replica_id_in_sync_group]  # pylint: disable=cell-var-from-loop
                     for a in inputs])
    used = tf.function(lambda s: strategy.run(  # pylint: disable=cell-var-from-loop
        lambda x, p, n: pirl(x, p, n)[1]["normaliser"], args=s))(shards)
    for local in strategy.experimental_local_results(used):
      np.testing.assert_allclose(local.numpy(), want_z, rtol=1e-5)


def test_pirl_loss_checks_its_arguments():
  e, pos, neg = (tf.constant(a, tf.float32) for a in _pirl_inputs())
  with pytest.raises(ValueError, match="negatives"):
    losses.pirl(e, pos, neg[:, :, :3], SIZE, 1.0)
  with pytest.raises(ValueError, match="temperature"):
    losses.pirl(e, pos, neg, SIZE, 1.0, temperature=0.0)


# ----------------------------------------------------------- the index
def _index_and_label(ds):
  return [(int(r["index"]), int(r["label"])) for r in ds.as_numpy_iterator()]


def test_arrays_and_their_subsets_give_each_example_its_index():
  images = np.arange(10, dtype=np.uint8)[:, None, None] * np.ones((10, 4, 4), np.uint8)
  src = sources.from_arrays(images, np.arange(10), num_classes=10)
  assert src.has_index
  assert _index_and_label(src.dataset()) == [(i, i) for i in range(10)]
  ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=1)
  assert _index_and_label(src.dataset(ctx)) == [(i, i) for i in range(1, 10, 2)]
  # A subset counts from 0 in its own record order.
  assert _index_and_label(src.take([2, 5, 7]).dataset()) == [(0, 2), (1, 5), (2, 7)]
  sub = subsets.IndexedSubset(src, [8, 3])
  assert sub.has_index
  assert _index_and_label(sub.records()) == [(0, 3), (1, 8)]


def test_folders_give_each_file_its_index_in_any_order(image_folder):
  src = files.FolderSource(image_folder)
  assert src.has_index and src.num_examples == 32
  expected = {i: p for i, p in enumerate(src.paths)}
  in_order = list(src.records().as_numpy_iterator())
  assert [int(r["index"]) for r in in_order] == list(range(32))
  ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=1)
  shuffled = list(src.shuffled_records(ctx, seed=3).as_numpy_iterator())
  assert sorted(int(r["index"]) for r in shuffled) == list(range(1, 32, 2))
  for r in shuffled:  # the index names the file that was read
    assert r["encoded"] == tf.io.read_file(expected[int(r["index"])]).numpy()


def test_tfds_gives_each_example_its_split_position(tmp_path):
  TinyImages(data_dir=str(tmp_path)).download_and_prepare()
  src = sources.make_source("tfds:tiny_images", "train", data_dir=str(tmp_path))
  assert src.has_index
  in_order = list(src.records().as_numpy_iterator())
  assert [int(r["index"]) for r in in_order] == list(range(6))
  shuffled = list(src.shuffled_records(None, seed=1).as_numpy_iterator())
  assert sorted(int(r["index"]) for r in shuffled) == list(range(6))
  for r in shuffled:
    assert r["encoded"] == in_order[int(r["index"])]["encoded"]
  part = sources.make_source("tfds:tiny_images", "train[2:5]", data_dir=str(tmp_path))
  got = list(part.records().as_numpy_iterator())
  assert [int(r["index"]) for r in got] == [0, 1, 2]
  assert [r["encoded"] for r in got] == [r["encoded"] for r in in_order[2:5]]


def test_the_index_reaches_the_batch_and_a_source_without_one_is_an_error(
    image_folder, tmp_path):
  # In-memory arrays (whole-batch crops): the label is the example's number.
  images = np.random.default_rng(0).integers(0, 256, (12, 28, 28), np.uint8)
  src = sources.from_arrays(images, np.arange(12), num_classes=12)
  views = jigsaw.JigsawAugment(28, image=augment.SimCLRAugment(28, num_views=1))
  for batch in pipeline.build_pretrain(src, 4, views, seed=0).take(4):
    np.testing.assert_array_equal(batch["index"], batch["label"])
    assert batch["views"]["global"].shape == (4, 1, 28, 28, 3)
    assert batch["views"]["tiles"].shape == (4, 9, 7, 7, 3)
  # Files (per-example crops): the index is the file's position.
  folder = files.FolderSource(image_folder)
  tiles = jigsaw.JigsawAugment(16)
  seen = []
  for batch in pipeline.build_pretrain(folder, 8, tiles, seed=0).take(4):
    assert batch["views"].shape == (8, 9, 4, 4, 3)
    np.testing.assert_array_equal(batch["label"], folder.labels()[batch["index"]])
    seen += batch["index"].numpy().tolist()
  assert sorted(seen) == list(range(32))  # one epoch, each file once
  # TFRecords cannot give one: PIRL says so in one line, naming the flag.
  with tf.io.TFRecordWriter(str(tmp_path / "train-0.tfrecord")) as w:
    w.write(tf.train.Example().SerializeToString())
  records = sources.make_source(f"tfrecord:{tmp_path}/train-*")
  assert not records.has_index
  method = methods.create("pirl", num_examples=1)
  with pytest.raises(runner.UserError, match=r"^--method=pirl needs each example's "
                     r"index, and --dataset=tfrecord:x \(tfrecord:.*\) cannot") as e:
    train.check_batch_entries(method, records, "tfrecord:x")
  assert "\n" not in str(e.value)
  train.check_batch_entries(method, folder, "folder:x")  # fine
  train.check_batch_entries(methods.create("simclr"), records, "tfrecord:x")


# ------------------------------------------------------------------ flags
def test_flags_of_the_pretext_methods(tmp_path):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from tf_ssl import flags as tf_ssl_flags  # pylint: disable=g-import-not-at-top
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  base_args = ["tf_ssl", f"--workdir={tmp_path}", "--train_steps=10"]
  try:
    FLAGS.unparse_flags()
    FLAGS(base_args + ["--method=pirl", "--pirl_negatives=512"])
    config = tf_ssl_flags.pretrain_config()
    assert config.method_options == {"negatives": 512} and config.temperature == 0.07
    for args, match in [
        (["--method=jigsaw", "--jigsaw_permutations=1"],
         r"^--jigsaw_permutations=1: must be in \[2, 9! = 362880\]"),
        (["--method=pirl", "--pirl_negatives=0"], r"^--pirl_negatives=0: must be >= 1"),
        (["--method=pirl", "--pirl_momentum=1.0"], r"^--pirl_momentum=1.0: must be in"),
        (["--method=rotation", "--num_views=4"], r"^--method=rotation makes views of its "
         r"own \(docs/recipes.md\); drop --num_views=4\.$"),
        (["--method=jigsaw", "--local_crops=2"], "takes no local crops"),
        (["--method=simclr", "--num_views=1"], "needs >= 2 views"),
        (["--method=simclr", "--jigsaw_permutations=50"], "option of --method=jigsaw")]:
      FLAGS.unparse_flags()
      FLAGS(base_args + args)
      with pytest.raises(flags.ValidationError, match=match) as e:
        tf_ssl_flags.pretrain_config()
      assert "\n" not in str(e.value)
  finally:
    FLAGS.unparse_flags()
