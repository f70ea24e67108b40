"""Per-replica tf.data pipelines for pretraining, evaluation and fine-tuning.

Batch formats (what the trainer relies on):
  pretrain: {"views": float32 [B, V, S, S, 3] in [0, 1], "label": int64 [B]}
  eval:     {"image": float32 [B, S, S, 3] in [0, 1], "label": int64 [B],
             "mask": float32 [B] (1 real example, 0 padding)}
  finetune: {"image": float32 [B, S, S, 3], "label": int64 [B]}, or with
            MixUp "label": float32 one-hot soft labels [B, C].
B is the per-replica batch. The `build_*` functions take an InputContext
(or None) and need no strategy; the `*_dataset` functions wrap them in
strategy.distribute_datasets_from_function.

Corrupt or truncated images are skipped; each input pipeline logs once per
epoch how many it skipped (and `SkipCounter` keeps the numbers).
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


def _base_seed(seed, pipeline_id):
  if seed is None:  # fast and non-deterministic: a fresh seed per build
    seed = int(np.random.randint(0, 2**31 - 1))
  return tf.constant([seed, pipeline_id], tf.int64)


def _maybe_cache(records, source, cache):
  """Decodes and caches small sources in memory (cache=True | False | "auto")."""
  if cache == "auto":
    size = source.image_size
    cache = (source.encoded and size is not None and
             source.num_examples * size[0] * size[1] * 3 <= AUTO_CACHE_BYTES)
  if not cache:
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


def _examples(source, input_context, seed, example_fn, *, cache, shuffle_buffer,
              repeat, exact_shards=False, counter=None):
  """Records -> shuffled, repeated, per-example mapped, bad files skipped."""
  _, pipeline_id, _ = _context_facts(input_context)
  base = _base_seed(seed, pipeline_id)
  records = _maybe_cache(source.records(input_context, exact_shards), source, cache)
  if shuffle_buffer:
    records = records.shuffle(shuffle_buffer, seed=seed,
                              reshuffle_each_iteration=True)
  counter = counter or skips.SkipCounter(source.name)
  records = skips.with_epoch_marker(records)
  if repeat:
    records = records.repeat()

  def fn(i, r):
    out = example_fn(r, tf.random.experimental.stateless_fold_in(base, i))
    return dict(out, label=r["label"], **{k: r[k] for k in skips.MARK_KEYS})
  # Order-preserving (still parallel): the end-of-epoch marker must arrive
  # after every record of its epoch, or the skip count in count_skipped
  # reports files as lost that are still decoding.
  ds = records.enumerate().map(fn, num_parallel_calls=tf.data.AUTOTUNE,
                               deterministic=True)
  ds = skips.count_skipped(ds.ignore_errors(), counter, pipeline_id)
  return ds.map(_check_labels(source))


def _finish(ds, seed, batch_fn=None):
  if batch_fn is not None:
    base = tf.constant([0 if seed is None else seed, 7919], tf.int64)
    ds = ds.enumerate().map(
        lambda i, b: batch_fn(b, tf.random.experimental.stateless_fold_in(base, i)),
        num_parallel_calls=tf.data.AUTOTUNE)
  options = tf.data.Options()
  options.deterministic = seed is not None
  options.threading.max_intra_op_parallelism = 1
  return ds.prefetch(tf.data.AUTOTUNE).with_options(options)


def _fixed_size_records(source):
  """True when records are decoded pixels of one static shape (arrays)."""
  spec = source.records(None).element_spec
  return (not source.encoded and "image" in spec and
          spec["image"].shape.is_fully_defined())


def _pretrain_whole_batches(source, batch_size, augment, input_context, seed,
                            shuffle_buffer):
  """Pretraining batches for same-size decoded images (in-memory arrays).

  Nothing can fail to decode, so there is no skip counting, and the crops
  are made per batch (augment.crop_batch) right after batching: the
  per-example tf.data work is just shuffling, which is what makes 32 px
  data fast.
  """
  _, pipeline_id, _ = _context_facts(input_context)
  base = _base_seed(seed, pipeline_id)
  records = source.records(input_context)
  if shuffle_buffer:
    records = records.shuffle(shuffle_buffer, seed=seed,
                              reshuffle_each_iteration=True)
  ds = records.repeat().batch(batch_size, drop_remainder=True)
  check = _check_labels(source)

  def fn(i, b):
    s = tf.random.experimental.stateless_split(
        tf.random.experimental.stateless_fold_in(base, i), 2)
    views = augment.distort(augment.crop_batch(b["image"], s[0]), s[1])
    return check({"views": views, "label": b["label"]})
  ds = ds.enumerate().map(fn, num_parallel_calls=tf.data.AUTOTUNE)
  return _finish(ds, seed)


def build_pretrain(source, batch_size, augment, input_context=None, seed=None,
                   cache="auto", shuffle_buffer=10_000, counter=None):
  """Pretraining batches {"views", "label"} for one input pipeline.

  Args:
    source: a Source.
    batch_size: per-replica batch size (drop_remainder: static shapes).
    augment: an augment.SimCLRAugment.
    input_context: tf.distribute.InputContext or None.
    seed: int for a deterministic pipeline; None for fast non-deterministic.
    cache: decode and cache in memory: True, False or "auto" (small sources).
    shuffle_buffer: examples in the shuffle buffer (0: no shuffle).
    counter: a skips.SkipCounter to record skipped files in (optional).
  """
  if augment.batch_level and _fixed_size_records(source):
    return _pretrain_whole_batches(source, batch_size, augment, input_context,
                                   seed, shuffle_buffer)

  def example(r, s):
    if augment.batch_level:  # scaled to [0, 1] inside the batch distortion
      return {"views": augment._crops_255(r, s)}  # pylint: disable=protected-access
    return {"views": augment(r, s)}
  ds = _examples(source, input_context, seed, example, cache=cache,
                 shuffle_buffer=shuffle_buffer, repeat=True, counter=counter)
  ds = ds.batch(batch_size, drop_remainder=True)
  batch_fn = None
  if augment.batch_level:
    batch_fn = lambda b, s: dict(b, views=augment._distort(  # pylint: disable=protected-access
        b["views"], s, 1. / 255.))
  return _finish(ds, seed, batch_fn)


def build_finetune(source, batch_size, bit_augment, input_context=None, seed=None,
                   mixup_alpha=0.0, cache="auto", shuffle_buffer=10_000,
                   counter=None):
  """BiT fine-tuning batches {"image", "label"}; MixUp when mixup_alpha > 0
  (then "label" is float32 one-hot [B, num_classes])."""
  if mixup_alpha and not source.num_classes:
    raise ValueError(f"MixUp needs labelled data; {source.name} has no classes.")
  example = lambda r, s: {"image": bit_augment.train(r, s)}
  ds = _examples(source, input_context, seed, example, cache=cache,
                 shuffle_buffer=shuffle_buffer, repeat=True, counter=counter)
  ds = ds.batch(batch_size, drop_remainder=True)
  batch_fn = None
  if mixup_alpha:
    batch_fn = lambda b, s: augment_lib.mixup(b, mixup_alpha, source.num_classes, s)
  return _finish(ds, seed, batch_fn)


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
  return _finish(ds.map(_check_labels(source)), 0)


def build_eval(source, batch_size, image_size, input_context=None, view_fn=None,
               cache="auto", counter=None):
  """One pass of eval batches {"image", "label", "mask"}: every example once.

  Pipelines shard by element; the last batch is padded (mask 0) and every
  pipeline yields eval_steps(...) batches per replica, so replicas stay in
  step. view_fn(record) -> image defaults to augment.eval_view at image_size.
  """
  if view_fn is None and _fixed_size_records(source):
    return _eval_whole_batches(source, batch_size, image_size, input_context)
  view_fn = view_fn or (lambda r: augment_lib.eval_view(r, image_size))
  ds = _examples(source, input_context, 0, lambda r, s: {"image": view_fn(r)},
                 cache=cache, shuffle_buffer=0, repeat=False, exact_shards=True,
                 counter=counter)
  ds = ds.map(lambda x: dict(x, mask=tf.constant(1., tf.float32)))
  pad = tf.data.Dataset.from_tensors(
      tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), ds.element_spec)
  ).repeat()
  _, _, replicas = _context_facts(input_context)
  pipelines = _context_facts(input_context)[0]
  total = eval_steps(source, batch_size, input_context) * max(1, replicas // pipelines)
  ds = ds.concatenate(pad).batch(batch_size, drop_remainder=True).take(total)
  return _finish(ds, 0)


def _distribute(strategy, global_batch_size, build):
  per_replica_batch_size(global_batch_size, strategy.num_replicas_in_sync)
  return strategy.distribute_datasets_from_function(
      lambda ctx: build(ctx.get_per_replica_batch_size(global_batch_size), ctx))


def pretrain_dataset(strategy, source, global_batch_size, augment, seed=None,
                     cache="auto", shuffle_buffer=10_000):
  """Distributed pretraining batches; see build_pretrain for the arguments."""
  return _distribute(strategy, global_batch_size, lambda b, ctx: build_pretrain(
      source, b, augment, ctx, seed, cache, shuffle_buffer))


def eval_dataset(strategy, source, global_batch_size, image_size, view_fn=None,
                 cache="auto"):
  """Distributed eval batches (one pass, padded and masked); see build_eval."""
  return _distribute(strategy, global_batch_size, lambda b, ctx: build_eval(
      source, b, image_size, ctx, view_fn, cache))


def finetune_dataset(strategy, source, global_batch_size, bit_augment, seed=None,
                     mixup_alpha=0.0, cache="auto", shuffle_buffer=10_000):
  """Distributed BiT fine-tuning batches; see build_finetune."""
  return _distribute(strategy, global_batch_size, lambda b, ctx: build_finetune(
      source, b, bit_augment, ctx, seed, mixup_alpha, cache, shuffle_buffer))
