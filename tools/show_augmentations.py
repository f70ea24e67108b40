"""Writes a PNG grid of SimCLR view pairs (or multi-crop views) for any source.

    .venv/bin/python tools/show_augmentations.py --dataset=fashion_mnist \
        --image_size=32 --out=/tmp/views.png [--data_dir=...] [--n=8] \
        [--multicrop=swav|dino --local_size=16 --num_local=6]

Each row is one image's views side by side (the trainer logs the same grid,
tf_ssl.plots.view_grid); multi-crop local views are centred on grey at the
global size.
"""

import argparse

import numpy as np
import tensorflow as tf

from tf_ssl import plots
from tf_ssl.data import augment, make_source, pipeline


def view_grid(views):
  """float32 [N, V, S, S, 3], or a dict of multi-crop groups {name: [N, V_g,
  S_g, S_g, 3]}, -> uint8 [N*S, V*S, 3] grid (rows = images)."""
  first = next(iter(views.values())) if isinstance(views, dict) else views
  grid = plots.view_grid(views, max_images=len(first))[0]
  return (np.clip(grid, 0, 1) * 255).round().astype(np.uint8)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--dataset", default="fashion_mnist")
  p.add_argument("--split", default="train")
  p.add_argument("--data_dir", default=None)
  p.add_argument("--image_size", type=int, default=32)
  p.add_argument("--color_strength", type=float, default=0.5)
  p.add_argument("--version", type=int, default=2)
  p.add_argument("--multicrop", choices=["none", "swav", "dino"], default="none",
                 help="SwAV's or DINO's multi-crop views (2 global at "
                      "--image_size + --num_local local at --local_size)")
  p.add_argument("--local_size", type=int, default=None,
                 help="local views' side; default image_size * 3 // 7 (96 at 224)")
  p.add_argument("--num_local", type=int, default=6)
  p.add_argument("--n", type=int, default=8)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="augmentations.png")
  a = p.parse_args()
  source = make_source(a.dataset, a.split, a.data_dir)
  if a.multicrop == "none":
    aug = augment.SimCLRAugment(a.image_size, a.color_strength, a.version)
  else:
    local = a.local_size or a.image_size * 3 // 7
    aug = getattr(augment.MultiCropAugment, a.multicrop)(
        a.image_size, local, a.num_local, color_strength=a.color_strength)
  batch = next(iter(pipeline.build_pretrain(source, a.n, aug, seed=a.seed,
                                            cache=False, shuffle_buffer=1000)))
  views = tf.nest.map_structure(lambda t: t.numpy(), batch["views"])
  tf.io.write_file(a.out, tf.io.encode_png(view_grid(views)))
  print(f"wrote {a.out}: {a.n} images x {aug.num_views} views from {source.name}")


if __name__ == "__main__":
  main()
