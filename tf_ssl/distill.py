r"""SimCLRv2's third stage: distil a fine-tuned teacher into a student on every image.

    python -m tf_ssl.distill --flagfile=configs/distill_fashion_mnist.cfg \
        --teacher=runs/finetune_10pc --init=runs/simclr_fashion_mnist \
        --workdir=runs/distill_10pc

The teacher is a classifier fine-tuned on the few labels (a tf_ssl.finetune
workdir, whose saved_model/ is read, or any SavedModel whose serving_default
signature takes "images" and returns "logits"). It is frozen and runs in
inference mode. The student (--backbone, from --init: a pretraining workdir,
an export, a BiT .npz or none) is trained on the WHOLE training split, labels
unused, to match the teacher's softened predictions on the same augmented
view, computed in the same step (docs/recipes.md, "Distillation"):

    loss = (1 - w) * distillation(student, teacher, T) + w * CE(labelled rows)

with w = --distill_label_weight (0 by default, the paper's headline setting;
the labelled rows are the --labels_per_class / --label_fraction subset, and
their cross-entropy is summed over the batch's labelled rows and divided by
the batch size, as the paper's sums). Views are fine-tuning's random-resized
crop and flip; optimisation, schedule, checkpoints, resume after SIGTERM,
TensorBoard, results.json and the exported classifier (finetune's serving
signature) are the fine-tuning run's. Self-distillation: the student has the
teacher's architecture; big-to-small: a smaller --backbone.

Library use: run_distill(config, teacher=<Keras Classifier or path>).
"""

import json
import os
import time

from absl import app
from absl import logging
import keras
import tensorflow as tf

from tf_ssl import checkpoints
from tf_ssl import distribute
from tf_ssl import finetune
from tf_ssl import flags as tf_ssl_flags
from tf_ssl import losses
from tf_ssl import runner
from tf_ssl.data import pipeline
from tf_ssl.data import sources
from tf_ssl.data import subsets

DistillConfig = tf_ssl_flags.DistillConfig
CURVES = ("loss", "agreement", "learning_rate")


# ------------------------------------------------------------------ teacher
class Teacher:
  """A frozen classifier: `teacher(images)` -> {"logits": float32 [B, C]}.

  A plain object, not a Keras layer, so a model holding it never tracks,
  trains or checkpoints its variables.
  """

  def __init__(self, logits_fn, num_classes, description, keep_alive=None):
    self._logits_fn = logits_fn
    self.num_classes = int(num_classes)
    self.description = description
    self._keep_alive = keep_alive  # The loaded SavedModel owns the variables.

  def __call__(self, images, training=False):
    del training  # Always inference mode.
    logits = self._logits_fn(tf.cast(images, tf.float32))
    return {"logits": tf.stop_gradient(tf.cast(logits, tf.float32))}

  @classmethod
  def from_model(cls, model):
    """An in-memory tf_ssl Classifier (e.g. just fine-tuned by a tool)."""
    return cls(lambda images: model(images, training=False)["logits"],
               model.num_classes, f"{model.name} (in memory)", keep_alive=model)

  @classmethod
  def load(cls, path):
    """A finetune workdir (its saved_model/) or an exported classifier.

    Call inside the strategy's scope: the variables are then placed as the
    strategy places them. Raises ValueError naming `path` when it is not a
    classifier SavedModel.
    """
    gfile = tf.io.gfile
    resolved = path
    if gfile.exists(os.path.join(path, "saved_model", "saved_model.pb")):
      resolved = os.path.join(path, "saved_model")
    elif not gfile.exists(os.path.join(path, "saved_model.pb")):
      raise ValueError(
          f"--teacher={path!r} is neither a tf_ssl.finetune workdir with an "
          "exported saved_model/ (run finetune with --export, the default) nor "
          "a SavedModel directory.")
    loaded = tf.saved_model.load(resolved)
    serving = loaded.signatures.get("serving_default")
    outputs = sorted(serving.structured_outputs) if serving is not None else []
    if "logits" not in outputs:
      raise ValueError(
          f"--teacher={path!r} is not a classifier: its serving_default "
          f"signature returns {outputs or 'nothing'}, no 'logits' (a "
          "pretraining export serves features; fine-tune it first).")
    num_classes = serving.structured_outputs["logits"].shape[-1]
    if num_classes is None:
      raise ValueError(f"--teacher={path!r}: its logits have no static class count.")
    return cls(lambda images: serving(images=images)["logits"], num_classes,
               resolved, keep_alive=loaded)


# -------------------------------------------------------------------- model
class Distiller(keras.Model):
  """The student Classifier trained on a frozen teacher's soft labels.

  `call` is the student's. Batches are {"image", "label"}; labels are used
  only by the labelled term (label_weight > 0), where -1 marks an unlabelled
  row. The loss is divided by the replica count in one place, as in
  Classifier, so Keras' summed gradient is the global-batch gradient.
  """

  def __init__(self, student, teacher, temperature=1.0, label_weight=0.0, **kwargs):
    kwargs.setdefault("name", "distiller")
    super().__init__(**kwargs)
    if teacher.num_classes != student.num_classes:
      raise ValueError(f"the teacher has {teacher.num_classes} classes, the student "
                       f"{student.num_classes}.")
    self.student = student
    self._teacher = teacher  # Plain object: never tracked, trained or saved.
    self.temperature = float(temperature)
    self.label_weight = float(label_weight)
    names = ["loss", "distill_loss", "agreement", "teacher_entropy",
             "grad_norm_per_replica"] + (["label_loss"] if self.label_weight else [])
    self._trackers = {n: keras.metrics.Mean(name=n) for n in names}
    self.built = True

  @property
  def teacher(self):
    return self._teacher

  def call(self, images, training=False):
    return self.student(images, training=training)

  @property
  def metrics(self):
    return list(self._trackers.values())

  def compute_loss_and_metrics(self, student_logits, teacher_logits, labels):
    """(loss, metrics) of one replica's rows, not divided by the replicas."""
    loss, metrics = losses.distillation(student_logits, teacher_logits,
                                        self.temperature)
    metrics["distill_loss"] = loss
    if self.label_weight:
      weight = tf.cast(labels >= 0, tf.float32)
      ce = tf.nn.sparse_softmax_cross_entropy_with_logits(
          tf.maximum(tf.cast(labels, tf.int32), 0), tf.cast(student_logits, tf.float32))
      label_loss = tf.reduce_mean(ce * weight)
      metrics["label_loss"] = label_loss
      loss = (1.0 - self.label_weight) * loss + self.label_weight * label_loss
    student = self.student
    if student.weight_decay:
      loss += student.weight_decay * tf.add_n(
          [tf.nn.l2_loss(tf.cast(v, tf.float32)) for v in student.decayed_variables()])
    return loss, metrics

  def train_step(self, data):
    images = data["image"]
    teacher_logits = self._teacher(images)["logits"]
    with tf.GradientTape() as tape:
      logits = self.student(images, training=True)["logits"]
      loss, metrics = self.compute_loss_and_metrics(logits, teacher_logits,
                                                    data["label"])
      # The one division by the replica count: the optimizer sums over replicas.
      scaled = loss / tf.cast(distribute.num_replicas(), tf.float32)
    variables = self.student.trainable_variables
    grads = tape.gradient(scaled, variables)
    self.optimizer.apply_gradients(zip(grads, variables))
    metrics.update(loss=loss, grad_norm_per_replica=tf.linalg.global_norm(grads))
    for name, tracker in self._trackers.items():
      tracker.update_state(metrics[name])
    return {name: t.result() for name, t in self._trackers.items()}


# ---------------------------------------------------------------------- run
def unlabelled_pool(config, train_source):
  """The images distillation trains on: the whole training split, labelled
  only on the fine-tuning subset when the labelled term is on."""
  if not config.distill_label_weight:
    return train_source
  return subsets.keep_subset_labels(train_source, fraction=config.label_fraction,
                                    per_class=config.labels_per_class,
                                    seed=config.subset_seed)


def run_distill(config, teacher=None, strategy=None, train_source=None,
                eval_source=None, verbose=None, return_model=False, flags_text=None):
  """One distillation run: train the student, evaluate both, and save.

  Args:
    config: a DistillConfig (config.teacher is read unless `teacher` is given).
    teacher: None (load config.teacher), a path, or a built Keras Classifier
      (e.g. the model run_finetune returned; it is not changed).
    strategy, train_source, eval_source, verbose, flags_text: as in
      finetune.run_finetune.
    return_model: also return the student Classifier.

  Returns:
    The results dict: "top1", "top5" of the student, "teacher_top1",
    "teacher_top5", "train_steps", "init", "teacher", the plan, timings
    ({"preempted": True, ...} when SIGTERM stopped the run), or (results,
    student) with return_model. Written to <workdir>/results.json with the
    student exported to <workdir>/saved_model as finetune does.
  """
  t_start = time.time()
  previous_policy = keras.mixed_precision.global_policy()
  keras.mixed_precision.set_global_policy(
      "mixed_bfloat16" if config.mixed_precision else "float32")
  try:
    results, model = _run(config, teacher, strategy, train_source, eval_source,
                          verbose, t_start, flags_text)
    return (results, model) if return_model else results
  finally:
    keras.mixed_precision.set_global_policy(previous_policy)


def _run(config, teacher, strategy, train_source, eval_source, verbose, t_start,
         flags_text):
  with runner.preparing():
    r = runner.start(config.workdir, config.strategy, config.tpu, config.seed,
                     config.mixed_precision, strategy=strategy, flags_text=flags_text)
    strategy, replicas = r.strategy, r.replicas
    pipeline.per_replica_batch_size(config.global_batch_size, replicas)
    if train_source is None or eval_source is None:
      read_train, read_eval = finetune.load_sources(config)
      train_source, eval_source = train_source or read_train, eval_source or read_eval
    eval_on_train = sources.same_data(train_source, eval_source)
    if eval_on_train:
      logging.warning("--eval_split=%s reads the training data (%s): top-1 is measured "
                      "on the images the student was distilled on.",
                      config.eval_split, eval_source.name)
    num_classes = finetune.num_classes_of(config, train_source, eval_source)
    with strategy.scope():
      if teacher is None or isinstance(teacher, str):
        teacher = Teacher.load(teacher or config.teacher)
      elif not isinstance(teacher, Teacher):
        teacher = Teacher.from_model(teacher)
    if teacher.num_classes != num_classes:
      raise ValueError(
          f"--teacher={teacher.description}: {teacher.num_classes} classes, but "
          f"--dataset={config.dataset} has {num_classes}; distil a teacher "
          "fine-tuned on this dataset.")
    pool = unlabelled_pool(config, train_source)
    plan = finetune.make_plan(config, pool, num_classes)
    views = finetune.views_for(plan)
    total_steps = plan["total_steps"]

    with strategy.scope():
      student = finetune.build_model(config, num_classes)
      model = Distiller(student, teacher, config.distill_temperature,
                        config.distill_label_weight)
      optimizer, schedule = finetune.build_optimizer(config, plan)
      model.compile(optimizer=optimizer, steps_per_execution=config.steps_per_execution,
                    jit_compile=config.jit_compile)
      optimizer.build(student.trainable_variables)
    logging.info("distil %s into %s: %s student parameters, %d replicas, %d steps, %s",
                 teacher.description, config.backbone, f"{student.count_params():,}",
                 replicas, total_steps, plan)

    checkpoint = checkpoints.make_checkpoint(student, optimizer)
    manager, init_info = runner.restore_or_init(
        r, checkpoint, lambda: finetune._init(config, student),  # pylint: disable=protected-access
        keep=config.keep_checkpoints)
    start_step = int(optimizer.iterations.numpy())
    train_data = pipeline.finetune_dataset(
        strategy, pool, config.global_batch_size, views, seed=config.seed,
        start_step=start_step, deterministic=config.deterministic,
        cache=config.cache, shuffle_buffer=min(10_000, pool.num_examples))

  preempted, last_logs = runner.fit(
      r, model, train_data, total_steps=total_steps,
      steps_per_pass=-(-pool.num_examples // config.global_batch_size),
      global_batch_size=config.global_batch_size, schedule=schedule,
      manager=manager, checkpoint_every_steps=config.checkpoint_every_steps,
      verbose=verbose)
  step = int(optimizer.iterations.numpy())
  if preempted:
    return {"preempted": True, "train_steps": step}, student
  train_seconds = time.time() - t_start

  eval_batch = finetune.eval_batch_size(config, replicas)
  results = finetune.evaluate(student, strategy, eval_source, eval_batch, views.eval,
                              plan["crop_size"])
  scored = finetune.evaluate(teacher, strategy, eval_source, eval_batch, views.eval,
                             plan["crop_size"])
  results.update(
      teacher_top1=scored["top1"], teacher_top5=scored["top5"],
      teacher=teacher.description, train_steps=step, init=init_info, plan=plan,
      eval_on_train=eval_on_train, distill_temperature=config.distill_temperature,
      distill_label_weight=config.distill_label_weight,
      labels_per_class=config.labels_per_class, label_fraction=config.label_fraction,
      final_train_loss=last_logs.get("loss"),
      final_agreement=last_logs.get("agreement"),
      train_seconds=round(train_seconds, 1),
      wall_seconds=round(time.time() - t_start, 1))
  finetune.save_outputs(r, config, results, step, student, CURVES)
  logging.info("student top-1 %.4f, teacher top-1 %.4f", results["top1"],
               results["teacher_top1"])
  return results, student


def main(argv):
  del argv
  with runner.user_errors("tf_ssl.distill"):
    with runner.preparing():
      config = tf_ssl_flags.distill_config()
    results = run_distill(config, flags_text=tf_ssl_flags.flags_as_text())
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  app.run(main, flags_parser=tf_ssl_flags.parse_command_line)
