"""Pictures of a run: training curves (from <workdir>/history.jsonl) as a PNG,
and the augmented views as a TensorBoard image grid."""

from collections.abc import Mapping
import json

# A Figure without pyplot renders with Agg and leaves the global backend
# alone, so importing tf_ssl in a notebook keeps its inline plots.
from matplotlib.figure import Figure
import numpy as np
import tensorflow as tf

CURVES = ("loss", "contrast_acc", "probe_acc", "learning_rate")


def training_curves(history_path, png_path, curves=CURVES):
  """Plots each of `curves` against the step; skips curves never logged."""
  if not tf.io.gfile.exists(history_path):
    return
  with tf.io.gfile.GFile(history_path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  curves = [c for c in curves if any(c in r for r in rows)]
  if not curves:
    return
  fig = Figure(figsize=(4 * len(curves), 3))
  axes = fig.subplots(1, len(curves), squeeze=False)
  for ax, name in zip(axes[0], curves):
    points = [(r["step"], r[name]) for r in rows if name in r]
    ax.plot(*zip(*points))
    ax.set_title(name)
    ax.set_xlabel("step")
  fig.tight_layout()
  save_png(fig, png_path)


def save_png(fig, path):
  """Writes a matplotlib figure to `path` (local or gs://) as a PNG, whole
  or not at all: a reader never sees a half-written file."""
  with tf.io.gfile.GFile(path + ".tmp", "wb") as f:
    fig.savefig(f, format="png", dpi=100)
  tf.io.gfile.rename(path + ".tmp", path, overwrite=True)


def _one_group(views, max_images):
  """Views [B, V, H, W, C], or multi-crop groups {name: [B, V_g, H_g, W_g,
  C]}, -> one float32 [b, V, H, W, C] (b <= max_images): the groups' views
  side by side in their order, the smaller ones centred on grey (0.5) at
  the largest group's size (so the local crops show at their true scale)."""
  if not isinstance(views, Mapping):
    return np.asarray(views, np.float32)[:max_images]
  groups = [np.asarray(v, np.float32)[:max_images] for v in views.values()]
  h = max(g.shape[2] for g in groups)
  w = max(g.shape[3] for g in groups)
  padded = []
  for g in groups:
    dh, dw = h - g.shape[2], w - g.shape[3]
    padded.append(np.pad(g, [(0, 0), (0, 0), (dh // 2, dh - dh // 2),
                             (dw // 2, dw - dw // 2), (0, 0)],
                            constant_values=0.5))
  return np.concatenate(padded, axis=1)


def view_grid(views, max_images=8):
  """[B, V, H, W, C] views in [0, 1] -> one [1, rows*H, V*W, C] grid image.

  Each row is one image, each column one of its views, so the pairing the
  contrastive loss sees is visible at a glance (TensorBoard "views").
  Multi-crop views ({group: [B, V_g, H_g, W_g, C]}, augment.MultiCropAugment)
  go side by side in group order, smaller views centred on grey at the
  largest size.
  """
  views = _one_group(views, max_images)
  b, v, h, w, c = views.shape
  grid = views.transpose(0, 2, 1, 3, 4).reshape(b * h, v * w, c)
  return np.clip(grid, 0.0, 1.0)[None]


def write_view_grid(writer, views, step, max_images=8):
  """Writes `view_grid(views)` to TensorBoard as the image "views" (views
  as view_grid takes them: an array or a dict of multi-crop groups)."""
  with writer.as_default(step=step):
    tf.summary.image("views", view_grid(views, max_images), step=step)
  writer.flush()
