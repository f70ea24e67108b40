"""Per-replica tf.data pipelines for pretraining, evaluation and fine-tuning.

Batch formats (what the trainer relies on):
  pretrain: {"views": float32 [B, V, S, S, 3] in [0, 1], "label": int64 [B]};
            with an augment.MultiCropAugment "views" is a dict of its groups
            in order, {name: float32 [B, V_g, S_g, S_g, 3]}, e.g.
            {"global": [B, 2, 224, 224, 3], "local": [B, 6, 96, 96, 3]}
            (tf_ssl.data.jigsaw.JigsawAugment: tiles, or {"global", "tiles"}).
            With a source that has_index, also "index": int64 [B], each
            example's record index.
  eval:     {"image": float32 [B, S, S, 3] in [0, 1], "label": int64 [B],
             "mask": float32 [B] (1 real example, 0 padding)}
  finetune: {"image": float32 [B, S, S, 3], "label": int64 [B]}, or with
            MixUp "label": float32 one-hot soft labels [B, C].
B is the per-replica batch. The `build_*` functions take an InputContext
(or None) and need no strategy; the `*_dataset` functions wrap them in
strategy.distribute_datasets_from_function.

Corrupt or truncated images are skipped; each input pipeline prints once
per epoch to stderr how many it skipped (skips.py).

Every pipeline is graph-only (no Python callbacks), so it can run away from
the Python client (tf.data service, multi-host slices).

Randomness: training pipelines take `seed`, `start_step` and `deterministic`.
Every random draw (shuffle order, file order, per-example crops, per-batch
distortions and MixUp) comes from seeds derived from (seed, input pipeline
id, start_step): the pipelines of one run differ, a run resumed at step k
draws new data order and views instead of replaying those of step 0, and
the same (seed, start_step) gives the same batches when deterministic.
`deterministic` only decides whether tf.data keeps element order (slower).
"""

import numpy as np
import tensorflow as tf

from tf_ssl.data import augment as augment_lib
from tf_ssl.data import skips

# Decoded datasets up to this size are cached in memory by cache="auto".
AUTO_CACHE_BYTES = 2 << 30


def per_replica_batch_size(global_batch_size, num_replicas):
  """global // replicas, or a ValueError naming the batch size."""
  if global_batch_size % num_replicas:
    raise ValueError(
        f"global batch size {global_batch_size} is not divisible by the "
        f"{num_replicas} replicas; pick a multiple of {num_replicas}.")
  return global_batch_size // num_replicas


def _context_facts(input_context):
  if input_context is None:
    return 1, 0, 1
  return (input_context.num_input_pipelines, input_context.input_pipeline_id,
          input_context.num_replicas_in_sync)


class Seeds:
  """The seeds of one input pipeline, derived from (seed, pipeline id,
  start step) by NumPy's SeedSequence (well mixed: nearby inputs give
  unrelated seeds).

  Attributes:
    shuffle: int, the shuffle buffer's seed.
    files: int, the seed of the per-epoch file order. It leaves out the
      pipeline id: sources that shard by element need every pipeline to see
      the same order before sharding.
    example: int64 [2] key; example i uses fold_in(example, i).
    batch: int64 [2] key; batch i uses fold_in(batch, i).
  """

  def __init__(self, seed, pipeline_id=0, start_step=0):
    if seed is None:  # a fresh seed from the OS, not NumPy's global state
      seed = int(np.random.default_rng().integers(2**31 - 1))
    if int(start_step) < 0:
      raise ValueError(f"start_step={start_step} must be >= 0 (the optimizer "
                       "step the run resumes from).")
    seed = int(seed) % 2**64  # SeedSequence wants non-negative entropy
    words = np.random.SeedSequence(
        [seed, int(pipeline_id), int(start_step)]).generate_state(5, np.uint32)
    shared = np.random.SeedSequence(
        [seed, int(start_step), 1]).generate_state(1, np.uint32)
    self.shuffle = int(words[0])
    self.files = int(shared[0])
    self.example = tf.constant(words[1:3].astype(np.int64))
    self.batch = tf.constant(words[3:5].astype(np.int64))


def _is_deterministic(seed, deterministic):
  return seed is not None if deterministic is None else bool(deterministic)


def _maybe_cache(records, source, cache):
  """Decodes and caches small sources in memory (cache=True | False | "auto")."""
  if not _cached(source, cache):
    return records
  from tf_ssl.data import sources  # pylint: disable=g-import-not-at-top
  return records.map(sources.decode_record,
                     num_parallel_calls=tf.data.AUTOTUNE).cache()


def _check_labels(source):
  """Fails, naming the source, on a label outside [-1, num_classes)."""
  n = source.num_classes

  def check(x):
    if n is None:
      return x
    bad = (x["label"] < -1) | (x["label"] >= n)
    with tf.control_dependencies([tf.debugging.Assert(tf.reduce_all(~bad), [
        f"{source.name}: a label is outside [0, {n}) (-1 = unlabelled); "
        "label =", x["label"]])]):
      return dict(x, label=tf.identity(x["label"]))
  return check


def _cached(source, cache):
  """Whether _maybe_cache caches `source`."""
  if cache == "auto":
    size = source.image_size
    return bool(source.encoded and size is not None and
                source.num_examples * size[0] * size[1] * 3 <= AUTO_CACHE_BYTES)
  return bool(cache)


def _examples(source, input_context, seeds, example_fn, *, cache,
              shuffle_buffer, repeat, exact_shards=False):
  """Records -> shuffled, repeated, per-example mapped, bad files skipped.

  seeds: a Seeds for training (files read in a new order every epoch), or
  None for one pass in record order (eval).
  """
  _, pipeline_id, _ = _context_facts(input_context)
  cache = _cached(source, cache)
  if seeds is None or cache:  # a cache replays its first epoch's order
    records = source.records(input_context, exact_shards)
  else:
    records = source.shuffled_records(input_context, seeds.files)
  records = _maybe_cache(records, source, cache)
  if shuffle_buffer:
    records = records.shuffle(shuffle_buffer, seed=seeds.shuffle,
                              reshuffle_each_iteration=True)
  records = skips.with_epoch_marker(records)
  if repeat:
    records = records.repeat()

  key = seeds.example if seeds is not None else tf.zeros([2], tf.int64)

  def fn(i, r):
    out = example_fn(r, tf.random.experimental.stateless_fold_in(key, i))
    return dict(out, label=r["label"], **{k: r[k] for k in skips.MARK_KEYS})
  # Order-preserving (still parallel): the end-of-epoch marker must arrive
  # after every record of its epoch, or the skip count in count_skipped
  # reports files as lost that are still decoding.
  ds = records.enumerate().map(fn, num_parallel_calls=tf.data.AUTOTUNE,
                               deterministic=True)
  ds = skips.count_skipped(ds.ignore_errors(), source.name, pipeline_id)
  return ds.map(_check_labels(source))


def _finish(ds, deterministic, batch_fn=None, seeds=None):
  """Per-batch augmentation (batch i: fold_in(seeds.batch, i)), prefetch and
  options."""
  if batch_fn is not None:
    ds = ds.enumerate().map(
        lambda i, b: batch_fn(b, tf.random.experimental.stateless_fold_in(
            seeds.batch, i)),
        num_parallel_calls=tf.data.AUTOTUNE)
  options = tf.data.Options()
  options.deterministic = bool(deterministic)
  options.threading.max_intra_op_parallelism = 1
  return ds.prefetch(tf.data.AUTOTUNE).with_options(options)


def _index(record):
  """{"index": the record's index} when the record has one, else {}."""
  return {"index": record["index"]} if "index" in record else {}


def _fixed_size_records(source):
  """True when records are decoded pixels of one static shape (arrays)."""
  if source.encoded:  # spares building a reader just to look
    return False
  spec = source.records(None).element_spec
  return "image" in spec and spec["image"].shape.is_fully_defined()


def _pretrain_whole_batches(source, batch_size, augment, input_context, seeds,
                            shuffle_buffer, deterministic):
  """Pretraining batches for same-size decoded images (in-memory arrays).

  Nothing can fail to decode, so there is no skip counting, and the crops
  are made per batch (augment.crop_batch) right after batching: the
  per-example tf.data work is just shuffling, which is what makes 32 px
  data fast.
  """
  records = source.shuffled_records(input_context, seeds.files)
  if shuffle_buffer:
    records = records.shuffle(shuffle_buffer, seed=seeds.shuffle,
                              reshuffle_each_iteration=True)
  ds = records.repeat().batch(batch_size, drop_remainder=True)
  check = _check_labels(source)

  def fn(i, b):
    s = tf.random.experimental.stateless_split(
        tf.random.experimental.stateless_fold_in(seeds.batch, i), 2)
    views = augment.distort(augment.crop_batch(b["image"], s[0]), s[1])
    return check(dict(_index(b), views=views, label=b["label"]))
  ds = ds.enumerate().map(fn, num_parallel_calls=tf.data.AUTOTUNE)
  return _finish(ds, deterministic)


def build_pretrain(source, batch_size, augment, input_context=None, seed=None,
                   cache="auto", shuffle_buffer=10_000, *, start_step=0,
                   deterministic=None):
  """Pretraining batches {"views", "label"} for one input pipeline.

  Args:
    source: a Source.
    batch_size: per-replica batch size (drop_remainder: static shapes).
    augment: an augment.SimCLRAugment, or an augment.MultiCropAugment
      (which takes and gives a dict of view groups in every method called
      here, so the same code makes multi-crop batches).
    input_context: tf.distribute.InputContext or None.
    seed: int, the run's seed; None draws a fresh one (not reproducible).
    cache: decode and cache in memory: True, False or "auto" (small sources).
    shuffle_buffer: examples in the shuffle buffer (0: no shuffle).
    start_step: the optimizer step the run starts (or resumes) at; seeds
      depend on it, so a resumed run does not replay step 0's batches.
    deterministic: keep tf.data's element order (reproducible, slower);
      None means True when a seed is given.
  """
  _, pipeline_id, _ = _context_facts(input_context)
  seeds = Seeds(seed, pipeline_id, start_step)
  deterministic = _is_deterministic(seed, deterministic)
  if augment.batch_level and _fixed_size_records(source):
    return _pretrain_whole_batches(source, batch_size, augment, input_context,
                                   seeds, shuffle_buffer, deterministic)

  def example(r, s):
    if augment.batch_level:  # scaled to [0, 1] inside the batch distortion
      return dict(_index(r), views=augment._crops_255(r, s))  # pylint: disable=protected-access
    return dict(_index(r), views=augment(r, s))
  ds = _examples(source, input_context, seeds, example, cache=cache,
                 shuffle_buffer=shuffle_buffer, repeat=True)
  ds = ds.batch(batch_size, drop_remainder=True)
  batch_fn = None
  if augment.batch_level:
    batch_fn = lambda b, s: dict(b, views=augment._distort(  # pylint: disable=protected-access
        b["views"], s, 1. / 255.))
  return _finish(ds, deterministic, batch_fn, seeds)


def build_finetune(source, batch_size, bit_augment, input_context=None, seed=None,
                   mixup_alpha=0.0, cache="auto", shuffle_buffer=10_000, *,
                   start_step=0, deterministic=None):
  """BiT fine-tuning batches {"image", "label"}; MixUp when mixup_alpha > 0
  (then "label" is float32 one-hot [B, num_classes]). seed, start_step and
  deterministic as in build_pretrain."""
  if mixup_alpha and not source.num_classes:
    raise ValueError(f"MixUp needs labelled data; {source.name} has no classes.")
  _, pipeline_id, _ = _context_facts(input_context)
  seeds = Seeds(seed, pipeline_id, start_step)
  example = lambda r, s: {"image": bit_augment.train(r, s)}
  ds = _examples(source, input_context, seeds, example, cache=cache,
                 shuffle_buffer=shuffle_buffer, repeat=True)
  ds = ds.batch(batch_size, drop_remainder=True)
  batch_fn = None
  if mixup_alpha:
    batch_fn = lambda b, s: augment_lib.mixup(b, mixup_alpha, source.num_classes, s)
  return _finish(ds, _is_deterministic(seed, deterministic), batch_fn, seeds)


def eval_steps(source, batch_size, input_context=None):
  """Batches each replica gets from `build_eval` (equal on every replica)."""
  pipelines, _, replicas = _context_facts(input_context)
  per_pipeline = -(-source.num_examples // pipelines)
  replicas_per_pipeline = max(1, replicas // pipelines)
  return -(-per_pipeline // (batch_size * replicas_per_pipeline))


def _eval_whole_batches(source, batch_size, image_size, input_context):
  """build_eval for same-size decoded images (in-memory arrays): records are
  padded and batched first, then each batch gets eval_view_batch, so the
  per-example tf.data work is only the mask (a 60k split: ~1 s, not ~15)."""
  records = source.records(input_context, exact_shards=True).map(
      lambda r: {"image": r["image"], "label": r["label"],
                 "mask": tf.constant(1., tf.float32)})
  pad = tf.data.Dataset.from_tensors(tf.nest.map_structure(
      lambda s: tf.zeros(s.shape, s.dtype), records.element_spec)).repeat()
  pipelines, _, replicas = _context_facts(input_context)
  total = eval_steps(source, batch_size, input_context) * max(1, replicas // pipelines)
  ds = records.concatenate(pad).batch(batch_size, drop_remainder=True).take(total)
  ds = ds.map(lambda b: dict(b, image=augment_lib.eval_view_batch(b["image"], image_size)),
              num_parallel_calls=tf.data.AUTOTUNE)
  return _finish(ds.map(_check_labels(source)), True)


def build_eval(source, batch_size, image_size, input_context=None, view_fn=None,
               cache="auto"):
  """One pass of eval batches {"image", "label", "mask"}: every example once.

  Pipelines shard by element; the last batch is padded (mask 0) and every
  pipeline yields eval_steps(...) batches per replica, so replicas stay in
  step. view_fn(record) -> image defaults to augment.eval_view at image_size.
  """
  if view_fn is None and _fixed_size_records(source):
    return _eval_whole_batches(source, batch_size, image_size, input_context)
  view_fn = view_fn or (lambda r: augment_lib.eval_view(r, image_size))
  ds = _examples(source, input_context, None, lambda r, s: {"image": view_fn(r)},
                 cache=cache, shuffle_buffer=0, repeat=False, exact_shards=True)
  ds = ds.map(lambda x: dict(x, mask=tf.constant(1., tf.float32)))
  pad = tf.data.Dataset.from_tensors(
      tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), ds.element_spec)
  ).repeat()
  _, _, replicas = _context_facts(input_context)
  pipelines = _context_facts(input_context)[0]
  total = eval_steps(source, batch_size, input_context) * max(1, replicas // pipelines)
  ds = ds.concatenate(pad).batch(batch_size, drop_remainder=True).take(total)
  return _finish(ds, True)


def _distribute(strategy, global_batch_size, build):
  per_replica_batch_size(global_batch_size, strategy.num_replicas_in_sync)
  return strategy.distribute_datasets_from_function(
      lambda ctx: build(ctx.get_per_replica_batch_size(global_batch_size), ctx))


def pretrain_dataset(strategy, source, global_batch_size, augment, seed=None,
                     cache="auto", shuffle_buffer=10_000, *, start_step=0,
                     deterministic=None):
  """Distributed pretraining batches; see build_pretrain for the arguments."""
  return _distribute(strategy, global_batch_size, lambda b, ctx: build_pretrain(
      source, b, augment, ctx, seed, cache, shuffle_buffer,
      start_step=start_step, deterministic=deterministic))


def eval_dataset(strategy, source, global_batch_size, image_size, view_fn=None,
                 cache="auto"):
  """Distributed eval batches (one pass, padded and masked); see build_eval."""
  return _distribute(strategy, global_batch_size, lambda b, ctx: build_eval(
      source, b, image_size, ctx, view_fn, cache))


def finetune_dataset(strategy, source, global_batch_size, bit_augment, seed=None,
                     mixup_alpha=0.0, cache="auto", shuffle_buffer=10_000, *,
                     start_step=0, deterministic=None):
  """Distributed BiT fine-tuning batches; see build_finetune."""
  return _distribute(strategy, global_batch_size, lambda b, ctx: build_finetune(
      source, b, bit_augment, ctx, seed, mixup_alpha, cache, shuffle_buffer,
      start_step=start_step, deterministic=deterministic))
