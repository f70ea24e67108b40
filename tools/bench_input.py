"""Input throughput: tf_ssl's SimCLR pipeline against a reference-style one
and against Keras 3's own preprocessing layers, and tf_ssl's multi-crop
pipeline against its two-view one.

    .venv/bin/python tools/bench_input.py [--seconds 20] [--batch 64] [--rounds 2]
        [--files_only] [--breakdown]

The reference is written the way the original SimCLR code builds views: one
image per map call, full decode, sample_distorted_bounding_box crop, bicubic
resize, flip, the four jitter ops in a shuffled order through tf.cond (p=0.8),
grayscale (p=0.2) and, at 224 px, a per-image Gaussian blur (p=0.5). Both run
on the same in-memory data: 375x500 photo-like JPEGs at 224 px, and 32x32
uint8 arrays (no blur, strength 0.5). One image = two views.

The Keras row is the same recipe from keras.layers as Keras' own SimCLR
example builds it, on whole batches in a tf.data map: Resizing (224 px),
RandomFlip, RandomTranslation + RandomZoom (zoom in to 28% of the side: the
0.08 area of the random resized crop), RandomColorJitter, RandomGrayscale
(p=0.2) and, at 224 px, RandomGaussianBlur (p=0.5). Keras has no random
apply, so its jitter runs on every view (the recipe: p=0.8).

The multi-crop row is SwAV's views (augment.MultiCropAugment.swav: 2
global crops of area 0.14-1 and 6 local ones of 0.05-0.14, each view
distorted as SimCLR's) on the same data: 2x224 + 6x96 from the JPEGs
(blur on every view, p=0.5), 2x32 + 6x16 from the arrays (no blur). One
image = eight views; its images/s is compared with tf_ssl's two-view
pipeline.

The from-files rows read the same kind of JPEGs from disk, as users' real
pipelines do: a folder of .jpg files (FolderSource against the reference
reading each file with tf.io.read_file) and one TFRecord file of them
(TFRecordSource against the reference parsing each record), each with and
without blur (p=0.5), colour strength 1.0, at 224 px.

--breakdown prints instead where the CPU time of the 224 px from-files
path goes: CPU milliseconds per image (process time, which another
process's load inflates less than wall time) of reading and decoding
alone, tf_ssl's per-image stage alone (decode of the crops' union, box
sampling, resizes), all of tf_ssl and the reference, without blur.

Each pipeline is measured for --seconds in total, taking turns with the
others (fresh iterator each round), so load from other users of the machine
hits all alike. Beside each from-files pair runs a decode-only pipeline
(read, full JPEG decode, batch; no views): its images/s over the
reference's is the most any pipeline that decodes each image once could
reach, printed before the last line as
`decode_only_vs_reference_224_files=<c>` (the smaller of the two no-blur
cases). The last line is `speedup_224=<x> speedup_32=<y>
keras_layers_ratio_32=<z> keras_layers_ratio_224=<w>
multicrop_vs_two_view_32=<u> multicrop_vs_two_view_224=<v>
speedup_224_files=<f>`: tf_ssl's images/s over the reference's, then over
the Keras layers', then the multi-crop pipeline's images/s over the
two-view one's, then the smallest of the four from-files speedups.
"""

import argparse
import gc
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf

from tf_ssl.data import augment, files, from_arrays, pipeline, sources


def photo_like(rng, h=375, w=500):
  """Smooth colour fields plus sensor-like noise (compresses like a photo)."""
  small = rng.uniform(0, 255, (h // 25 + 1, w // 25 + 1, 3)).astype(np.float32)
  img = tf.image.resize(small[None], (h, w), "bicubic")[0].numpy()
  return np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)


class EncodedSource(sources.Source):
  """JPEG bytes held in memory (what a tfds or TFRecord reader yields)."""

  def __init__(self, jpegs):
    super().__init__("jpegs", len(jpegs), None, None, True)
    self.jpegs = jpegs

  def records(self, input_context=None, exact_shards=False):
    ds = tf.data.Dataset.from_tensor_slices(self.jpegs)
    return ds.map(lambda e: {"encoded": e, "label": tf.constant(-1, tf.int64)})


def _ref_blur(image, sigma, kernel_size):
  radius = kernel_size // 2
  t = tf.range(-radius, radius + 1, dtype=tf.float32)
  k = tf.exp(-tf.square(t) / (2. * tf.square(sigma)))
  k = tf.tile((k / tf.reduce_sum(k))[:, None, None, None], [1, 1, 3, 1])
  x = image[None]
  x = tf.nn.depthwise_conv2d(x, k, [1, 1, 1, 1], "SAME")
  x = tf.nn.depthwise_conv2d(x, tf.transpose(k, [1, 0, 2, 3]), [1, 1, 1, 1], "SAME")
  return x[0]


def reference_view(image, size, s, blur):
  """One view, as SimCLR's data_util builds it (one image at a time)."""
  box = tf.image.sample_distorted_bounding_box(
      tf.shape(image), tf.zeros([0, 0, 4]), min_object_covered=0.1,
      aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
      max_attempts=100, use_image_if_no_bounding_boxes=True)
  x = tf.slice(image, box[0], box[1])
  x = tf.image.resize(x, [size, size], "bicubic") / 255.
  x = tf.clip_by_value(x, 0., 1.)
  x = tf.image.random_flip_left_right(x)
  lo, hi = max(0., 1 - 0.8 * s), 1 + 0.8 * s
  ops = [lambda a: a * tf.random.uniform([], lo, hi),
         lambda a: tf.image.random_contrast(a, lo, hi),
         lambda a: tf.image.random_saturation(a, lo, hi),
         lambda a: tf.image.random_hue(a, 0.2 * s)]

  def jitter(a):
    perm = tf.random.shuffle(tf.range(4))
    for i in range(4):
      a = tf.switch_case(perm[i], [lambda op=op: op(a) for op in ops])
      a = tf.clip_by_value(a, 0., 1.)
    return a
  x = tf.cond(tf.random.uniform([]) < 0.8, lambda: jitter(x), lambda: x)
  x = tf.cond(tf.random.uniform([]) < 0.2,
              lambda: tf.tile(tf.image.rgb_to_grayscale(x), [1, 1, 3]), lambda: x)
  if blur:
    x = tf.cond(tf.random.uniform([]) < 0.5, lambda: _ref_blur(
        x, tf.random.uniform([], 0.1, 2.0), size // 10), lambda: x)
  return x


def reference_dataset(ds, batch, size, s, blur, decode):
  def fn(x):
    image = tf.io.decode_jpeg(x, channels=3) if decode else x
    return tf.stack([reference_view(image, size, s, blur) for _ in range(2)])
  ds = ds.shuffle(1000).repeat().map(fn, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def keras_dataset(ds, batch, size, s, blur, decode):
  """SimCLR views from Keras 3 preprocessing layers (see the module doc)."""
  import keras  # pylint: disable=g-import-not-at-top
  layers = [keras.layers.Resizing(size, size)] if decode else []
  layers += [
      keras.layers.RandomFlip("horizontal"),
      keras.layers.RandomTranslation(0.36, 0.36, fill_mode="reflect"),
      keras.layers.RandomZoom((-0.72, 0.), (-0.72, 0.), fill_mode="reflect"),
      keras.layers.RandomColorJitter(
          value_range=(0, 1), brightness_factor=0.8 * s, contrast_factor=0.8 * s,
          saturation_factor=(0.5 - 0.4 * s, 0.5 + 0.4 * s), hue_factor=0.2 * s),
      keras.layers.RandomGrayscale(0.2)]
  if blur:
    layers.append(keras.layers.RandomGaussianBlur(
        0.5, kernel_size=2 * (size // 20) + 1, sigma=(0.1, 2.0), value_range=(0, 1)))

  def view(x):
    for layer in layers:
      x = layer(x)
    return x

  def fn(b):
    x = tf.cast(b, tf.float32) / 255.
    return tf.stack([view(x) for _ in range(2)], axis=1)
  ds = ds.shuffle(1000).repeat()
  if decode:
    ds = ds.map(lambda e: tf.io.decode_jpeg(e, channels=3),
                num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(batch, drop_remainder=True)
  return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def write_files(jpegs, folder):
  """The JPEGs as a flat folder of .jpg files and as one TFRecord file (the
  ImageNet layout TFRecordSource reads); returns the TFRecord's path."""
  record_path = os.path.join(folder, "images.tfrecord")
  os.makedirs(os.path.join(folder, "jpg"))
  with tf.io.TFRecordWriter(record_path) as writer:
    for i, data in enumerate(jpegs):
      with open(os.path.join(folder, "jpg", f"{i:05d}.jpg"), "wb") as f:
        f.write(data)
      feature = {"image/encoded": tf.train.Feature(
          bytes_list=tf.train.BytesList(value=[data]))}
      writer.write(tf.train.Example(features=tf.train.Features(
          feature=feature)).SerializeToString())
  return record_path


def reference_bytes(source):
  """The encoded images of tf_ssl's file `source` as the reference reads
  them: one file per example (tf.io.read_file) or one record per example
  (parse_single_example)."""
  if isinstance(source, files.FolderSource):
    return tf.data.Dataset.from_tensor_slices(source.paths).map(
        tf.io.read_file, num_parallel_calls=tf.data.AUTOTUNE)
  feature = {"image/encoded": tf.io.FixedLenFeature([], tf.string)}
  return tf.data.TFRecordDataset(source.files).map(
      lambda r: tf.io.parse_single_example(r, feature)["image/encoded"],
      num_parallel_calls=tf.data.AUTOTUNE)


def _per_example(encoded, fn, batch):
  """Batches of fn(index, encoded image) over the shuffled, repeated bytes;
  the index counts examples, so per-example random draws differ."""
  ds = encoded.shuffle(1000).repeat().enumerate().map(
      fn, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def decode_only_dataset(encoded, batch):
  """Read and decode every image, nothing else: the ceiling of any pipeline
  that decodes each image once (the same 375x500 JPEGs, so they batch)."""
  return _per_example(encoded, lambda i, e: tf.io.decode_jpeg(e, channels=3),
                      batch)


def files_ceiling_line(ceiling):
  """The decode-only ratio line: the smaller of the two no-blur cases."""
  return ("decode_only_vs_reference_224_files="
          f"{min(ceiling[k, False] for k in ('folder', 'tfrecord')):.2f}")


def compare_files(jpegs, batch, seconds, rounds):
  """From-files speedups at 224 px: ({(kind, blur): ours / reference},
  {(kind, blur): decode-only / reference})."""
  out, ceiling = {}, {}
  with tempfile.TemporaryDirectory() as folder:
    record_path = write_files(jpegs, folder)
    ours_sources = {"folder": files.FolderSource(os.path.join(folder, "jpg")),
                    "tfrecord": files.TFRecordSource(record_path)}
    for kind, source in ours_sources.items():
      for blur in (False, True):
        ref = reference_dataset(reference_bytes(source), batch, 224, 1.0,
                                blur, True)
        ours = pipeline.build_pretrain(source, batch, augment.SimCLRAugment(
            224, 1.0, version=2, blur=blur), shuffle_buffer=1000, cache=False)
        decode = decode_only_dataset(reference_bytes(source), batch)
        r, o, d = compare([ref, ours, decode], batch, seconds, rounds)
        out[kind, blur], ceiling[kind, blur] = o / r, d / r
        print(f"224px ({kind} files, blur {'on' if blur else 'off'}): reference "
              f"{r:8.1f} img/s   tf_ssl {o:8.1f} img/s   ratio {o / r:.2f}   "
              f"decode only {d:8.1f} img/s   ratio {d / r:.2f}", flush=True)
  return out, ceiling


def breakdown(jpegs, batch, seconds):
  """CPU milliseconds per image (process time over images made, so another
  process's load inflates it less than wall time) of the 224 px stages from
  a folder of JPEGs, no blur: read and decode only; tf_ssl's per-image
  stage alone (crop_views: decode of the boxes' union, boxes, resizes);
  all of tf_ssl (plus the batched flip, jitter, grayscale); the reference.
  Pipelines take turns as in compare()."""
  aug = augment.SimCLRAugment(224, 1.0, version=2, blur=False)
  with tempfile.TemporaryDirectory() as folder:
    write_files(jpegs, folder)
    source = files.FolderSource(os.path.join(folder, "jpg"))

    crops = lambda i, e: aug.crop_views({"encoded": e}, tf.stack([i, 0]))
    stages = {
        "read + decode only": decode_only_dataset(reference_bytes(source), batch),
        "tf_ssl per-image stage": _per_example(reference_bytes(source), crops,
                                               batch),
        "tf_ssl": pipeline.build_pretrain(source, batch, aug,
                                          shuffle_buffer=1000, cache=False),
        "reference": reference_dataset(reference_bytes(source), batch, 224,
                                       1.0, False, True)}
    cpu = {name: [0., 0] for name in stages}
    for _ in range(2):
      for name, ds in stages.items():
        n, _, t = images_per_second(ds, batch, seconds / 2)
        cpu[name][0] += t
        cpu[name][1] += n
  for name, (t, n) in cpu.items():
    print(f"224px folder, blur off, {name:24s} {1e3 * t / n:6.2f} CPU ms/image",
          flush=True)


def images_per_second(ds, batch, seconds):
  """(images, seconds, CPU seconds) of one fresh iterator over `ds` for
  `seconds` (after warm-up)."""
  it = iter(ds)
  for _ in range(3):  # warm up: tracing, XLA compiles, buffers
    next(it)
  n, start, cpu = 0, time.perf_counter(), time.process_time()
  while time.perf_counter() - start < seconds:
    b = next(it)
    n += batch
  views = b["views"] if isinstance(b, dict) else b  # a dict when multi-crop
  float(sum(tf.reduce_sum(v) for v in tf.nest.flatten(views)))
  elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
  del it  # stop its background threads before the next measurement
  gc.collect()
  return n, elapsed, cpu


def compare(pipelines, batch, seconds, rounds):
  """Takes turns over `pipelines` (ABCABC...) in `rounds` rounds of
  seconds / rounds each, so a change in the load of the shared machine hits
  all alike; returns their overall images/s, in order."""
  totals = [[0, 0.] for _ in pipelines]
  for _ in range(rounds):
    for total, ds in zip(totals, pipelines):
      n, t, _ = images_per_second(ds, batch, seconds / rounds)
      total[0] += n
      total[1] += t
  return [n / t for n, t in totals]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seconds", type=float, default=20.)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--n_jpegs", type=int, default=64)
  parser.add_argument("--rounds", type=int, default=2,
                      help="alternations of reference and ours per size")
  parser.add_argument("--files_only", action="store_true",
                      help="only the from-files rows (224 px); the last line "
                      "then has speedup_224_files alone")
  parser.add_argument("--breakdown", action="store_true",
                      help="only the CPU time per image of the 224 px "
                      "stages from files (no ratio line)")
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  jpegs = [tf.io.encode_jpeg(photo_like(rng), quality=90).numpy()
           for _ in range(args.n_jpegs)]
  arrays = rng.integers(0, 256, (5000, 32, 32, 3), np.uint8)
  if args.breakdown:
    breakdown(jpegs, args.batch, args.seconds)
    return
  if args.files_only:
    from_files, ceiling = compare_files(jpegs, args.batch, args.seconds,
                                        args.rounds)
    print(files_ceiling_line(ceiling))
    print(f"speedup_224_files={min(from_files.values()):.2f}")
    return
  speedup, keras_ratio, multicrop = {}, {}, {}
  for size, s, data in ((224, 1.0, "jpeg"), (32, 0.5, "arrays")):
    blur = size >= 96
    if data == "jpeg":
      raw, source = tf.data.Dataset.from_tensor_slices(jpegs), EncodedSource(jpegs)
    else:
      raw, source = tf.data.Dataset.from_tensor_slices(arrays), from_arrays(arrays)
    ref = reference_dataset(raw, args.batch, size, s, blur, data == "jpeg")
    layers = keras_dataset(raw, args.batch, size, s, blur, data == "jpeg")
    ours = pipeline.build_pretrain(source, args.batch, augment.SimCLRAugment(
        size, s, version=2, blur=blur), shuffle_buffer=1000, cache=False)
    local = 96 if size == 224 else size // 2
    swav = augment.MultiCropAugment.swav(size, local, 6, color_strength=s,
                                         blur=blur)
    multi = pipeline.build_pretrain(source, args.batch, swav,
                                    shuffle_buffer=1000, cache=False)
    r, k, o, m = compare([ref, layers, ours, multi], args.batch, args.seconds,
                         args.rounds)
    speedup[size], keras_ratio[size], multicrop[size] = o / r, o / k, m / o
    print(f"{size}px ({data}): reference {r:8.1f} img/s   keras layers {k:8.1f} "
          f"img/s   tf_ssl {o:8.1f} img/s   ratio {o / r:.2f} (reference) "
          f"{o / k:.2f} (keras layers)", flush=True)
    print(f"{size}px ({data}): multi-crop 2x{size} + 6x{local} {m:8.1f} img/s   "
          f"two-view 2x{size} {o:8.1f} img/s   ratio {m / o:.2f}", flush=True)
  from_files, ceiling = compare_files(jpegs, args.batch, args.seconds,
                                      args.rounds)
  print(files_ceiling_line(ceiling))
  print(f"speedup_224={speedup[224]:.2f} speedup_32={speedup[32]:.2f} "
        f"keras_layers_ratio_32={keras_ratio[32]:.2f} "
        f"keras_layers_ratio_224={keras_ratio[224]:.2f} "
        f"multicrop_vs_two_view_32={multicrop[32]:.2f} "
        f"multicrop_vs_two_view_224={multicrop[224]:.2f} "
        f"speedup_224_files={min(from_files.values()):.2f}")


if __name__ == "__main__":
  main()
