"""SimCLRv2 distillation: the loss against NumPy and on 1/2/4 replicas, a
whole distillation step equal on 1 and 4 replicas with the teacher frozen,
the labelled pool, a run with export and resume, and the teacher's errors."""

import dataclasses
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import mirrored
from replicas import run_sharded
from tf_ssl import distill
from tf_ssl import export
from tf_ssl import finetune
from tf_ssl import flags
from tf_ssl import losses
from tf_ssl.data import sources
from tf_ssl.data import subsets
from tf_ssl.models.classifier import Classifier

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 8
CLASSES = 6
BATCH = 8


def _arrays(n, seed, classes=CLASSES):
  """Tiny images whose class shows in one bright channel."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, classes, n)
  images = rng.integers(0, 100, (n, SIZE, SIZE, 3)).astype(np.uint8)
  for c in range(classes):
    images[labels == c, :, :, c % 3] = 155 + 25 * (c // 3 % 4)
  return images, labels


def _source(n, seed, classes=CLASSES):
  images, labels = _arrays(n, seed, classes)
  return sources.from_arrays(images, labels, classes)


def _config(**kwargs):
  base = dict(backbone="resnet18x0.25", sync_bn=True, small_image_stem=True, image_size=SIZE,
              global_batch_size=BATCH, train_steps=4, learning_rate=0.05,
              teacher="unused", export=False)
  base.update(kwargs)
  return flags.DistillConfig(**base)


class TinyBackbone(keras.Model):
  """Conv-BN(synchronised)-ReLU-pool: a fast network whose BN statistics
  still span the replicas."""
  feature_dim = 8
  blocks = ()

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.conv = keras.layers.Conv2D(8, 3, use_bias=False, name="conv")
    self.bn = keras.layers.BatchNormalization(synchronized=True, momentum=0.9, name="bn")
    self.pool = keras.layers.GlobalAveragePooling2D(name="pool")

  def call(self, images, training=False):
    stem = tf.nn.relu(self.bn(self.conv(images), training=training))
    return {"stem": stem, "features": self.pool(stem)}


def _tiny(seed, weight_decay=0.0):
  keras.utils.set_random_seed(seed)
  model = Classifier(TinyBackbone(), CLASSES, zero_init_head=False,
                     weight_decay=weight_decay)
  model(tf.zeros((1, SIZE, SIZE, 3)))
  return model


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
  """A fine-tuning workdir whose saved_model/ is a tiny exported classifier."""
  root = tmp_path_factory.mktemp("tiny_teacher")
  model = _tiny(7)
  model.head.kernel.assign(np.random.default_rng(7).normal(
      0, 2.0, model.head.kernel.shape).astype("float32"))
  finetune.export_classifier(model, str(root / "saved_model"))
  return str(root)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
  """Tiny teachers (the student, resnet18x0.25, is bigger: any architecture
  teaches any): a fine-tuning workdir holding a 6-class classifier's
  saved_model/, a 4-class classifier export, and a backbone export (not a
  classifier)."""
  root = tmp_path_factory.mktemp("teachers")
  model = _tiny(1)
  finetune.export_classifier(model, str(root / "ft6" / "saved_model"))
  four = Classifier(TinyBackbone(), 4)
  four(tf.zeros((1, SIZE, SIZE, 3)))
  finetune.export_classifier(four, str(root / "ft4"))
  backbone = TinyBackbone()
  backbone(tf.zeros((1, SIZE, SIZE, 3)))
  export.export_saved_model(backbone, str(root / "backbone"))
  return dict(model=model, workdir=str(root / "ft6"), four=str(root / "ft4"),
              backbone=str(root / "backbone"))


# --------------------------------------------------------------------- loss
def _numpy_distillation(s, t, temperature):
  def softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)
  p_t, p_s = softmax(t / temperature), softmax(s / temperature)
  loss = np.mean(-np.sum(p_t * np.log(p_s), axis=1))
  grad = (p_s - p_t) / temperature / len(s)
  return loss, grad


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_loss_and_gradient_against_numpy(temperature):
  rng = np.random.default_rng(0)
  s = rng.normal(0, 2, (12, 5))
  t = rng.normal(0, 2, (12, 5))
  student = tf.constant(s, tf.float32)
  teacher = tf.constant(t, tf.float32)
  with tf.GradientTape(persistent=True) as tape:
    tape.watch([student, teacher])
    loss, metrics = losses.distillation(student, teacher, temperature)
  want_loss, want_grad = _numpy_distillation(s, t, temperature)
  np.testing.assert_allclose(loss.numpy(), want_loss, rtol=1e-5)
  np.testing.assert_allclose(tape.gradient(loss, student).numpy(), want_grad,
                             rtol=1e-4, atol=1e-6)
  assert tape.gradient(loss, teacher) is None, "no gradient into the teacher"
  agree = np.mean(s.argmax(1) == t.argmax(1))
  assert float(metrics["agreement"]) == pytest.approx(agree)


def test_loss_of_identical_logits_is_the_teachers_entropy():
  t = tf.constant([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
  loss, metrics = losses.distillation(t, t)
  np.testing.assert_allclose(loss.numpy(), metrics["teacher_entropy"].numpy(), rtol=1e-6)
  with pytest.raises(ValueError, match="temperature must be > 0"):
    losses.distillation(t, t, 0.0)
  with pytest.raises(ValueError, match="same shape"):
    losses.distillation(t, t[:, :2])


def test_loss_same_on_1_2_4_replicas():
  rng = np.random.default_rng(1)
  s = tf.constant(rng.normal(0, 2, (8, 5)), tf.float32)
  t = tf.constant(rng.normal(0, 2, (8, 5)), tf.float32)
  # (+ 0 * b: run_sharded differentiates every input; the teacher has none.)
  fn = lambda a, b: losses.distillation(a, b, 0.7)[0] + 0.0 * tf.reduce_sum(b)
  want_loss, want_grads = run_sharded(mirrored(1), fn, s, t)
  for n in (2, 4):
    loss, grads = run_sharded(mirrored(n), fn, s, t)
    np.testing.assert_allclose(loss.numpy(), want_loss.numpy(), rtol=1e-6)
    np.testing.assert_allclose(grads[0].numpy(), want_grads[0].numpy(),
                               rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------- step
def _distil_steps(strategy, teacher_path, initial, steps=2):
  """`steps` Distiller fit steps of fixed global batches; replica r gets rows
  [r*b, (r+1)*b). Half the rows unlabelled, the labelled term on."""
  rng = np.random.default_rng(5)
  images = rng.uniform(size=(steps * BATCH, SIZE, SIZE, 3)).astype("float32")
  labels = rng.integers(0, CLASSES, steps * BATCH)
  labels[::2] = -1
  per_replica = BATCH // strategy.num_replicas_in_sync

  def dataset_fn(ctx):
    del ctx
    ds = tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})
    return ds.batch(per_replica, drop_remainder=True)

  with strategy.scope():
    teacher = distill.Teacher.load(teacher_path)
    before = [np.array(v.numpy()) for v in teacher._keep_alive.variables]  # pylint: disable=protected-access
    student = _tiny(0, weight_decay=1e-3)
    student.set_weights(initial)
    model = distill.Distiller(student, teacher, temperature=2.0, label_weight=0.3)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
  data = strategy.distribute_datasets_from_function(dataset_fn)
  history = model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0)
  after = [np.array(v.numpy()) for v in teacher._keep_alive.variables]  # pylint: disable=protected-access
  assert len(before) == 7  # conv kernel, 4 BN, head kernel and bias
  for a, b in zip(before, after):
    np.testing.assert_array_equal(a, b, err_msg="the teacher changed")
  return student, history.history


def test_distillation_steps_same_on_1_and_4_replicas_and_the_teacher_frozen(tiny_teacher):
  initial = _tiny(0).get_weights()
  s1, h1 = _distil_steps(mirrored(1), tiny_teacher, initial)
  s4, h4 = _distil_steps(mirrored(4), tiny_teacher, initial)
  moved = [i for i, (a, b) in enumerate(zip(initial, s1.get_weights()))
           if not np.allclose(a, b)]
  assert len(moved) >= len(initial) // 2, "the steps should change most variables"
  # Float32 rounding differs with the replica count; a gradient off by the
  # replica count would put a variable's difference near half its movement.
  for w, a, b, a0 in zip(s1.weights, s1.get_weights(), s4.get_weights(), initial):
    assert np.abs(a - b).max() <= 2e-5 + 1e-2 * np.abs(a - a0).max(), w.path
  for key in ("loss", "distill_loss", "label_loss", "agreement"):
    np.testing.assert_allclose(h1[key], h4[key], rtol=1e-5, err_msg=key)


# ---------------------------------------------------------------- data, run
def test_labelled_pool_keeps_the_subsets_labels_only():
  source = _source(60, 3)
  pool = subsets.keep_subset_labels(source, per_class=2, seed=4)
  chosen = subsets.label_subset_indices(source.labels(), per_class=2, seed=4)
  want = np.full(60, -1)
  want[chosen] = source.labels()[chosen]
  np.testing.assert_array_equal(pool.labels(), want)
  read = np.concatenate([b["label"] for b in pool.records().batch(64).as_numpy_iterator()])
  np.testing.assert_array_equal(read, want)
  assert pool.num_examples == 60


def test_run_exports_the_student_and_resumes(teachers, tmp_path):
  workdir = str(tmp_path / "distil")
  config = _config(teacher=teachers["workdir"], workdir=workdir, export=True,
                   train_steps=4, checkpoint_every_steps=2)
  results = distill.run_distill(config, train_source=_source(24, 0),
                                eval_source=_source(10, 1), verbose=0)
  assert results["train_steps"] == 4 and results["eval_examples"] == 10
  assert results["init"]["kind"] == "none"
  assert results["teacher"].endswith("saved_model")
  # The teacher scored through the same evaluation as the student.
  scored = finetune.evaluate(teachers["model"], tf.distribute.get_strategy(),
                             _source(10, 1), 256, finetune.CropFlip(SIZE).eval, SIZE)
  assert results["teacher_top1"] == pytest.approx(scored["top1"])
  loaded = tf.saved_model.load(results["saved_model"])
  out = loaded.signatures["serving_default"](images=tf.zeros((2, SIZE, SIZE, 3)))
  assert out["logits"].shape == (2, CLASSES)
  # The same command again finds the finished run's checkpoint.
  again = distill.run_distill(dataclasses.replace(config, export=False),
                              train_source=_source(24, 0), eval_source=_source(10, 1),
                              verbose=0)
  assert again["init"]["kind"] == "resumed" and again["top1"] == results["top1"]


def test_in_memory_teacher_with_the_labelled_term(teachers):
  config = _config(distill_label_weight=0.5, labels_per_class=2, train_steps=2)
  results = distill.run_distill(config, teacher=teachers["model"],
                                train_source=_source(24, 0), eval_source=_source(10, 1),
                                verbose=0)
  assert results["plan"]["train_examples"] == 24, "every image, labelled or not"
  assert results["distill_label_weight"] == 0.5


def test_bad_teachers_and_options_are_errors(teachers):
  train, test = _source(16, 0), _source(8, 1)
  with pytest.raises(ValueError, match="is not a classifier.*'features'"):
    distill.run_distill(_config(teacher=teachers["backbone"]), train_source=train,
                        eval_source=test)
  with pytest.raises(ValueError, match="4 classes, but --dataset=fashion_mnist has 6"):
    distill.run_distill(_config(teacher=teachers["four"]), train_source=train,
                        eval_source=test)
  with pytest.raises(ValueError, match="neither a tf_ssl.finetune workdir"):
    distill.run_distill(_config(teacher="/no/such/dir"), train_source=train,
                        eval_source=test)
  with pytest.raises(ValueError, match="--distill_label_weight=0.5: the labelled term"):
    _config(distill_label_weight=0.5)
  with pytest.raises(ValueError, match="--labels_per_class=10: distillation uses labels"):
    _config(labels_per_class=10)
  with pytest.raises(ValueError, match="--teacher=None: give the fine-tuned teacher"):
    _config(teacher=None)


def test_command_line_bad_teacher_is_one_line(teachers, tmp_path, image_folder):
  result = subprocess.run(
      [sys.executable, "-m", "tf_ssl.distill", f"--workdir={tmp_path / 'w'}",
       f"--dataset=folder:{image_folder}", "--backbone=resnet18x0.25", "--image_size=8",
       "--train_steps=2", f"--teacher={teachers['backbone']}"],
      cwd=REPO, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), capture_output=True,
      text=True, timeout=300)
  assert result.returncode != 0
  assert "is not a classifier" in result.stderr
  assert "Traceback" not in result.stderr, result.stderr[-2000:]
