"""Choosing a tf.distribute strategy, the collective the losses need, and
the local update of replicated state (targets, queues).

Every strategy is driven the same way (``strategy.run`` inside one
``tf.function``), so the code that runs on one CPU is the code that runs on a
TPU pod; only ``get_strategy`` knows the difference.
"""

from absl import logging
import keras
import tensorflow as tf

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu", "auto")


def _tpu_strategy(tpu):
  """Connects to a TPU ("local" on a TPU VM, a name or a grpc:// address)."""
  try:
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
    if tpu not in (None, "", "local"):
      tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
  # The resolver fails in several ways off a TPU (no metadata server, no TPU
  # devices, a bad address); each means the same thing to the user.
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        f"--strategy=tpu: no TPU answered at --tpu={tpu!r} ({e}). On a TPU VM "
        "pass --tpu=local; elsewhere pass the TPU's name, or choose "
        "--strategy=auto to fall back to GPUs or the CPU.") from e
  return tf.distribute.TPUStrategy(resolver)


class _MultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
  """MultiWorkerMirroredStrategy whose `reduce` takes what Keras 3 `fit` passes.

  Keras 3.15's TensorFlow trainer calls `strategy.reduce` in two ways that
  MirroredStrategy accepts and the collective strategy rejects, so `fit`
  fails on two or more workers before its first step:
  - it reduces the whole first batch, a dict here, to build the model
    ("Attempt to convert a value ({'views': PerReplica...}) to a Tensor";
    keras-team/keras#20329);
  - it averages each scalar step output with axis=0 ("Invalid reduction
    dimension 0 for input with 0 dimensions"; tensorflow/tensorflow#72388).
  Here each leaf of a nest is reduced on its own, and a scalar (which has no
  axis 0) is averaged over replicas only: what MirroredStrategy computes.
  """

  def reduce(self, reduce_op, value, axis=None):
    parent = super()

    def leaf(v):
      local = self.experimental_local_results(v)[0]
      scalar = tf.TensorShape(getattr(local, "shape", ())).rank == 0
      return parent.reduce(reduce_op, v, axis=None if scalar else axis)

    return tf.nest.map_structure(leaf, value)


def get_strategy(name="auto", tpu=None):
  """Returns the tf.distribute strategy called `name`.

  Args:
    name: one of "default" (one device, no distribution), "mirrored" (all
      local GPUs, or the CPU), "multi_worker" (MultiWorkerMirroredStrategy;
      the cluster comes from TF_CONFIG; creating it waits until every worker
      has created it), "tpu" (TPUStrategy on `tpu`) or
      "auto" (a TPU if one answers, else every local GPU, else the default).
      With "multi_worker", a worker that dies is noticed by TensorFlow's
      coordination service (10 s heartbeat timeout in TF 2.21) or by the
      broken connection of a collective: the others raise
      tf.errors.UnavailableError naming the dead task, within 5-20 s
      measured (tests/test_multi_worker.py), instead of waiting forever.
      A worker that never starts keeps the others waiting in this call (TF's
      start-up barrier gives up after one hour).
    tpu: the TPU to connect to for "tpu" and "auto": "local" on a TPU VM, a
      TPU name, or a grpc:// address. None means "local".

  Returns:
    A tf.distribute.Strategy.

  Raises:
    ValueError: for an unknown name or an unreachable TPU, naming the flag.
  """
  if name not in STRATEGIES:
    raise ValueError(f"--strategy={name!r} is not one of {', '.join(STRATEGIES)}.")
  tpu = tpu or "local"
  if name == "default":
    return tf.distribute.get_strategy()
  if name == "mirrored":
    return tf.distribute.MirroredStrategy()
  if name == "multi_worker":
    return _MultiWorkerMirroredStrategy()
  if name == "tpu":
    return _tpu_strategy(tpu)
  # auto
  try:
    strategy = _tpu_strategy(tpu)
    logging.info("--strategy=auto: using the TPU at %s", tpu)
    return strategy
  except ValueError:
    pass
  gpus = tf.config.list_logical_devices("GPU")
  if gpus:
    logging.info("--strategy=auto: mirroring over %d GPU(s)", len(gpus))
    return tf.distribute.MirroredStrategy([g.name for g in gpus])
  logging.info("--strategy=auto: no TPU or GPU; using the default strategy")
  return tf.distribute.get_strategy()


def num_replicas():
  """Replicas in sync in the current context (1 outside any strategy)."""
  return tf.distribute.get_strategy().num_replicas_in_sync


def replica_id():
  """This replica's index as an int32 tensor (0 outside a replica context)."""
  ctx = tf.distribute.get_replica_context()
  if ctx is None:
    return tf.constant(0, tf.int32)
  return tf.cast(ctx.replica_id_in_sync_group, tf.int32)


def cross_replica_concat(x):
  """Concatenates `x` over all replicas along axis 0, in replica order.

  Differentiable: the gradient that any replica sends to a gathered row is
  summed over replicas and reaches the replica that produced the row, so a
  loss computed on gathered negatives trains every replica's encoder as the
  same loss on one device would.

  Outside a replica context (in cross-replica context or with no strategy)
  and with one replica, returns `x` unchanged.
  """
  ctx = tf.distribute.get_replica_context()
  if ctx is None or ctx.num_replicas_in_sync == 1:
    return x
  return ctx.all_gather(x, axis=0)


def update_replicated(fn, variables, *args):
  """Runs `fn(variable_copy, *args_copy)` on every copy of each variable.

  For state that is not trained but must stay identical on every replica
  (target networks, queues): when each replica's arguments are equal (an
  EMA of mirrored online weights, keys gathered from all replicas), each
  copy applies the same update locally, with no communication; an
  `assign` in replica context would all-reduce the whole variable instead.
  Works in replica and cross-replica context and without a strategy, the
  way Keras' optimizers apply their updates.

  Args:
    fn: fn(variable, *args) -> an update op; `variable` is one device's
      tf.Variable, each arg that device's value.
    variables: Keras or tf variables, updated in order.
    *args: one sequence per extra argument of fn, aligned with `variables`
      (e.g. the online variables of an EMA), or a tensor given to every
      call.
  """
  variables = list(variables)
  per_variable = [a if isinstance(a, (list, tuple)) else [a] * len(variables)
                  for a in args]
  if any(len(a) != len(variables) for a in per_variable):
    raise ValueError("update_replicated: every argument list must have one "
                     "entry per variable.")

  def merged(strategy, variables, per_variable):
    for i, variable in enumerate(variables):
      strategy.extended.update(
          _tf_value(variable), fn,
          args=tuple(_tf_value(a[i]) for a in per_variable), group=False)

  tf.__internal__.distribute.interim.maybe_merge_call(
      merged, tf.distribute.get_strategy(), variables, per_variable)


def _tf_value(x):
  """The tf.Variable under a Keras variable; anything else as it is."""
  return x.value if isinstance(x, keras.Variable) else x


def worker_info(strategy):
  """(is_chief, task_id) of this process in a multi-worker cluster.

  Single-process strategies are always the chief. In a TF_CONFIG cluster the
  chief is task "chief" if the cluster has one, else worker 0 (the
  MultiWorkerMirroredStrategy convention): only it writes summaries, results
  and the final checkpoints; the other workers take part in every save (a
  save reads variables collectively) but write into scratch directories.
  """
  resolver = getattr(strategy, "cluster_resolver", None)
  task_type = getattr(resolver, "task_type", None)
  if not task_type:
    return True, 0
  task_id = int(resolver.task_id or 0)
  has_chief = "chief" in resolver.cluster_spec().as_dict()
  is_chief = task_type == "chief" or (not has_chief and task_type == "worker"
                                      and task_id == 0)
  return is_chief, task_id


def num_workers(strategy):
  """Processes (chief and workers) of `strategy`'s cluster; 1 without one."""
  resolver = getattr(strategy, "cluster_resolver", None)
  if not getattr(resolver, "task_type", None):
    return 1
  spec = resolver.cluster_spec().as_dict()
  return max(1, len(spec.get("chief", [])) + len(spec.get("worker", [])))


def any_worker(strategy):
  """A function flag -> bool: whether `flag` is true on any worker.

  For a MultiWorkerMirroredStrategy over several workers it is a collective
  all-reduce, so every worker must call it at the same point of the run.
  For every other strategy (one process drives all the replicas) it is the
  flag itself and costs nothing.
  """
  if (not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
      or num_workers(strategy) == 1):
    return bool

  @tf.function
  def reduce(flag):
    def count():
      ctx = tf.distribute.get_replica_context()
      return ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.cast(flag, tf.int32))
    return strategy.experimental_local_results(strategy.run(count))[0]
  return lambda flag: int(reduce(tf.constant(bool(flag)))) > 0
