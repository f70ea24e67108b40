r"""Self-supervised pretraining with any --method on any tf.distribute strategy.

    python -m tf_ssl.train --flagfile=configs/simclr_fashion_mnist.cfg \
        --workdir=runs/simclr_fashion_mnist

Resume order: the latest checkpoint in --workdir, else from scratch. Rerunning
the same command after an interruption continues from that checkpoint with
the same step, optimizer state and learning rate.
"""

import dataclasses
import json
import time

from absl import app
from absl import logging
import keras
import numpy as np
import tensorflow as tf

from tf_ssl import callbacks
from tf_ssl import checkpoints
from tf_ssl import evaluate
from tf_ssl import flags as tf_ssl_flags
from tf_ssl import methods
from tf_ssl import optim
from tf_ssl import plots
from tf_ssl import runner
from tf_ssl.data import pipeline
from tf_ssl.data import sources
from tf_ssl.models import build_backbone
from tf_ssl.models.ssl_model import SSLModel


def make_backbone(config):
  """A new backbone as the config says (the online one, a target, a
  random-init baseline)."""
  m = config.model
  kwargs = {"sync_bn": m.sync_bn} if m.backbone.startswith("resnet") else {}
  return build_backbone(m.backbone, small_image_stem=m.small_image_stem, **kwargs)


def build_method(config, total_steps=1, steps_per_epoch=None, num_examples=None):
  """The --method's Method with its options and the --proj_* projector;
  num_examples: the training examples (a memory bank's rows)."""
  m = config.model
  head = methods.HeadSpec(hidden_dim=m.proj_hidden_dim or None, output_dim=m.proj_dim,
                          num_layers=m.proj_layers, kind=m.proj_head,
                          sync_bn=m.sync_bn)
  return methods.create(config.method, config.method_options, head=head,
                        total_steps=total_steps,
                        global_batch_size=config.global_batch_size,
                        steps_per_epoch=steps_per_epoch,
                        num_examples=num_examples, seed=config.run.seed)


def check_batch_entries(method, source, dataset_flag):
  """UserError (one line) when the method needs a batch entry (e.g. each
  example's "index") that `source` cannot give."""
  if "index" in method.batch_entries and not source.has_index:
    raise runner.UserError(
        f"--method={method.name} needs each example's index, and --dataset="
        f"{dataset_flag} ({source.name}) cannot give one; use fashion_mnist, "
        "folder:<path> or tfds:<name>.")


def build_model(config, num_classes, method=None):
  """Backbone + the method's layers + online probe, built."""
  method = method or build_method(config)
  model = SSLModel(make_backbone(config), method, num_classes=num_classes or 0,
                   make_backbone=lambda: make_backbone(config))
  size = config.data.image_size
  model(tf.zeros((1, size, size, 3)))
  return model


def build_optimizer(config, steps_per_epoch, total_steps, exclude=optim.DEFAULT_EXCLUDE,
                    lr_multipliers=()):
  """The optimizer and its learning-rate schedule (warmup, then cosine).

  exclude: regexes of variable paths LARS and SGD leave out of weight decay
  (and LARS out of trust-ratio adaptation): the method's.
  lr_multipliers: LARS' ((regex, factor), ...): the method's.
  """
  if lr_multipliers and config.optimizer != "lars":
    raise runner.UserError(
        f"--method={config.method} gives some variables their own learning rate, "
        f"which only --optimizer=lars does; got --optimizer={config.optimizer}.")
  peak = config.learning_rate
  if config.lr_scaling != "none":
    peak = optim.scale_learning_rate(peak, config.global_batch_size, config.lr_scaling)
  warmup = runner.warmup_steps(config.warmup_epochs, steps_per_epoch, total_steps)
  schedule = optim.WarmupCosine(peak, warmup, total_steps)
  if config.optimizer == "lars":
    opt = optim.LARS(schedule, momentum=config.momentum, weight_decay=config.weight_decay,
                     exclude_from_weight_decay=exclude, exclude_from_adaptation=exclude,
                     lr_multipliers=lr_multipliers)
  elif config.optimizer == "sgd":
    opt = optim.momentum_sgd(schedule, momentum=config.momentum,
                             weight_decay=config.weight_decay,
                             exclude_from_weight_decay=exclude)
  else:
    opt = keras.optimizers.AdamW(schedule, weight_decay=config.weight_decay)
    opt.exclude_from_weight_decay(var_names=["gamma", "beta", "bias"])
  return opt, schedule


def first_examples(source, n):
  """The first `n` examples of `source` (all of them for n=0 or n >= size)."""
  if not n or n >= source.num_examples:
    return source
  return source.take(np.arange(n))


def evaluate_features(strategy, embed_fn, train_source, test_source, config,
                      batch_size, name="encoder", exclude_self=False):
  """k-NN and linear top-1 of `embed_fn`'s features on the labelled splits.

  The features are computed on `strategy`'s replicas (batch_size is global)
  and gathered on every host; the fits run on the host. exclude_self: the
  splits are the same examples in the same order (no held-out split), so
  each query's own example is left out of its k-NN bank.
  """
  size = config.data.image_size
  # Said before it starts: the raw-pixel baseline's logistic regression
  # alone can take a minute, which used to pass with nothing in the log.
  logging.info("%s: evaluating on %d + %d examples (features, k-NN, linear)",
               name, train_source.num_examples, test_source.num_examples)
  t0 = time.time()
  train, test = (evaluate.extract_features_distributed(
      strategy, embed_fn, pipeline.eval_dataset(strategy, source, batch_size, size))
                 for source in (train_source, test_source))
  classes = test_source.num_classes or int(max(train[1].max(), test[1].max()) + 1)
  t1 = time.time()
  knn = evaluate.knn_accuracy(*train, *test, classes, k=config.knn_k,
                              temperature=config.knn_temperature,
                              exclude_self=exclude_self)
  t2 = time.time()
  linear = evaluate.linear_accuracy(*train, *test, classes)
  logging.info("%s: features %.0fs, k-NN %.0fs, linear %.0fs", name,
               t1 - t0, t2 - t1, time.time() - t2)
  return {"knn_top1": knn, "linear_top1": linear}


def knn_monitor(strategy, backbone, train_source, test_source, config,
                batch_size=256, exclude_self=False):
  """A function returning the k-NN top-1 of `backbone` on fixed subsets.

  The first `config.eval_examples` examples of each split: the same bank and
  queries at every evaluation, so the curve moves only with the encoder.
  The features are computed on the strategy's replicas (on a TPU, on its
  cores), as the final evaluation does; batch_size is global.
  """
  bank = first_examples(train_source, config.eval_examples)
  queries = first_examples(test_source, config.eval_examples)
  classes = test_source.num_classes or train_source.num_classes
  size = config.data.image_size
  batch_size = -(-batch_size // strategy.num_replicas_in_sync) * strategy.num_replicas_in_sync

  def accuracy():
    train, test = (evaluate.extract_features_distributed(
        strategy, backbone,
        pipeline.eval_dataset(strategy, source, batch_size, size, cache=False))
                   for source in (bank, queries))
    return evaluate.knn_accuracy(*train, *test, classes, k=config.knn_k,
                                 temperature=config.knn_temperature,
                                 exclude_self=exclude_self)
  return accuracy


def raw_pixels(grayscale):
  """The raw-pixel baseline as an embed function: the flattened image.

  Grayscale sources (Fashion-MNIST) reach the pipeline as three equal
  channels; their baseline uses one, as the published 784-pixel figures do
  (three copies of every pixel cost the linear probe ~5 points here).
  """
  def embed(images, training=False):
    del training
    if grayscale:
      images = images[..., :1]
    return {"features": tf.reshape(images, [tf.shape(images)[0], -1])}
  return embed


def resolution_phases(total_steps, image_size, progressive, steps_per_execution=1):
  """[(first step, end step, view size)] covering [0, total_steps).

  progressive: ((size, fraction), ...) as --progressive_resolution gives
  it; each phase ends at its fraction of the steps, rounded up to whole
  executions; the last phase is at `image_size`. Empty phases are dropped.
  """
  phases, first = [], 0
  for size, fraction in progressive:
    end = min(total_steps, runner.whole_executions(round(fraction * total_steps),
                                                   steps_per_execution))
    if end > first:
      phases.append((first, end, size))
      first = end
  if first < total_steps or not phases:
    phases.append((first, total_steps, image_size))
  return phases


def data_at(data, size):
  """The DataConfig with views of `size` pixels, local crops scaled alike."""
  local = data.local_crop_size
  if data.local_crops:
    local = max(8, round(local * size / data.image_size))
  return dataclasses.replace(data, image_size=size, local_crop_size=local)


def is_grayscale(source, image_size, examples=256):
  """Whether the first `examples` eval views have three equal channels."""
  batch = next(iter(pipeline.build_eval(
      first_examples(source, examples), examples, image_size, cache=False)))
  image = batch["image"]
  return bool(tf.reduce_all(image[..., 0] == image[..., 1]) and
              tf.reduce_all(image[..., 1] == image[..., 2]))


def main(argv):
  del argv
  with runner.user_errors("tf_ssl.train"):
    _main()


def _main():
  t_start = time.time()
  with runner.preparing():
    config = tf_ssl_flags.pretrain_config()
    run = config.run
    r = runner.start(run.workdir, run.strategy, run.tpu, run.seed,
                     run.mixed_precision, flags_text=tf_ssl_flags.flags_as_text())
    strategy = r.strategy
    replicas = r.replicas
    if config.global_batch_size % replicas:
      raise runner.UserError(
          f"--global_batch_size={config.global_batch_size} is not divisible by the "
          f"{replicas} replicas of --strategy={run.strategy}.")

    # ------------------------------------------------------------------ input
    d = config.data
    train_source = sources.make_source(d.dataset, d.train_split, d.data_dir)
    test_source = sources.make_source(d.dataset, d.eval_split, d.data_dir)
    if methods.get(config.method).needs_labels and not train_source.num_classes:
      raise runner.UserError(
          f"--method={config.method} needs labels, and --dataset={d.dataset} "
          f"--train_split={d.train_split} has none; use --method=simclr.")
    eval_on_train = sources.same_data(train_source, test_source)
    steps_per_epoch = train_source.num_examples // config.global_batch_size
    if steps_per_epoch < 1:
      raise runner.UserError(
          f"--global_batch_size={config.global_batch_size} is larger than the "
          f"{train_source.num_examples} examples of --train_split={d.train_split}.")
    # model.fit runs whole executions of --steps_per_execution steps, so the
    # run's length is a multiple of it: --train_epochs rounds up to one
    # (--train_steps must be one), and the schedule ends where training does.
    spe = run.steps_per_execution
    total_steps = config.train_steps or runner.whole_executions(
        config.train_epochs * steps_per_epoch, spe)
    method = build_method(config, total_steps, steps_per_epoch,
                          train_source.num_examples)
    check_batch_entries(method, train_source, d.dataset)
    views = method.augment(d)

    # ----------------------------------------------------- model + optimizer
    with strategy.scope():
      model = build_model(config, train_source.num_classes, method)
      optimizer, schedule = build_optimizer(config, steps_per_epoch, total_steps,
                                            method.optimizer_exclusions(),
                                            method.learning_rate_multipliers())
      model.compile(optimizer=optimizer, steps_per_execution=spe,
                    jit_compile=run.jit_compile)
      optimizer.build(model.trainable_variables)
    logging.info("%s: %s parameters, %d replicas, %d steps (%.2f epochs)",
                 config.model.backbone, f"{model.count_params():,}", replicas,
                 total_steps, total_steps / steps_per_epoch)

    # -------------------------------------------------- checkpoint and resume
    # make_checkpoint files every variable by its Keras path: a plain
    # tf.train.Checkpoint(model=...) misses layers Keras 3 keeps in lists.
    checkpoint = checkpoints.make_checkpoint(model, optimizer)
    manager, _ = runner.restore_or_init(r, checkpoint, keep=run.keep_checkpoints)
    start_step = int(optimizer.iterations.numpy())
    phases = resolution_phases(total_steps, d.image_size, config.progressive_resolution,
                               spe)

    def train_data(first, size):
      # The data stream depends on the seed, the input pipeline and the step
      # it starts from: a resumed run sees new crops and a new order.
      phase_views = views if size == d.image_size else method.augment(data_at(d, size))
      return pipeline.pretrain_dataset(
          strategy, train_source, config.global_batch_size, phase_views, seed=run.seed,
          start_step=first, deterministic=run.deterministic, cache=d.cache)
    first_data = train_data(start_step, next(size for _, end, size in phases
                                             if end > start_step))

  # ------------------------------------------------------------------ train
  if eval_on_train:
    logging.warning(
        "--eval_split=%s reads the training data (%s): the evaluation is on the "
        "training images; the k-NN leaves each query's own image out of its bank. "
        "Give the data a held-out split for a real evaluation.", d.eval_split,
        test_source.name)
  if start_step == 0 and r.is_chief:
    sample = pipeline.build_pretrain(train_source, 8, views, seed=run.seed,
                                     cache=False, shuffle_buffer=0)
    plots.write_view_grid(r.writer, next(iter(sample))["views"], step=0)
  extra = []
  if config.eval_every_steps:
    extra.append(callbacks.KnnMonitor(
        knn_monitor(strategy, model.representation, train_source, test_source, config,
                    exclude_self=eval_on_train),
        optimizer.iterations, config.eval_every_steps, writer=r.writer))
  for first, end, size in phases:
    if end <= start_step:
      continue
    if len(phases) > 1:
      logging.info("Steps %d to %d at %d px (--progressive_resolution).", first, end, size)
    data = first_data if first <= start_step else train_data(first, size)
    preempted, _ = runner.fit(
        r, model, data, total_steps=end, steps_per_pass=steps_per_epoch,
        global_batch_size=config.global_batch_size,
        schedule={"learning_rate": schedule, **method.schedules()},
        manager=manager, checkpoint_every_steps=run.checkpoint_every_steps,
        extra_callbacks=extra)
    if preempted:
      return
  train_seconds = time.time() - t_start

  # ------------------------------------------------------------- evaluation
  eval_batch = -(-max(256, config.global_batch_size) // replicas) * replicas
  train_source = first_examples(train_source, config.final_eval_examples)
  test_source = first_examples(test_source, config.final_eval_examples)
  results = evaluate_features(strategy, model.representation, train_source, test_source,
                              config, eval_batch, exclude_self=eval_on_train)
  if config.baselines:
    t0 = time.time()
    gray = is_grayscale(train_source, d.image_size)
    with strategy.scope():
      random_init = make_backbone(config)
    logging.info("baselines: set up in %.0fs", time.time() - t0)
    for prefix, embed in (("raw_pixel_", raw_pixels(gray)),
                          ("random_init_", random_init)):
      for key, value in evaluate_features(strategy, embed, train_source,
                                          test_source, config, eval_batch,
                                          name=prefix[:-1],
                                          exclude_self=eval_on_train).items():
        results[prefix + key] = value
  step = int(optimizer.iterations.numpy())
  results.update(eval_on_train=eval_on_train,
                 eval_train_examples=train_source.num_examples,
                 eval_test_examples=test_source.num_examples,
                 train_steps=step,
                 wall_seconds=round(time.time() - t_start, 1),
                 train_seconds=round(train_seconds, 1))
  runner.write_results(r, results, step)
  print(json.dumps(results, indent=2))

  # ----------------------------------------------------------------- export
  if config.export:
    from tf_ssl import export  # pylint: disable=g-import-not-at-top
    export.export_saved_model(model, r.path("saved_model"))
  runner.finish(r)


if __name__ == "__main__":
  app.run(main, flags_parser=tf_ssl_flags.parse_command_line)
