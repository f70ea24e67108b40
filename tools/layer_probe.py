r"""Layer-wise linear probe: test top-1 of every backbone endpoint, per run.

    .venv/bin/python tools/layer_probe.py \
        --workdirs=runs/rotation,runs/jigsaw,runs/pirl,runs/simclr \
        --labels=rotation,jigsaw,pirl,simclr --out=runs/layer_probe

The claim it lets a user check on their own data (issue 15; the layer-wise
comparison of Jigsaw and PIRL in Misra & van der Maaten, "Self-Supervised
Learning of Pretext-Invariant Representations", CVPR 2020): features of a
pretext task (rotation, jigsaw) stop improving, or get worse, in the last
layers, which specialise in the pretext task, while invariant features
(PIRL, SimCLR) keep improving up to the representation.

For each --workdirs entry (a pretraining workdir; a checkpoint prefix, a
checkpoints/ directory or a SavedModel inside one also work):
 1. Its flags.txt gives --backbone, --small_image_stem, --image_size,
    --dataset and --data_dir (tf_ssl.pretrained.pretraining_flags, as
    tools/label_efficiency.py reads them). --dataset, --data_dir and
    --image_size given here replace them for every run.
 2. The backbone of its latest checkpoint (the method's representation, as
    `tf_ssl.finetune --init` takes it) is restored by
    tf_ssl.pretrained.load_init: all variables or none.
 3. Frozen features (BN in inference mode) of every endpoint the backbone
    returns ("stem", "block1".."block4", "features"; both the BN ResNet and
    BiT name them so), globally average-pooled to one vector per image
    (tf_ssl.evaluate.extract_pooled_features), at the pretraining image size
    with the evaluation view (tf_ssl.data.augment.eval_view). Images: a
    fixed subset of --examples of --train_split and of --test_split (drawn
    without replacement with --subset_seed, in record order; the same for
    every run on the same data), or the whole splits with --examples=0.
 4. Per endpoint, the library's linear evaluation
    (tf_ssl.evaluate.linear_accuracy): multinomial logistic regression on
    features standardised with the train subset's mean and std, L2 penalty
    --l2 on the weights, full-batch Adam from zeros for --linear_steps
    steps, so the same features give the same accuracy; top-1 on the test
    subset. The BN ResNet's "features" is the average pool of "block4",
    so those two columns agree; BiT's "features" follow its last GroupNorm
    and ReLU.

Writes to --out:
  layer_probe.json   {run label: {endpoint: test top-1}} for this command's
                     runs, in order (rewritten after each run).
  layer_probe.png    test top-1 (%) against depth, one line per run.
  runs/<label>.json  one run's accuracies, feature widths, timings and the
                     settings they depend on (checkpoint path, backbone,
                     data, subset, classifier). A rerun reuses a run whose
                     settings are unchanged, so adding a workdir to the
                     command probes only the new one; a new checkpoint or
                     other settings recompute it (--recompute forces it).
and prints the table (top-1 %).

Errors that end the command with one line (exit code 2): a workdir without
a checkpoint, without the flags.txt to read the architecture from, whose
checkpoint does not fit the backbone its flags.txt names, or whose online
probe (trained with labels) has another class count than the dataset its
flags.txt names; data without a known class count; another number of
--labels than of --workdirs.

Cost: one pass of the backbone over both subsets, then one logistic
regression per endpoint, per run. MoCo v3's Fashion-MNIST run (a
quarter-width ResNet-18 at 28 px, configs/mocov3_fashion_mnist.cfg) with
the default --examples=10000 took 92 s wall (50 s of features, 27 s of
fits) on 2 CPU cores shared with a training run, 1.2 GB resident; its
"features" top-1 from 10,000 training images, 84.8%, is below the 86.1%
its results.json has from all 60,000.
"""

import dataclasses
import json
import os
import re
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags as absl_flags
from absl import logging
import keras
from matplotlib.figure import Figure
import numpy as np
import tensorflow as tf

from tf_ssl import checkpoints
from tf_ssl import evaluate
from tf_ssl import plots
from tf_ssl import pretrained
from tf_ssl import runner
from tf_ssl.data import pipeline
from tf_ssl.data import sources
from tf_ssl.models import build_backbone

UserError = runner.UserError


@dataclasses.dataclass(frozen=True)
class Options:
  """How every run is probed (the command's flags of the same names)."""
  examples: int = 10000
  subset_seed: int = 0
  train_split: str = "train"
  test_split: str = "test"
  linear_steps: int = 1000
  l2: float = 1e-4
  mixed_precision: bool = False
  batch_size: int = 500


# ------------------------------------------------------------------ settings
def parse_runs(workdirs, labels=None):
  """--workdirs and --labels -> [(label, workdir)]; labels default to the
  workdirs' names and must name distinct cache files."""
  workdirs = [w for w in workdirs if w]
  if not workdirs:
    raise UserError("--workdirs: give at least one pretraining workdir.")
  if labels:
    if len(labels) != len(workdirs):
      raise UserError(f"--labels: {len(labels)} label(s) for {len(workdirs)} "
                      "--workdirs; give one label per workdir, in the same "
                      "order (or none: the workdirs' names).")
  else:
    labels = [os.path.basename(os.path.normpath(w)) for w in workdirs]
  seen = {}
  for label in labels:
    name = _file_name(label)
    if name in seen:
      raise UserError(f"--labels: {seen[name]!r} and {label!r} are the same "
                      "run name; give every run its own label.")
    seen[name] = label
  return list(zip(labels, workdirs))


def _file_name(label):
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("._") or "run"


def _absolute(path):
  return path if "://" in path else os.path.abspath(path)


def run_settings(workdir, options, overrides=None):
  """Everything one run's accuracies depend on: its cache key.

  Args:
    workdir: a pretraining workdir (or a checkpoint or SavedModel in one).
    options: the Options.
    overrides: {"dataset"|"data_dir"|"image_size": value or None}, given on
      the command line; they replace flags.txt's.

  Raises:
    UserError: no such workdir, no checkpoint in it, or no flags.txt saying
      the backbone, image size and dataset.
  """
  if not (tf.io.gfile.exists(workdir) or tf.io.gfile.exists(workdir + ".index")):
    raise UserError(f"--workdirs: {workdir} does not exist.")
  try:
    kind, path = pretrained.init_kind(workdir)
  except ValueError:
    kind, path = "none", None
  if kind not in ("checkpoint", "saved_model"):
    raise UserError(f"{workdir} holds no checkpoint (no checkpoints/ckpt-N, "
                    "no saved_model.pb): has its pretraining saved one yet?")
  values = pretrained.pretraining_flags(workdir)
  given = {k: v for k, v in (overrides or {}).items() if v is not None}
  values.update(given)
  for name in ("backbone", "image_size", "dataset"):
    if values.get(name) is None:
      raise UserError(f"{workdir}: no flags.txt beside its checkpoints says "
                      f"--{name}; is it a tf_ssl.train workdir? (--{name} "
                      "given here would apply to every run.)")
  if values.get("small_image_stem") is None:
    values["small_image_stem"] = values["image_size"] <= 32  # As the trainer.
  settings = {
      "workdir": _absolute(workdir), "init_kind": kind,
      "checkpoint": _absolute(path), "backbone": values["backbone"],
      "small_image_stem": bool(values["small_image_stem"]),
      "image_size": int(values["image_size"]), "dataset": values["dataset"],
      "data_dir": values.get("data_dir"),
      "dataset_from_flags_txt": "dataset" not in given,
  }
  settings.update(dataclasses.asdict(options))
  del settings["batch_size"]  # How fast, not what is measured.
  return settings


# -------------------------------------------------------------------- data
def load_split(dataset, data_dir, split, examples, seed):
  """A labelled split, or its fixed subset of `examples` (0: all of it)."""
  source = sources.make_source(dataset, split, data_dir)
  if examples and examples < source.num_examples:
    rng = np.random.default_rng(seed)
    source = source.take(np.sort(rng.choice(source.num_examples, examples,
                                            replace=False)))
  return source


def class_count(dataset, options, train, test):
  """The class count both splits agree on; UserError when unknown."""
  counts = {options.train_split: train.num_classes,
            options.test_split: test.num_classes}
  for split, n in counts.items():
    if not n:
      raise UserError(f"--dataset={dataset} split {split!r} has no known class "
                      "count (unlabelled images?): the probe needs labelled "
                      "train and test splits.")
  if len(set(counts.values())) > 1:
    raise UserError(f"--dataset={dataset}: the splits have different class "
                    f"counts {counts}.")
  return counts[options.train_split]


def check_dataset(settings, num_classes):
  """A run's online probe (pretrained with labels) must have one logit per
  class of the dataset its flags.txt names; else it saw other data."""
  if settings["init_kind"] != "checkpoint" or not settings["dataset_from_flags_txt"]:
    return
  try:
    kernel = checkpoints.saved_shapes(settings["checkpoint"], "probe_head").get("kernel")
  except ValueError:
    return  # No online probe: pretrained without labels, nothing to tell by.
  if kernel and kernel[-1] != num_classes:
    raise UserError(
        f"{settings['workdir']}: its online probe has {kernel[-1]} classes but "
        f"--dataset={settings['dataset']} from its flags.txt has {num_classes}: "
        "was it pretrained on other data than its flags.txt says?")


# ------------------------------------------------------------------- probe
def load_backbone(settings):
  """The run's backbone, built as flags.txt says and restored, all or none."""
  backbone = build_backbone(settings["backbone"],
                            small_image_stem=settings["small_image_stem"])
  try:
    pretrained.load_init(backbone, settings["checkpoint"],
                         backbone_name=settings["backbone"])
  except ValueError as e:
    detail = str(e).strip().splitlines()[0].split(": ", 1)[-1]
    raise UserError(
        f"{settings['workdir']}: its checkpoint does not fit the backbone its "
        f"flags.txt names (--backbone={settings['backbone']}, "
        f"--small_image_stem={settings['small_image_stem']}): {detail}") from e
  return backbone


def endpoints_of(backbone, image_size):
  """The backbone's pooled-feature endpoints, input to output."""
  out = backbone(tf.zeros((1, image_size, image_size, 3)), training=False)
  return [name for name in out if name != "logits"]


def fit_probes(train, test, num_classes, options, log_prefix=""):
  """Test top-1 of a logistic regression on each endpoint's features.

  Args:
    train, test: ({endpoint: float [N, C]}, labels [N]).
    num_classes: classes of the classifier.
    options: Options (linear_steps, l2).

  Returns:
    {endpoint: top-1 in [0, 1]}, in train's endpoint order.
  """
  (train_x, train_y), (test_x, test_y) = train, test
  top1 = {}
  for name, x in train_x.items():
    t = time.time()
    top1[name] = evaluate.linear_accuracy(
        x, train_y, test_x[name], test_y, num_classes, l2=options.l2,
        steps=options.linear_steps)
    logging.info("%s%s (%d-d): top-1 %.4f (%.1f s)", log_prefix, name,
                 x.shape[1], top1[name], time.time() - t)
  return top1


def probe_run(label, settings, options, data):
  """Probes one run: its cache record.

  data: (train source, test source, num_classes) of the run's dataset.
  """
  t_start = time.time()
  train_source, test_source, num_classes = data
  previous = keras.mixed_precision.global_policy()
  keras.mixed_precision.set_global_policy(
      "mixed_bfloat16" if options.mixed_precision else "float32")
  try:
    with runner.preparing():
      check_dataset(settings, num_classes)
      backbone = load_backbone(settings)
    size = settings["image_size"]
    endpoints = endpoints_of(backbone, size)
    features = [evaluate.extract_pooled_features(
        backbone, pipeline.build_eval(source, options.batch_size, size), endpoints)
                for source in (train_source, test_source)]
  finally:
    keras.mixed_precision.set_global_policy(previous)
  feature_seconds = time.time() - t_start
  logging.info("%s: features of %s on %d train + %d test images in %.1f s",
               label, ", ".join(endpoints), len(features[0][1]),
               len(features[1][1]), feature_seconds)
  t = time.time()
  top1 = fit_probes(features[0], features[1], num_classes, options, f"{label}: ")
  return {
      "label": label, "settings": settings, "top1": top1,
      "feature_dims": {n: int(x.shape[1]) for n, x in features[0][0].items()},
      "num_classes": num_classes, "train_examples": int(len(features[0][1])),
      "test_examples": int(len(features[1][1])),
      "feature_seconds": round(feature_seconds, 1),
      "linear_seconds": round(time.time() - t, 1),
  }


# --------------------------------------------------------------------- run
def run(runs, out, options=Options(), overrides=None, recompute=False):
  """Probes each run, reusing the cached ones; writes --out's files.

  Args:
    runs: [(label, workdir)] (parse_runs).
    out: the output directory.
    options: Options.
    overrides: see run_settings.
    recompute: probe every run even when its cache is current.

  Returns:
    {label: {endpoint: test top-1}} in the order of `runs`.
  """
  with runner.preparing():  # Every workdir is checked before any long work.
    settings = {label: run_settings(workdir, options, overrides)
                for label, workdir in runs}
  tf.io.gfile.makedirs(os.path.join(out, "runs"))
  table, data, titles = {}, {}, []
  for i, (label, _) in enumerate(runs):
    path = os.path.join(out, "runs", _file_name(label) + ".json")
    record = _read_json(path) if not recompute else None
    if record and record.get("settings") == settings[label]:
      logging.info("%s (%d/%d): cached in %s", label, i + 1, len(runs), path)
    else:
      if record:
        logging.info("%s: %s changed since %s; probing again", label,
                     ", ".join(_changed(record.get("settings", {}), settings[label])),
                     path)
      s = settings[label]
      logging.info("%s (%d/%d): probing %s", label, i + 1, len(runs), s["checkpoint"])
      key = (s["dataset"], s["data_dir"])
      if key not in data:
        with runner.preparing():
          train, test = (load_split(s["dataset"], s["data_dir"], split,
                                    options.examples, options.subset_seed)
                         for split in (options.train_split, options.test_split))
          data[key] = (train, test, class_count(s["dataset"], options, train, test))
      record = probe_run(label, s, options, data[key])
      _write_json(record, path)
    table[label] = record["top1"]
    title = (f"{record['settings']['dataset']}: {record['train_examples']} "
             f"train, {record['test_examples']} test images")
    titles += [title] if title not in titles else []
    _write_json(table, os.path.join(out, "layer_probe.json"))
    plot(table, os.path.join(out, "layer_probe.png"), "; ".join(titles))
  return table


def _changed(old, new):
  return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def _read_json(path):
  if not tf.io.gfile.exists(path):
    return None
  with tf.io.gfile.GFile(path) as f:
    return json.load(f)


def _write_json(value, path):
  with tf.io.gfile.GFile(path + ".tmp", "w") as f:
    json.dump(value, f, indent=2)
  tf.io.gfile.rename(path + ".tmp", path, overwrite=True)


# ------------------------------------------------------------------ output
def _endpoints(table):
  """Every endpoint of the table, in the runs' (input to output) order."""
  names = []
  for row in table.values():
    names += [name for name in row if name not in names]
  return names


def table_text(table):
  """{label: {endpoint: top-1}} as a Markdown table of top-1 (%)."""
  names = _endpoints(table)
  lines = ["| run | " + " | ".join(names) + " |",
           "|---|" + "---|" * len(names)]
  for label, row in table.items():
    cells = [f"{100 * row[n]:.1f}" if n in row else "" for n in names]
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(table, path, title=""):
  """Test top-1 (%) against depth, one line per run (as tf_ssl.plots: a
  Figure without pyplot, written through tf.io.gfile)."""
  names = _endpoints(table)
  fig = Figure(figsize=(max(5, 1.1 * len(names)), 4))
  ax = fig.subplots()
  for label, row in table.items():
    x = [i for i, n in enumerate(names) if n in row]
    ax.plot(x, [100 * row[names[i]] for i in x], "o-", label=label)
  ax.set_xticks(range(len(names)))
  ax.set_xticklabels(names)
  ax.set_xlabel("backbone endpoint (input to output), globally average-pooled")
  ax.set_ylabel("linear probe test top-1 (%)")
  ax.set_title(title, fontsize=10)
  ax.grid(True, alpha=0.3)
  ax.legend()
  fig.tight_layout()
  plots.save_png(fig, path)


# -------------------------------------------------------------------- main
def define_flags(flag_values=absl_flags.FLAGS):
  """The command's flags; defined only when run as a program, so that
  importing this module next to tf_ssl.flags (which has --dataset too)
  defines nothing."""
  d = Options()
  f = dict(flag_values=flag_values)
  absl_flags.DEFINE_list("workdirs", None, "Pretraining workdirs, comma-separated.", **f)
  absl_flags.DEFINE_list("labels", [], "One run label per workdir (default: the workdirs' names).", **f)
  absl_flags.DEFINE_string("out", None, "Directory for layer_probe.json, layer_probe.png and runs/.", **f)
  absl_flags.DEFINE_integer("examples", d.examples, "Images of each split, a fixed seeded subset (0: whole splits).", **f)
  absl_flags.DEFINE_integer("subset_seed", d.subset_seed, "Seed of the --examples subsets.", **f)
  absl_flags.DEFINE_string("train_split", d.train_split, "Labelled split the classifiers are fitted on.", **f)
  absl_flags.DEFINE_string("test_split", d.test_split, "Split the top-1 is measured on.", **f)
  absl_flags.DEFINE_string("dataset", None, "Probe every run on this dataset instead of its flags.txt's.", **f)
  absl_flags.DEFINE_string("data_dir", None, "Data directory instead of the flags.txt's.", **f)
  absl_flags.DEFINE_integer("image_size", None, "Image size instead of the flags.txt's.", **f)
  absl_flags.DEFINE_integer("linear_steps", d.linear_steps, "Full-batch Adam steps of each logistic regression.", **f)
  absl_flags.DEFINE_float("l2", d.l2, "L2 penalty on the classifier weights.", **f)
  absl_flags.DEFINE_integer("batch_size", d.batch_size, "Images per feature batch.", **f)
  absl_flags.DEFINE_bool("mixed_precision", d.mixed_precision, "Features in mixed bfloat16 (fast only where the CPU has bf16).", **f)
  absl_flags.DEFINE_bool("recompute", False, "Probe every run again, ignoring runs/*.json.", **f)
  absl_flags.mark_flags_as_required(["workdirs", "out"], flag_values=flag_values)


def main(argv, flag_values=absl_flags.FLAGS):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  v = flag_values
  with runner.user_errors("layer_probe"):
    options = Options(examples=v.examples, subset_seed=v.subset_seed,
                      train_split=v.train_split, test_split=v.test_split,
                      linear_steps=v.linear_steps, l2=v.l2,
                      mixed_precision=v.mixed_precision, batch_size=v.batch_size)
    overrides = {"dataset": v.dataset, "data_dir": v.data_dir,
                 "image_size": v.image_size}
    table = run(parse_runs(v.workdirs, v.labels), v.out, options, overrides,
                recompute=v.recompute)
  print(table_text(table))
  print(f"wrote {os.path.join(v.out, 'layer_probe.json')} and layer_probe.png")


if __name__ == "__main__":
  define_flags()
  app.run(main)
