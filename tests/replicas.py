"""Runs a function of a global batch on R replicas, each replica getting its
contiguous slice, and returns its per-replica outputs and gradients. Tests use
it to check that a loss gives the same value and input gradients on 1, 2 and
4 replicas."""

import tensorflow as tf


def run_sharded(strategy, fn, *global_inputs):
  """Calls fn(*local_inputs) -> scalar loss on each replica of `strategy`.

  Each input's leading axis is split into equal contiguous per-replica slices
  (replica r gets rows [r*B, (r+1)*B)). The per-replica loss is divided by the
  replica count, as a train step does, and differentiated with respect to the
  local inputs.

  Returns:
    (loss, grads): loss is the sum of the scaled per-replica losses (the
    global loss); grads is a list, one per input, of the per-replica input
    gradients concatenated back in replica order.
  """
  n = strategy.num_replicas_in_sync
  for x in global_inputs:
    assert x.shape[0] % n == 0, f"batch {x.shape[0]} not divisible by {n} replicas"

  def shard(ctx):
    i = ctx.replica_id_in_sync_group
    return tuple(tf.split(x, n)[i] for x in global_inputs)

  def step(*local):
    with tf.GradientTape() as tape:
      tape.watch(local)
      loss = fn(*local) / n
    return loss, tape.gradient(loss, local)

  @tf.function
  def run():
    local = strategy.experimental_distribute_values_from_function(shard)
    return strategy.run(step, args=local)

  loss, grads = run()
  loss = strategy.reduce("SUM", loss, axis=None)
  grads = [tf.concat(strategy.experimental_local_results(g), axis=0) for g in grads]
  return loss, grads
