"""Keras callbacks of the run machinery: checkpoints that survive preemption,
a guard against non-finite losses, throughput, and TensorBoard scalars."""

import json
import math
import signal
import sys
import time

import keras
import tensorflow as tf
from absl import logging


class CheckpointAndPreemption(keras.callbacks.Callback):
  """Saves every `every_steps` steps, at the end, and on SIGTERM.

  SIGTERM (TPU VM maintenance, a scheduler's preemption) only sets a flag;
  the checkpoint is written at the next step boundary, where the model and
  optimizer state are consistent, and training stops. Rerunning the same
  command restores the latest checkpoint.

  In a multi-worker cluster a save is collective, so the workers first agree
  at every step boundary whether any of them got SIGTERM (`any_worker`, e.g.
  tf_ssl.distribute.any_worker(strategy)); then all save the same step and
  stop together, even when the signal reached only one of them.
  """

  def __init__(self, manager, step_variable, every_steps, any_worker=bool):
    super().__init__()
    self.manager = manager
    self.step = step_variable
    self.every_steps = every_steps
    self.any_worker = any_worker
    self.preempted = False
    self._last_saved = None
    self._previous_handler = None

  def _on_sigterm(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM: saving a checkpoint at the next step boundary.")
    self.preempted = True

  def _save(self):
    step = int(self.step.numpy())
    if step != self._last_saved:
      path = self.manager.save(checkpoint_number=step)
      self._last_saved = step
      logging.info("Saved checkpoint %s", path)

  def on_train_begin(self, logs=None):
    self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
    # The starting step is either 0 or a restored checkpoint: nothing to save.
    self._last_saved = int(self.step.numpy())

  def on_train_batch_end(self, batch, logs=None):
    if self.any_worker(self.preempted):
      if not self.preempted:
        logging.warning("Another worker got SIGTERM: saving a checkpoint.")
      self.preempted = True
      self._save()
      self.model.stop_training = True
    elif int(self.step.numpy()) - self._last_saved >= self.every_steps:
      self._save()

  def on_train_end(self, logs=None):
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)
    self._save()


class NonFiniteGuard(keras.callbacks.Callback):
  """Stops with an error naming the step when the loss or a gradient norm is
  not finite. It raises before any later checkpoint is written, so the last
  good checkpoint stays the latest one."""

  def __init__(self, step_variable, keys=("loss", "grad_norm_per_replica")):
    super().__init__()
    self.step = step_variable
    self.keys = keys

  def on_train_batch_end(self, batch, logs=None):
    for key in self.keys:
      value = (logs or {}).get(key)
      if value is not None and not math.isfinite(float(value)):
        raise FloatingPointError(
            f"{key} is {float(value)} at step {int(self.step.numpy())}. The last "
            "good checkpoint is kept; lower --learning_rate or check the data.")


def _hms(seconds):
  """Seconds as H:MM:SS, hours unbounded (a week-long run is 168:00:00)."""
  seconds = int(round(seconds))
  return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def keras_verbosity(verbose=None):
  """model.fit's verbose: the given one, else a progress bar (1) on a
  terminal and one line per epoch (2) elsewhere."""
  if verbose is not None:
    return verbose
  return 1 if sys.stdout.isatty() else 2


def progress_log_every(total_steps, verbose, lines=20):
  """Throughput's log_every_steps for a run of total_steps: about `lines`
  progress lines with Keras' one-line-per-epoch output (verbose 2), none
  with its progress bar (1, which shows the same) or in silence (0)."""
  return max(1, total_steps // lines) if verbose == 2 else 0


class Throughput(keras.callbacks.Callback):
  """Adds images/s (one image = all its views) to the logs the progress bar
  and the summaries show, and writes scalars to TensorBoard.

  With `log_every_steps` and `total_steps` it also logs a progress line
  (step, percent, images/s, loss, ETA) each time the step crosses a
  multiple of log_every_steps: the progress of a run whose output is a log
  file, where Keras prints one line per epoch.
  """

  def __init__(self, global_batch_size, step_variable, learning_rate_fn,
               writer=None, every_steps=50, history_path=None,
               total_steps=None, log_every_steps=0):
    super().__init__()
    self.global_batch_size = global_batch_size
    self.step = step_variable
    self.learning_rate_fn = learning_rate_fn
    self.writer = writer
    self.every_steps = every_steps
    self.history_path = history_path
    self._t0 = None
    self._step0 = None
    self._last_written = -1
    self.total_steps = total_steps
    self.log_every_steps = log_every_steps
    self._progress_t0 = None
    self._progress_step0 = None

  def on_train_batch_begin(self, batch, logs=None):
    if self._t0 is None:
      self._t0, self._step0 = time.perf_counter(), int(self.step.numpy())
      self._progress_t0, self._progress_step0 = self._t0, self._step0

  def on_train_batch_end(self, batch, logs=None):
    step = int(self.step.numpy())
    now = time.perf_counter()
    elapsed = now - self._t0
    if step > self._step0 and elapsed > 0:
      logs["images_per_sec"] = (step - self._step0) * self.global_batch_size / elapsed
    if self.log_every_steps and self.total_steps and (
        step // self.log_every_steps > self._progress_step0 // self.log_every_steps):
      self.log_progress(step, now, logs)
    if step // self.every_steps > self._last_written // self.every_steps:
      self._last_written = step
      self._t0, self._step0 = now, step
      self.write(step, logs)

  def log_progress(self, step, now, logs):
    """One line of progress; the rate is that since the previous line."""
    rate = (step - self._progress_step0) / max(now - self._progress_t0, 1e-9)
    self._progress_t0, self._progress_step0 = now, step
    eta = max(self.total_steps - step, 0) / rate
    loss = (logs or {}).get("loss")
    logging.info("step %d/%d (%.0f%%): %.0f images/s, loss %s, ETA %s", step,
                 self.total_steps, 100. * step / self.total_steps,
                 rate * self.global_batch_size,
                 "?" if loss is None else f"{float(loss):.4f}",
                 _hms(eta))

  def write(self, step, logs):
    scalars = {k: float(v) for k, v in (logs or {}).items()}
    schedules = self.learning_rate_fn
    if not isinstance(schedules, dict):
      schedules = {"learning_rate": schedules}
    for name, fn in schedules.items():
      scalars[name] = float(fn(step))
    if self.writer is not None:
      with self.writer.as_default(step=step):
        for name, value in scalars.items():
          tf.summary.scalar(name, value)
      self.writer.flush()
    if self.history_path:
      with tf.io.gfile.GFile(self.history_path, "a") as f:
        f.write(json.dumps(dict(scalars, step=step)) + "\n")


class StopAtStep(keras.callbacks.Callback):
  """Ends training at exactly `last_step`, whatever epoch a resumed run is in."""

  def __init__(self, step_variable, last_step):
    super().__init__()
    self.step = step_variable
    self.last_step = last_step

  def on_train_batch_end(self, batch, logs=None):
    if int(self.step.numpy()) >= self.last_step:
      self.model.stop_training = True


class KnnMonitor(keras.callbacks.Callback):
  """k-NN top-1 of the backbone's features every `every_steps` steps.

  A cheap running measure of representation quality beside the online probe:
  `evaluate_fn()` returns the accuracy (the trainer binds it to a fixed
  labelled bank and query set), which goes to the logs (so the progress bar
  and history show it) and to TensorBoard as eval/knn_top1.
  """

  def __init__(self, evaluate_fn, step_variable, every_steps, writer=None):
    super().__init__()
    self.evaluate_fn = evaluate_fn
    self.step = step_variable
    self.every_steps = every_steps
    self.writer = writer
    self.history = []  # (step, accuracy)
    self._last = None

  def on_train_begin(self, logs=None):
    # A resumed run already evaluated at its start step (this callback runs
    # before the checkpoint is written).
    self._last = int(self.step.numpy())

  def on_train_batch_end(self, batch, logs=None):
    # With --steps_per_execution a "batch" is several steps, so the step can
    # jump over a multiple of every_steps: evaluate when one was crossed.
    step = int(self.step.numpy())
    last = step - 1 if self._last is None else self._last
    if step // self.every_steps <= last // self.every_steps:
      return
    self._last = step
    accuracy = float(self.evaluate_fn())
    self.history.append((step, accuracy))
    logging.info("step %d: k-NN top-1 %.4f (periodic, fixed subsets)", step,
                 accuracy)
    if logs is not None:
      logs["knn_top1"] = accuracy
    if self.writer is not None:
      with self.writer.as_default(step=step):
        tf.summary.scalar("eval/knn_top1", accuracy)
      self.writer.flush()
