"""tf_ssl.callbacks driven directly, step by step, as model.fit would."""

import tensorflow as tf

from tf_ssl import callbacks


def _drive(callback, step, steps):
  """Advances `step` to each of `steps` and ends a batch there."""
  callback.on_train_begin()
  for s in steps:
    step.assign(s)
    callback.on_train_batch_end(0, logs={})


def test_knn_monitor_evaluates_when_an_execution_crosses_a_multiple():
  # steps_per_execution=3 and every 4 steps: the step goes 3, 6, 9, 12 and
  # never lands on 4 or 8, but each execution that crosses a multiple of 4
  # evaluates once.
  step = tf.Variable(0, dtype=tf.int64)
  monitor = callbacks.KnnMonitor(lambda: 0.5, step, every_steps=4)
  _drive(monitor, step, [3, 6, 9, 12, 15])
  assert [s for s, _ in monitor.history] == [6, 9, 12]


def test_knn_monitor_does_not_repeat_the_evaluation_of_a_resumed_step():
  step = tf.Variable(8, dtype=tf.int64)  # resumed from a checkpoint at 8
  monitor = callbacks.KnnMonitor(lambda: 0.5, step, every_steps=4)
  _drive(monitor, step, [9, 10, 11, 12])
  assert [s for s, _ in monitor.history] == [12]


def test_throughput_logs_progress_with_an_eta(monkeypatch):
  lines = []
  monkeypatch.setattr(callbacks.logging, "info", lambda fmt, *a: lines.append(fmt % a))
  clock = iter(range(0, 1000, 2))  # 2 s between batches
  monkeypatch.setattr(callbacks.time, "perf_counter", lambda: float(next(clock)))
  step = tf.Variable(0, dtype=tf.int64)
  throughput = callbacks.Throughput(8, step, lambda s: 0.1, every_steps=1000,
                                    total_steps=40, log_every_steps=10)
  throughput.on_train_begin()
  for s in range(5, 45, 5):  # 5 steps per execution, 2 s each
    throughput.on_train_batch_begin(0)
    step.assign(s)
    throughput.on_train_batch_end(0, logs={"loss": 2.5})
  # Every 10 steps: 2.5 steps/s = 20 images/s; 10 steps left at step 30 are 4 s.
  assert len(lines) == 4, lines
  assert lines[0].startswith("step 10/40 (25%): 20 images/s, loss 2.5000")
  assert lines[2].endswith("ETA 00:00:04"), lines[2]
  assert lines[3].endswith("ETA 00:00:00"), lines[3]


def test_eta_format_keeps_counting_hours_past_a_day():
  assert callbacks._hms(4) == "00:00:04"  # pylint: disable=protected-access
  assert callbacks._hms(26 * 3600 + 61) == "26:01:01"  # pylint: disable=protected-access


class _Manager:
  def __init__(self):
    self.saved = []

  def save(self, checkpoint_number):
    self.saved.append(checkpoint_number)
    return f"ckpt-{checkpoint_number}"


class _Model:
  stop_training = False


def test_a_sigterm_on_another_worker_saves_and_stops_this_one():
  # The workers agree at each step boundary; here another worker's SIGTERM
  # arrives before step 6 and this process never got one.
  step = tf.Variable(0, dtype=tf.int64)
  elsewhere = {"step": 6}
  manager = _Manager()
  saver = callbacks.CheckpointAndPreemption(
      manager, step, every_steps=4,
      any_worker=lambda flag: flag or int(step.numpy()) >= elsewhere["step"])
  saver.set_model(_Model())
  saver.on_train_begin()
  try:
    for s in (2, 4, 6):
      step.assign(s)
      saver.on_train_batch_end(0)
  finally:
    saver.on_train_end()
  assert manager.saved == [4, 6]
  assert saver.preempted and saver.model.stop_training


def test_progress_lines_only_replace_the_missing_progress_bar():
  assert callbacks.progress_log_every(3042, verbose=2) == 152  # ~20 lines
  assert callbacks.progress_log_every(7, verbose=2) == 1
  assert callbacks.progress_log_every(3042, verbose=1) == 0  # the bar shows it
  assert callbacks.progress_log_every(3042, verbose=0) == 0  # silent tools
