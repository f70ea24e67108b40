"""Writes a PNG grid of SimCLR view pairs for any source.

    .venv/bin/python tools/show_augmentations.py --dataset=fashion_mnist \
        --image_size=32 --out=/tmp/views.png [--data_dir=...] [--n=8]

Each row is one image's views side by side (the trainer logs the same grid).
"""

import argparse

import numpy as np
import tensorflow as tf

from tf_ssl.data import augment, make_source, pipeline


def view_grid(views):
  """float32 [N, V, S, S, 3] -> uint8 [N*S, V*S, 3] grid (rows = images)."""
  n, v, s = views.shape[0], views.shape[1], views.shape[2]
  grid = np.transpose(np.asarray(views), [0, 2, 1, 3, 4]).reshape(n * s, v * s, 3)
  return (np.clip(grid, 0, 1) * 255).round().astype(np.uint8)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--dataset", default="fashion_mnist")
  p.add_argument("--split", default="train")
  p.add_argument("--data_dir", default=None)
  p.add_argument("--image_size", type=int, default=32)
  p.add_argument("--color_strength", type=float, default=0.5)
  p.add_argument("--version", type=int, default=2)
  p.add_argument("--n", type=int, default=8)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="augmentations.png")
  a = p.parse_args()
  source = make_source(a.dataset, a.split, a.data_dir)
  aug = augment.SimCLRAugment(a.image_size, a.color_strength, a.version)
  batch = next(iter(pipeline.build_pretrain(source, a.n, aug, seed=a.seed,
                                            cache=False, shuffle_buffer=1000)))
  tf.io.write_file(a.out, tf.io.encode_png(view_grid(batch["views"].numpy())))
  print(f"wrote {a.out}: {a.n} images x {aug.num_views} views from {source.name}")


if __name__ == "__main__":
  main()
