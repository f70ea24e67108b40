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
