"""PNG plots of a run's training curves (from <workdir>/history.jsonl)."""

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
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
  fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3), squeeze=False)
  for ax, name in zip(axes[0], curves):
    points = [(r["step"], r[name]) for r in rows if name in r]
    ax.plot(*zip(*points))
    ax.set_title(name)
    ax.set_xlabel("step")
  fig.tight_layout()
  with tf.io.gfile.GFile(png_path, "wb") as f:
    fig.savefig(f, format="png", dpi=100)
  plt.close(fig)
