r"""Linear evaluation, fine-tuning and BiT-HyperRule on any tf.distribute strategy.

    python -m tf_ssl.finetune --flagfile=configs/bit_hyperrule_cifar10.cfg \
        --init=BiT-M-R50x1.npz --workdir=runs/bit_cifar10

Resume order: the latest checkpoint in --workdir, else --init (a tf_ssl
checkpoint, a BiT .npz or an exported SavedModel, see tf_ssl.pretrained),
else a random initialisation. Rerunning the same command after an
interruption continues from that checkpoint.

Modes (docs/recipes.md):
  linear     frozen encoder, random-resized crop + flip only, SGD (Nesterov)
             or LARS, warmup-cosine; the head has no weight decay.
  finetune   the whole network from --finetune_after_block on, same views
             and optimisers, optional L2 weight decay (never on the head).
  hyperrule  BiT-HyperRule (tf_ssl.hyperrule): its resolution, step
             schedule and MixUp by dataset size, SGD momentum 0.9, lr 0.003 at
             batch 512 scaled linearly, no weight decay, zero-init head.

For a folder dataset, <path>/<split> is used when that sub-folder exists
(e.g. folder:data with data/train and data/test), else <path> for both; a
tfrecord glob takes {split}. Without a held-out split the evaluation is on
the training images: the log says so and results.json has eval_on_train.

Library use (no flags), e.g. from a tool running many label counts:

    config = flags.FinetuneConfig(mode="linear", init="runs/x/checkpoints",
                                  train_steps=500, global_batch_size=256)
    strategy = distribute.get_strategy("default")
    train, test = load_sources(config)                  # read once
    for k in (10, 100):
      results = run_finetune(dataclasses.replace(config, labels_per_class=k),
                             strategy=strategy, train_source=train,
                             eval_source=test)          # results["top1"]
"""

import json
import math
import os
import time

from absl import app
from absl import logging
import keras
import numpy as np
import tensorflow as tf

from tf_ssl import checkpoints
from tf_ssl import export
from tf_ssl import flags as tf_ssl_flags
from tf_ssl import hyperrule
from tf_ssl import optim
from tf_ssl import pretrained
from tf_ssl import runner
from tf_ssl.data import augment
from tf_ssl.data import pipeline
from tf_ssl.data import sources
from tf_ssl.data import subsets
from tf_ssl.models import build_backbone
from tf_ssl.models.classifier import Classifier
from tf_ssl.models.heads import ProjectionHead

FinetuneConfig = tf_ssl_flags.FinetuneConfig
CURVES = ("loss", "accuracy", "learning_rate")


class CropFlip:
  """Views of the SimCLR linear-evaluation protocol: train = random resized
  crop (area 0.08-1, bilinear) + flip p=0.5, no colour; eval =
  augment.eval_view (centre crop 0.875, none at <= 32 px)."""

  def __init__(self, image_size):
    self.image_size = int(image_size)
    self._crop = augment.SimCLRAugment(self.image_size, num_views=1,
                                       batch_level=False)

  def train(self, record, seed):
    s = tf.random.experimental.stateless_split(seed, 2)
    image = self._crop.crop_views(record, s[0])[0]
    return tf.image.stateless_random_flip_left_right(image, s[1])

  def eval(self, record):
    return augment.eval_view(record, self.image_size)


# --------------------------------------------------------------------- data
def load_sources(config):
  """(train source, eval source) of the config's dataset, without subsetting."""
  return tuple(sources.make_source(config.dataset, split, config.data_dir)
               for split in (config.train_split, config.eval_split))


def select_labels(source, config):
  """The training examples: all, --label_fraction or --labels_per_class of
  `source`, the same subset for the same --subset_seed (data.subsets)."""
  if config.label_fraction is None and config.labels_per_class is None:
    return source
  return subsets.label_subset(source, fraction=config.label_fraction,
                              per_class=config.labels_per_class,
                              seed=config.subset_seed)


def num_classes_of(config, train_source, eval_source):
  """The head size: --num_classes, checked against both splits' class counts."""
  counts = {f"--train_split={config.train_split}": train_source.num_classes,
            f"--eval_split={config.eval_split}": eval_source.num_classes}
  known = {k: v for k, v in counts.items() if v}
  if config.num_classes:
    for split, n in known.items():
      if n != config.num_classes:
        raise ValueError(
            f"--num_classes={config.num_classes} does not match the {n} classes "
            f"of --dataset={config.dataset} {split}; the head must have one "
            "logit per class (--num_classes=0 takes it from the data).")
    return config.num_classes
  if len(set(known.values())) > 1:
    raise ValueError(f"--dataset={config.dataset}: the splits have different "
                     f"class counts {known}; pass --num_classes.")
  if not known:
    raise ValueError(f"--dataset={config.dataset} has no labels to fine-tune on "
                     "(unlabelled images); give a labelled dataset.")
  return next(iter(known.values()))


def _image_hw(source):
  if source.image_size:
    return source.image_size
  first = next(iter(source.dataset().take(1)))  # Images of varying size.
  return tuple(first["image"].shape[:2])


# --------------------------------------------------------------------- plan
def make_plan(config, train_source, num_classes):
  """What the run does: steps, learning rate, resolution and MixUp.

  Returns a dict (it goes into results.json) with train_examples,
  total_steps, peak_lr, warmup_steps, resize_size, crop_size (the view side;
  = image_size outside hyperrule), mixup_alpha, and for hyperrule
  dataset_size and schedule [warmup, d1, d2, d3, total].
  """
  n = train_source.num_examples
  gbs = config.global_batch_size
  plan = {"mode": config.mode, "train_examples": n, "num_classes": num_classes,
          "global_batch_size": gbs}
  if config.mode == "hyperrule":
    size = (hyperrule.dataset_size(examples_per_class=config.labels_per_class,
                                   num_classes=num_classes)
            if config.labels_per_class else hyperrule.dataset_size(num_examples=n))
    schedule = hyperrule.get_schedule(size)
    if config.train_steps:  # A shorter run: the same shape, rescaled.
      schedule = [int(round(s * config.train_steps / schedule[-1]))
                  for s in schedule[:-1]] + [config.train_steps]
    # model.fit runs whole executions: the last phase (lr / 1000) absorbs
    # the steps that round the run up to a multiple of them.
    schedule[-1] = runner.whole_executions(schedule[-1], config.steps_per_execution)
    resize, crop = config.resize_size, config.crop_size
    if not crop:
      resize, crop = hyperrule.get_resolution(_image_hw(train_source))
    mixup = (hyperrule.get_mixup(size) if config.mixup_alpha is None
             else config.mixup_alpha)
    plan.update(dataset_size=size, schedule=schedule, total_steps=schedule[-1],
                warmup_steps=schedule[0],
                peak_lr=hyperrule.scale_lr(gbs, config.hyperrule_base_lr),
                resize_size=resize, crop_size=crop, mixup_alpha=mixup)
    return plan
  total = runner.whole_executions(
      config.train_steps or max(1, int(math.ceil(config.train_epochs * n / gbs))),
      config.steps_per_execution)
  peak = config.learning_rate
  if config.lr_scaling != "none":
    peak = optim.scale_learning_rate(peak, gbs, config.lr_scaling)
  plan.update(total_steps=total, peak_lr=peak,
              warmup_steps=runner.warmup_steps(config.warmup_epochs, n / gbs, total),
              resize_size=config.image_size, crop_size=config.image_size,
              mixup_alpha=config.mixup_alpha or 0.0)
  return plan


def views_for(plan):
  """An object with train(record, seed) and eval(record) for the plan."""
  if plan["mode"] == "hyperrule":
    return augment.BiTAugment(plan["crop_size"], plan["resize_size"])
  return CropFlip(plan["crop_size"])


# ------------------------------------------------------------- model + optim
def build_model(config, num_classes):
  """A Classifier as the config says (call inside strategy.scope())."""
  kwargs = {"sync_bn": config.sync_bn} if config.backbone.startswith("resnet") else {}
  backbone = build_backbone(config.backbone, small_image_stem=config.small_image_stem,
                            **kwargs)
  head = None
  if config.finetune_proj_layers:
    head = ProjectionHead(hidden_dim=config.proj_hidden_dim or None, output_dim=config.proj_dim,
                          num_layers=config.proj_layers, kind=config.proj_head,
                          sync_bn=config.sync_bn)
    head.build((None, backbone.feature_dim))
  decay = config.weight_decay if (config.mode == "finetune" and
                                  config.optimizer == "sgd") else 0.0
  return Classifier(backbone, num_classes, projection_head=head,
                    proj_layers=config.finetune_proj_layers,
                    zero_init_head=config.zero_init_head or config.mode == "hyperrule",
                    freeze_encoder=config.mode == "linear",
                    finetune_after_block=config.finetune_after_block,
                    weight_decay=decay)


def build_optimizer(config, plan):
  """(optimizer, learning-rate schedule) for the plan."""
  if config.mode == "hyperrule":
    schedule = hyperrule.HyperRuleSchedule(plan["peak_lr"], plan["schedule"])
    return keras.optimizers.SGD(schedule, momentum=hyperrule.MOMENTUM), schedule
  schedule = optim.WarmupCosine(plan["peak_lr"], plan["warmup_steps"],
                                plan["total_steps"])
  if config.optimizer == "lars":
    # LARS decays inside, skipping norms, biases and the head; in linear
    # mode only the (excluded) head trains, so there is no decay at all.
    decay = config.weight_decay if config.mode == "finetune" else 0.0
    return optim.LARS(schedule, momentum=config.momentum, weight_decay=decay,
                      nesterov=config.nesterov), schedule
  return keras.optimizers.SGD(schedule, momentum=config.momentum,
                              nesterov=config.nesterov), schedule


# ---------------------------------------------------------------- evaluation
def evaluate(model, strategy, source, global_batch_size, view_fn, image_size):
  """Top-1 and top-5 accuracy of `model` on `source`, every example once.

  The eval pipeline pads the last batch (mask 0); padded and unlabelled
  rows are not counted. Counts are summed over replicas, so the result is
  exact on any number of replicas. Top-5 uses the 5 largest logits (ties to
  the lower class index, as argmax), or all classes when there are fewer.

  Returns:
    {"top1": float, "top5": float, "eval_examples": int}.
  """
  data = pipeline.eval_dataset(strategy, source, global_batch_size, image_size,
                               view_fn=view_fn)
  k = min(5, model.num_classes)

  def counts(batch):
    logits = tf.cast(model(batch["image"], training=False)["logits"], tf.float32)
    labels = tf.cast(batch["label"], tf.int32)
    weight = batch["mask"] * tf.cast(labels >= 0, tf.float32)
    _, top = tf.math.top_k(logits, k=k)
    hit = tf.cast(tf.equal(top, tf.maximum(labels, 0)[:, None]), tf.float32)
    return tf.stack([tf.reduce_sum(hit[:, 0] * weight),
                     tf.reduce_sum(tf.reduce_max(hit, axis=1) * weight),
                     tf.reduce_sum(weight)])

  @tf.function
  def step(batch):
    return strategy.reduce("SUM", strategy.run(counts, args=(batch,)), axis=None)

  total = np.zeros(3)
  for batch in data:
    total += step(batch).numpy()
  if total[2] == 0:
    raise ValueError(f"{source.name}: no labelled examples to evaluate on.")
  return {"top1": float(total[0] / total[2]), "top5": float(total[1] / total[2]),
          "eval_examples": int(total[2])}


def export_classifier(model, path):
  """SavedModel of a fine-tuned Classifier.

  serving_default(images float32 [B, H, W, 3] in [0, 1]) -> {"logits",
  "probabilities"}; `__call__` and the TFSMLayer endpoints of tf_ssl.export
  return every endpoint ("features", "logits", "probabilities", ...).
  """
  root = export.build_export_module(model)

  @tf.function(input_signature=[export.IMAGE_SPEC])
  def serving(images):
    out = model(images, training=False)
    return {k: tf.cast(out[k], tf.float32) for k in ("logits", "probabilities")}

  tf.saved_model.save(root, path, signatures={
      "serving_default": serving.get_concrete_function()})
  return path


# ----------------------------------------------------------------------- run
def _init(config, model):
  """--init into the model (the runner calls this when there is nothing to resume)."""
  info = pretrained.load_init(model.backbone, config.init, model.projection_head,
                              config.finetune_proj_layers, config.backbone)
  if info["kind"] == "none":
    logging.warning("No --init: training from a random initialisation.")
  return info


def run_finetune(config, strategy=None, train_source=None, eval_source=None,
                 verbose=None, return_model=False, flags_text=None):
  """One fine-tuning run: train, evaluate, and (with a workdir) save.

  Args:
    config: a FinetuneConfig.
    strategy: a tf.distribute strategy; None builds config.strategy. Pass
      one when calling repeatedly in one process.
    train_source, eval_source: Sources to use instead of reading
      config.dataset (read them once with load_sources for many runs); the
      label subset of the config is still taken from train_source.
    verbose: Keras progress (0, 1, 2); None: a bar on a terminal, else lines.
    return_model: also return the trained Classifier (e.g. to embed images
      with its "features" / "pre_logits" endpoints).
    flags_text: written to <workdir>/flags.txt by the chief (the CLI's flags).

  Returns:
    The results dict ("top1", "top5", "eval_examples", "train_steps",
    "init", the plan, timings, "saved_model" when exported; {"preempted":
    True, ...} when SIGTERM stopped the run), or (results, model) with
    return_model. With config.workdir the results also go to results.json,
    checkpoints resume, TensorBoard summaries and history.jsonl are
    written, and with config.export the classifier goes to saved_model/.
  """
  t_start = time.time()
  previous_policy = keras.mixed_precision.global_policy()
  keras.mixed_precision.set_global_policy(
      "mixed_bfloat16" if config.mixed_precision else "float32")
  try:
    results, model = _run(config, strategy, train_source, eval_source, verbose,
                          t_start, flags_text)
    return (results, model) if return_model else results
  finally:
    keras.mixed_precision.set_global_policy(previous_policy)


def _run(config, strategy, train_source, eval_source, verbose, t_start,
         flags_text=None):
  with runner.preparing():
    r = runner.start(config.workdir, config.strategy, config.tpu, config.seed,
                     config.mixed_precision, strategy=strategy, flags_text=flags_text)
    strategy, replicas = r.strategy, r.replicas
    pipeline.per_replica_batch_size(config.global_batch_size, replicas)

    # -------------------------------------------------------------------- input
    if train_source is None or eval_source is None:
      read_train, read_eval = load_sources(config)
      train_source, eval_source = train_source or read_train, eval_source or read_eval
    eval_on_train = sources.same_data(train_source, eval_source)
    if eval_on_train:
      logging.warning("--eval_split=%s reads the training data (%s): top-1 is measured "
                      "on training images; give the data a held-out split.",
                      config.eval_split, eval_source.name)
    num_classes = num_classes_of(config, train_source, eval_source)
    train_source = select_labels(train_source, config)
    plan = make_plan(config, train_source, num_classes)
    views = views_for(plan)
    total_steps = plan["total_steps"]

    # ------------------------------------------------------- model + optimizer
    with strategy.scope():
      model = build_model(config, num_classes)
      optimizer, schedule = build_optimizer(config, plan)
      model.compile(optimizer=optimizer, steps_per_execution=config.steps_per_execution,
                    jit_compile=config.jit_compile)
      optimizer.build(model.trainable_variables)
    logging.info("%s %s: %s parameters (%s trainable), %d replicas, %d steps, %s",
                 config.mode, config.backbone, f"{model.count_params():,}",
                 f"{sum(int(np.prod(v.shape)) for v in model.trainable_variables):,}",
                 replicas, total_steps, plan)

    # ---------------------------------------------------- checkpoint and resume
    checkpoint = checkpoints.make_checkpoint(model, optimizer)
    manager, init_info = runner.restore_or_init(
        r, checkpoint, lambda: _init(config, model), keep=config.keep_checkpoints)
    start_step = int(optimizer.iterations.numpy())
    train_data = pipeline.finetune_dataset(
        strategy, train_source, config.global_batch_size, views, seed=config.seed,
        start_step=start_step, deterministic=config.deterministic,
        mixup_alpha=plan["mixup_alpha"], cache=config.cache,
        shuffle_buffer=min(10_000, train_source.num_examples))

  # -------------------------------------------------------------------- train
  preempted, last_logs = runner.fit(
      r, model, train_data, total_steps=total_steps,
      steps_per_pass=-(-train_source.num_examples // config.global_batch_size),
      global_batch_size=config.global_batch_size, schedule=schedule,
      manager=manager, checkpoint_every_steps=config.checkpoint_every_steps,
      verbose=verbose)
  step = int(optimizer.iterations.numpy())
  if preempted:
    return {"preempted": True, "train_steps": step}, model
  train_seconds = time.time() - t_start

  # --------------------------------------------------------------- evaluation
  eval_batch = eval_batch_size(config, replicas)
  results = evaluate(model, strategy, eval_source, eval_batch, views.eval,
                     plan["crop_size"])
  results.update(
      train_steps=step, init=init_info, plan=plan, eval_on_train=eval_on_train,
      labels_per_class=config.labels_per_class, label_fraction=config.label_fraction,
      subset_seed=config.subset_seed,
      final_train_loss=last_logs.get("loss"),
      final_train_accuracy=last_logs.get("accuracy"),
      train_seconds=round(train_seconds, 1),
      wall_seconds=round(time.time() - t_start, 1))
  save_outputs(r, config, results, step, model, CURVES)
  return results, model


def eval_batch_size(config, replicas):
  """--eval_batch_size (default max(256, the training batch)), rounded up
  to a multiple of the replicas."""
  batch = config.eval_batch_size or max(256, config.global_batch_size)
  return -(-batch // replicas) * replicas


def save_outputs(r, config, results, step, model, curves):
  """results.json, summaries and curves, the classifier's export, and the
  run's end: the tail of every classifier-training run."""
  if config.workdir and config.export:
    results["saved_model"] = os.path.join(config.workdir, "saved_model")
  runner.write_results(r, results, step, curves=curves)
  if r.own_dir and config.export:
    # Every worker exports (a save reads variables collectively); the
    # chief's own_dir is --workdir.
    export_classifier(model, r.path("saved_model"))
  runner.finish(r)


def main(argv):
  del argv
  with runner.user_errors("tf_ssl.finetune"):
    with runner.preparing():
      config = tf_ssl_flags.finetune_config()
    results = run_finetune(config, flags_text=tf_ssl_flags.flags_as_text())
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  app.run(main, flags_parser=tf_ssl_flags.parse_command_line)
