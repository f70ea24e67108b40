import numpy as np
import pytest
import tensorflow as tf

from tf_ssl import distribute
from replicas import run_sharded


def test_unknown_strategy_names_the_flag():
  with pytest.raises(ValueError, match="--strategy='gpu_pod'"):
    distribute.get_strategy("gpu_pod")


def test_unreachable_tpu_names_the_flag():
  with pytest.raises(ValueError, match="--tpu"):
    distribute.get_strategy("tpu", tpu="no-such-tpu")


def test_default_and_auto_on_cpu():
  assert distribute.get_strategy("default").num_replicas_in_sync == 1
  assert distribute.get_strategy("auto", tpu="no-such-tpu").num_replicas_in_sync == 1


def test_concat_outside_replica_context_is_identity():
  x = tf.constant([[1.0, 2.0]])
  assert distribute.cross_replica_concat(x) is x


def test_concat_in_replica_order(strategy):
  n = strategy.num_replicas_in_sync
  x = tf.reshape(tf.range(8 * 3, dtype=tf.float32), (8, 3))

  def gathered(ctx):
    return tf.split(x, n)[ctx.replica_id_in_sync_group]

  @tf.function
  def run():
    local = strategy.experimental_distribute_values_from_function(gathered)
    return strategy.run(distribute.cross_replica_concat, args=(local,))

  for result in strategy.experimental_local_results(run()):
    np.testing.assert_array_equal(result.numpy(), x.numpy())


def test_concat_gradient_reaches_the_producing_replica(strategy):
  # Each replica weights the gathered rows differently; the gradient of row g
  # must be the sum over replicas of their weights for g, which only holds if
  # gradients flow back through the gather to the replica that owns row g.
  n = strategy.num_replicas_in_sync
  x = tf.random.stateless_normal((8, 3), seed=(1, 2))
  w = tf.random.stateless_normal((8, 3), seed=(3, 4))

  def loss(xl):
    r = tf.cast(distribute.replica_id(), tf.float32)
    return tf.reduce_sum(distribute.cross_replica_concat(xl) * w * (r + 1.0))

  _, (grad,) = run_sharded(strategy, loss, x)
  # sum over replicas r of (r+1) * w / n  (run_sharded divides by n)
  expected = w * sum(r + 1.0 for r in range(n)) / n
  np.testing.assert_allclose(grad.numpy(), expected.numpy(), rtol=1e-6)


def test_no_local_tpu_names_the_flag():
  with pytest.raises(ValueError, match="--strategy=tpu"):
    distribute.get_strategy("tpu", tpu="local")


def test_single_process_strategies_are_the_chief(strategy_2):
  assert distribute.worker_info(tf.distribute.get_strategy()) == (True, 0)
  assert distribute.worker_info(distribute.get_strategy("default")) == (True, 0)
  # A MirroredStrategy built without TF_CONFIG: one process, no cluster.
  assert distribute.worker_info(strategy_2) == (True, 0)


class _FakeResolver:
  """The part of a TFConfigClusterResolver that worker_info reads."""

  def __init__(self, task_type, task_id, cluster):
    self.task_type, self.task_id = task_type, task_id
    self._cluster = cluster

  def cluster_spec(self):
    return tf.train.ClusterSpec(self._cluster)


class _FakeStrategy:

  def __init__(self, task_type, task_id, cluster):
    self.cluster_resolver = _FakeResolver(task_type, task_id, cluster)


WORKERS = {"worker": ["localhost:1", "localhost:2"]}
WITH_CHIEF = {"chief": ["localhost:0"], **WORKERS}


@pytest.mark.parametrize("task_type, task_id, cluster, expected", [
    ("worker", 0, WORKERS, (True, 0)),     # no "chief" task: worker 0 is it
    ("worker", 1, WORKERS, (False, 1)),
    ("chief", 0, WITH_CHIEF, (True, 0)),
    ("worker", 0, WITH_CHIEF, (False, 0)),  # a "chief" task exists
    ("worker", 1, WITH_CHIEF, (False, 1)),
    (None, None, {}, (True, 0)),            # a resolver without a task
], ids=["worker0", "worker1", "chief", "worker0_with_chief",
        "worker1_with_chief", "no_task"])
def test_worker_info_chief_convention(task_type, task_id, cluster, expected):
  fake = _FakeStrategy(task_type, task_id, cluster)
  assert distribute.worker_info(fake) == expected
