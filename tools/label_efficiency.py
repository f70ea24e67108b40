r"""Label efficiency of one pretrained model: accuracy against labels per class.

    .venv/bin/python tools/label_efficiency.py \
        --init=runs/simclr_fashion_mnist --out=runs/label_efficiency

For each k in --labels_per_class (default 10,20,50,100,200,all) the same
seeded, class-balanced subset of the training split (tf_ssl.data.subsets,
--subset_seed) feeds four methods, all scored by top-1 on the test split:

  linear    logistic regression (tf_ssl.evaluate.linear_accuracy) on the
            frozen pretrained features. The features of the whole train and
            test split are extracted once; each k only refits the classifier.
  finetune  the whole pretrained network fine-tuned (tf_ssl.finetune,
            --mode=finetune: SimCLR's recipe of random-resized crop + flip,
            SGD with Nesterov momentum, cosine decay, no weight decay).
  scratch   the same backbone, recipe, steps and subset from a random
            initialisation: the supervised baseline.
  distill   SimCLRv2's third stage (tf_ssl.distill): the fine-tuned network
            above is the teacher of a student of the same architecture,
            started from the pretrained encoder and trained on the teacher's
            soft labels on EVERY training image (labels unused), with the
            fine-tuning recipe for --distill_epochs passes over the split
            (--distill_steps fixes the steps; --distill_epochs=0 drops the
            column).

Why --mode=finetune and not the BiT-HyperRule: the HyperRule upsamples
images under 96x96 to 160 px and crops 128, about 20x the pixels of a
28-32 px image, which a 2-core CPU cannot afford for twelve runs.
--mode=hyperrule is accepted; it keeps the native resolution (crop =
--image_size, resize = 160/128 of it) and rescales its schedule to the steps.

Steps per k: ceil(--epochs * examples / --batch_size), clipped to
[--min_steps, --max_steps] (--finetune_steps fixes them instead). The
defaults (20 epochs, 50..300 steps of batch 64) give 50, 63, 157, 300, 300,
300 steps for 10..all labels per class on a 10-class dataset: small subsets
see many epochs, large ones stop at the cap; "all" is then a third of an
epoch, so its fine-tuning numbers are a short-budget lower bound.

--backbone, --small_image_stem, --image_size, --dataset and --data_dir
default to the pretraining run's (flags.txt next to its checkpoints/ or
SavedModel); give them when --init has no flags.txt.

Writes <out>/label_efficiency.json (after every k, so an interrupted run
keeps what it measured) and <out>/label_efficiency.png (top-1 against labels
per class on a log axis; "all" is drawn at the mean full per-class count).

Smoke run: --quick (--labels_per_class=10,100 --finetune_steps=20
--distill_steps=20 --test_examples=1000 unless given).
"""

import argparse
import dataclasses
import json
import math
import os
import shlex
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags as absl_flags
from absl import logging
import keras
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np
import tensorflow as tf

from tf_ssl import distill
from tf_ssl import distribute
from tf_ssl import evaluate
from tf_ssl import finetune
from tf_ssl import plots
from tf_ssl import pretrained
from tf_ssl.data import pipeline
from tf_ssl.data import subsets
from tf_ssl.flags import DistillConfig
from tf_ssl.flags import FinetuneConfig
from tf_ssl.models import build_backbone

METHODS = ("linear", "finetune", "scratch", "distill")
DEFAULT_LABELS = "10,20,50,100,200,all"
# Pretraining flags that describe the model and data, read from flags.txt
# (tf_ssl.pretrained.pretraining_flags, shared with tools/layer_probe.py).
INHERITED = pretrained.INHERITED_FLAGS
pretraining_flags = pretrained.pretraining_flags


# ------------------------------------------------------------- configuration
def parse_label_counts(text):
  """"10,20,all" -> [10, 20, None] (None: every label), sorted, "all" last."""
  counts = []
  for item in text.split(","):
    item = item.strip().lower()
    if item == "all":
      counts.append(None)
    elif item.isdigit() and int(item) >= 1:
      counts.append(int(item))
    else:
      raise ValueError(f"--labels_per_class: {item!r} is neither a positive "
                       "integer nor 'all' (e.g. --labels_per_class=10,100,all).")
  numbers = sorted(set(c for c in counts if c is not None))
  return numbers + ([None] if None in counts else [])


def steps_for(examples, batch_size, epochs, min_steps, max_steps):
  """Fine-tuning steps for a subset: `epochs` passes, clipped to the range."""
  return int(min(max_steps, max(min_steps, math.ceil(epochs * examples / batch_size))))


# ------------------------------------------------------------------ linear
def subset_indices(labels, labels_per_class, seed):
  """Record indices of the label subset finetune.run_finetune trains on."""
  if labels_per_class is None:
    return np.flatnonzero(labels >= 0)
  return subsets.label_subset_indices(labels, per_class=labels_per_class,
                                      seed=seed)


def pretrained_features(config, train_source, test_source, batch_size=500):
  """Frozen features of both splits, in record order, from config.init.

  The backbone runs in config's precision (bfloat16 with mixed_precision:
  measured ~5x faster than float32 on the AVX512-BF16 CPU this was built on)
  and sees the eval view fine-tuning is tested with (augment.eval_view).

  Returns:
    ((train features, train labels), (test features, test labels), init info).
  """
  previous = keras.mixed_precision.global_policy()
  keras.mixed_precision.set_global_policy(
      "mixed_bfloat16" if config.mixed_precision else "float32")
  try:
    backbone = build_backbone(config.backbone, small_image_stem=config.small_image_stem)
    info = pretrained.load_init(backbone, config.init, backbone_name=config.backbone)
    if info["kind"] == "none":
      raise ValueError("--init: linear evaluation needs a pretrained model; "
                       "give a pretraining workdir, checkpoint or SavedModel.")
    train = evaluate.extract_features(
        backbone, pipeline.build_eval(train_source, batch_size, config.image_size))
    test = evaluate.extract_features(
        backbone, pipeline.build_eval(test_source, batch_size, config.image_size))
  finally:
    keras.mixed_precision.set_global_policy(previous)
  # Rows must be records in order, or the subset indices would pick others.
  if not np.array_equal(train[1], train_source.labels()):
    raise RuntimeError("feature rows are not in the train split's record order.")
  return train, test, info


# ---------------------------------------------------------------------- run
def run(base, label_counts, train_source, test_source, out, strategy=None,
        epochs=20.0, min_steps=50, max_steps=300, fixed_steps=None,
        linear_steps=1000, command=None, distill_epochs=1.0, distill_steps=None):
  """Linear, fine-tuned, from-scratch and distilled top-1 at each label count.

  Args:
    base: a FinetuneConfig with init, backbone, image size, batch, optimiser
      and precision; labels_per_class, train_steps and init are set per run.
    label_counts: labels per class, None meaning all (parse_label_counts).
    train_source, test_source: labelled Sources (finetune.load_sources).
    out: directory for label_efficiency.json and label_efficiency.png.
    strategy: a tf.distribute strategy; None: the default strategy.
    epochs, min_steps, max_steps: the steps rule (see steps_for).
    fixed_steps: if set, every fine-tuning run takes this many steps.
    linear_steps: full-batch steps of the logistic regression.
    command: the command line to record.
    distill_epochs: passes over the whole training split of each
      distillation run; 0 (with distill_steps None) skips distillation.
    distill_steps: if set, every distillation run takes this many steps.

  Returns:
    The report dict written to label_efficiency.json.
  """
  t_start = time.time()
  strategy = strategy or distribute.get_strategy("default")
  tf.io.gfile.makedirs(out)
  num_classes = finetune.num_classes_of(base, train_source, test_source)

  t = time.time()
  (train_x, train_y), (test_x, test_y), init_info = pretrained_features(
      base, train_source, test_source)
  feature_seconds = time.time() - t
  logging.info("Features of %d train and %d test images (%d-d) in %.1f s from %s",
               len(train_x), len(test_x), train_x.shape[1], feature_seconds,
               init_info["path"])

  report = {
      "command": command, "backbone": base.backbone, "init": base.init,
      "init_path": init_info["path"], "dataset": base.dataset,
      "image_size": base.image_size, "small_image_stem": base.small_image_stem,
      "num_classes": num_classes, "train_examples": int(len(train_x)),
      "test_examples": int(len(test_x)), "subset_seed": base.subset_seed,
      "finetune_recipe": _recipe(base, fixed_steps, epochs, min_steps, max_steps),
      "linear_recipe": {"classifier": "tf_ssl.evaluate.linear_accuracy",
                        "steps": linear_steps},
      "distill_steps": _distill_steps(train_source, base, distill_epochs, distill_steps),
      "feature_seconds": round(feature_seconds, 1),
      "results": [],
  }
  for k in label_counts:
    row = _one_label_count(base, k, train_source, test_source, strategy,
                           (train_x, train_y, test_x, test_y), num_classes,
                           fixed_steps or None, (epochs, min_steps, max_steps),
                           linear_steps, report["distill_steps"])
    report["results"].append(row)
    report["total_seconds"] = round(time.time() - t_start, 1)
    _write_json(report, os.path.join(out, "label_efficiency.json"))
    plot(report, os.path.join(out, "label_efficiency.png"))
  logging.info("Done in %.1f s; wrote %s", time.time() - t_start,
               os.path.join(out, "label_efficiency.json"))
  return report


def _distill_steps(train_source, base, epochs, steps):
  """Steps of each distillation run (0: none), whole executions."""
  if steps is None:
    steps = int(math.ceil(epochs * train_source.num_examples / base.global_batch_size))
  return -(-steps // base.steps_per_execution) * base.steps_per_execution


def distill_config(base, teacher_name, steps):
  """The distillation run's DistillConfig: the fine-tuning recipe, the
  student started from base.init, every training image, `steps` steps."""
  fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(FinetuneConfig)}
  fields.update(mode="finetune", teacher=teacher_name, labels_per_class=None,
                label_fraction=None, train_steps=steps, train_epochs=None)
  return DistillConfig(**fields)


def _recipe(base, fixed_steps, epochs, min_steps, max_steps):
  names = ("mode", "global_batch_size", "mixed_precision")
  if base.mode == "hyperrule":
    names += ("hyperrule_base_lr", "crop_size", "resize_size")
  else:
    names += ("optimizer", "nesterov", "momentum", "learning_rate", "lr_scaling",
              "weight_decay")
  recipe = {name: getattr(base, name) for name in names}
  recipe["steps_rule"] = ({"fixed_steps": fixed_steps} if fixed_steps else
                          {"epochs": epochs, "min_steps": min_steps,
                           "max_steps": max_steps})
  return recipe


def _one_label_count(base, k, train_source, test_source, strategy, features,
                     num_classes, fixed_steps, rule, linear_steps, distill_steps):
  train_x, train_y, test_x, test_y = features
  name = "all" if k is None else str(k)
  index = subset_indices(train_y, k, base.subset_seed)
  row = {"labels_per_class": name, "examples": int(len(index))}
  seconds = {}

  t = time.time()
  row["linear_top1"] = evaluate.linear_accuracy(
      train_x[index], train_y[index], test_x, test_y, num_classes, steps=linear_steps)
  seconds["linear"] = round(time.time() - t, 1)
  logging.info("k=%s linear: top-1 %.4f (%d examples, %.1f s)", name,
               row["linear_top1"], len(index), seconds["linear"])

  steps = fixed_steps or steps_for(len(index), base.global_batch_size, *rule)
  row["finetune_steps"] = steps
  config = dataclasses.replace(base, labels_per_class=k, train_steps=steps)
  teacher = None
  for method, init in (("finetune", base.init), ("scratch", None)):
    t = time.time()
    result, model = finetune.run_finetune(
        dataclasses.replace(config, init=init), strategy=strategy,
        train_source=train_source, eval_source=test_source, verbose=0,
        return_model=True)
    if method == "finetune":
      teacher = model
    seconds[method] = round(time.time() - t, 1)
    # The subset fine-tuning drew must be the one the linear classifier saw.
    if result["plan"]["train_examples"] != len(index):
      raise RuntimeError(f"k={name}: fine-tuning trained on "
                         f"{result['plan']['train_examples']} examples, the "
                         f"linear classifier on {len(index)}.")
    row[f"{method}_top1"] = result["top1"]
    row[f"{method}_top5"] = result["top5"]
    logging.info("k=%s %s: top-1 %.4f (%d examples, %d steps, %.1f s)", name,
                 method, result["top1"], len(index), steps, seconds[method])
  if distill_steps:
    t = time.time()
    result = distill.run_distill(
        distill_config(base, f"label_efficiency finetune k={name}", distill_steps),
        teacher=teacher, strategy=strategy, train_source=train_source,
        eval_source=test_source, verbose=0)
    seconds["distill"] = round(time.time() - t, 1)
    row["distill_top1"], row["distill_top5"] = result["top1"], result["top5"]
    row["distill_teacher_top1"] = result["teacher_top1"]
    logging.info("k=%s distill: top-1 %.4f (teacher %.4f; %d images, %d steps, "
                 "%.1f s)", name, result["top1"], result["teacher_top1"],
                 train_source.num_examples, distill_steps, seconds["distill"])
  row["seconds"] = round(sum(seconds.values()), 1)
  row["seconds_by_method"] = seconds
  return row


# ------------------------------------------------------------------- output
def _write_json(report, path):
  with tf.io.gfile.GFile(path + ".tmp", "w") as f:
    json.dump(report, f, indent=2)
  tf.io.gfile.rename(path + ".tmp", path, overwrite=True)


def plot(report, path):
  """Top-1 (%) of each method against labels per class, log x-axis."""
  rows = report["results"]
  full = report["train_examples"] / report["num_classes"]
  x = [full if r["labels_per_class"] == "all" else int(r["labels_per_class"])
       for r in rows]
  fig, ax = plt.subplots(figsize=(6, 4))
  labels = {"linear": "linear (frozen features)", "finetune": "fine-tuned",
            "scratch": "from scratch (supervised)",
            "distill": "distilled on all images (SimCLRv2)"}
  for method, style in zip(METHODS, ("o-", "s-", "^--", "D-")):
    if all(f"{method}_top1" in r for r in rows):
      ax.plot(x, [100 * r[f"{method}_top1"] for r in rows], style,
              label=labels[method])
  ax.set_xscale("log")
  ax.set_xticks(x)
  ax.set_xticklabels([f"all\n({full:.0f})" if r["labels_per_class"] == "all"
                      else r["labels_per_class"] for r in rows])
  ax.minorticks_off()
  ax.set_xlabel("labels per class")
  ax.set_ylabel("test top-1 (%)")
  ax.set_title(f"{report['dataset']}, {report['backbone']}: label efficiency",
               fontsize=10)
  ax.grid(True, alpha=0.3)
  ax.legend()
  fig.tight_layout()
  plots.save_png(fig, path)
  plt.close(fig)


def table(report):
  """The results as a Markdown table (top-1 %)."""
  distilled = all("distill_top1" in r for r in report["results"])
  lines = ["| labels/class | examples | linear | fine-tune | scratch | "
           + ("distilled | " if distilled else "") + "steps | seconds |",
           "|---|---|---|---|---|---|---|" + ("---|" if distilled else "")]
  for r in report["results"]:
    lines.append(f"| {r['labels_per_class']} | {r['examples']} | "
                 f"{100 * r['linear_top1']:.1f} | {100 * r['finetune_top1']:.1f} | "
                 f"{100 * r['scratch_top1']:.1f} | "
                 + (f"{100 * r['distill_top1']:.1f} | " if distilled else "")
                 + f"{r['finetune_steps']} | {r['seconds']:.0f} |")
  return "\n".join(lines)


# --------------------------------------------------------------------- main
def _bool(text):
  if text.lower() in ("true", "1", "yes"):
    return True
  if text.lower() in ("false", "0", "no"):
    return False
  raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def _parser():
  # argparse rather than absl flags: importing tf_ssl.finetune defines the
  # library's absl flags, among them --labels_per_class as one integer and
  # --backbone/--init, which this tool needs with other meanings.
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--init", required=True,
                 help="Pretraining workdir, checkpoint (prefix or dir) or SavedModel.")
  p.add_argument("--out", required=True, help="Directory for the JSON and PNG.")
  p.add_argument("--labels_per_class", default=None,
                 help=f"Comma-separated counts and/or 'all' (default {DEFAULT_LABELS}).")
  p.add_argument("--backbone", default=None, help="Default: the pretraining run's.")
  p.add_argument("--small_image_stem", type=_bool, default=None)
  p.add_argument("--image_size", type=int, default=None)
  p.add_argument("--dataset", default=None)
  p.add_argument("--data_dir", default=None)
  p.add_argument("--train_split", default="train")
  p.add_argument("--eval_split", default="test")
  p.add_argument("--test_examples", type=int, default=None,
                 help="Score on the first N test images only (default: all).")
  p.add_argument("--subset_seed", type=int, default=0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--mode", choices=("finetune", "hyperrule"), default="finetune")
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--learning_rate", type=float, default=0.2,
                 help="Base lr at batch 256, scaled linearly (0.2 -> 0.05 at 64).")
  p.add_argument("--epochs", type=float, default=20.0)
  p.add_argument("--min_steps", type=int, default=50)
  p.add_argument("--max_steps", type=int, default=300)
  p.add_argument("--finetune_steps", type=int, default=None,
                 help="Fixed steps for every run instead of the epochs rule.")
  p.add_argument("--linear_steps", type=int, default=1000)
  p.add_argument("--distill_epochs", type=float, default=1.0,
                 help="Passes over the whole training split per distillation run; "
                      "0: no distilled column.")
  p.add_argument("--distill_steps", type=int, default=None,
                 help="Fixed steps for every distillation run instead.")
  p.add_argument("--mixed_precision", type=_bool, default=True)
  p.add_argument("--quick", action="store_true",
                 help="Smoke run: 10,100 labels, 20 steps, 1000 test images.")
  return p


def _parse(argv):
  args = _parser().parse_args(argv[1:])
  absl_flags.FLAGS.mark_as_parsed()  # absl logging and app.run need it.
  return args


def config_from_args(args):
  """The base FinetuneConfig: flags given > the pretraining run's flags.txt."""
  inherited = pretraining_flags(args.init)
  values = {}
  for name in INHERITED:
    given = getattr(args, name)
    values[name] = given if given is not None else inherited.get(name)
  for name in ("backbone", "image_size", "dataset"):
    if values[name] is None:
      raise ValueError(f"--{name}: not given and --init={args.init!r} has no "
                       "flags.txt to read it from; pass it.")
  if values["small_image_stem"] is None:
    values["small_image_stem"] = values["image_size"] <= 32  # As the trainer.
  extra = {}
  if args.mode == "hyperrule":  # Native resolution; lr and schedule its own.
    extra = dict(crop_size=values["image_size"],
                 resize_size=int(round(values["image_size"] * 160 / 128)))
  else:
    extra = dict(optimizer="sgd", nesterov=True, momentum=0.9,
                 learning_rate=args.learning_rate, lr_scaling="linear",
                 weight_decay=0.0, warmup_epochs=0.0, train_epochs=None)
  return FinetuneConfig(
      mode=args.mode, init=args.init, train_split=args.train_split,
      eval_split=args.eval_split, subset_seed=args.subset_seed, seed=args.seed,
      global_batch_size=args.batch_size, train_steps=1, eval_batch_size=500,
      mixed_precision=args.mixed_precision, sync_bn=False, workdir=None,
      export=False, **values, **extra)


def main(args):
  if args.quick:
    args.labels_per_class = args.labels_per_class or "10,100"
    args.finetune_steps = args.finetune_steps or 20
    args.distill_steps = args.distill_steps or 20
    args.test_examples = args.test_examples or 1000
  try:
    if args.distill_epochs < 0 or (args.distill_steps is not None and args.distill_steps < 1):
      raise ValueError(f"--distill_epochs={args.distill_epochs} must be >= 0 and "
                       f"--distill_steps={args.distill_steps} >= 1 when given.")
    label_counts = parse_label_counts(args.labels_per_class or DEFAULT_LABELS)
    base = config_from_args(args)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  logging.info("Base config: %s", base)
  train_source, test_source = finetune.load_sources(base)
  if args.test_examples:
    test_source = test_source.take(
        np.arange(min(args.test_examples, test_source.num_examples)))
  command = shlex.join([os.path.basename(sys.executable)] + sys.argv)
  report = run(base, label_counts, train_source, test_source, args.out,
               epochs=args.epochs, min_steps=args.min_steps,
               max_steps=args.max_steps, fixed_steps=args.finetune_steps,
               linear_steps=args.linear_steps, command=command,
               distill_epochs=args.distill_epochs, distill_steps=args.distill_steps)
  print(table(report))
  print(f"total {report['total_seconds']:.0f} s; "
        f"{os.path.join(args.out, 'label_efficiency.png')}")


if __name__ == "__main__":
  app.run(main, flags_parser=_parse)
