"""Time and peak memory of nt_xent forward+backward on 1 and 4 CPU replicas.

    .venv/bin/python tools/bench_loss.py            # the whole table
    .venv/bin/python tools/bench_loss.py --one 4096 4   # one configuration

Every configuration runs in its own subprocess, so its peak resident memory
(getrusage ru_maxrss) is its own. Within the subprocess the same step is first
warmed up on a tiny batch (TensorFlow's runtime, thread pools and the
collectives start up there), then the baseline is read, then the step at the
real size is traced, warmed up and timed; "peak MiB" is the rise of ru_maxrss
over that baseline: the memory the loss at that size needs. Time is the median
of several calls of one tf.function running strategy.run(loss + gradient);
"cpu ms" is the process CPU time (user + system) per call, which other jobs
on a shared machine disturb far less than the wall time "ms".

The last line is overhead_4096=<4-replica ms / 1-replica ms at batch 4096>;
the 4 replicas share the same cores, so the same FLOPs should cost about the
same time (target <= 1.3).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow as tf  # pylint: disable=g-import-not-at-top

# Split the CPU into 4 logical devices before TensorFlow initialises, as the
# tests do, so MirroredStrategy can run 4 replicas without accelerators.
NUM_LOGICAL_CPUS = 4
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0],
    [tf.config.LogicalDeviceConfiguration()] * NUM_LOGICAL_CPUS)

import json  # pylint: disable=g-import-not-at-top,g-bad-import-order
import resource
import statistics
import subprocess
import time

from tf_ssl.losses import nt_xent  # pylint: disable=g-import-not-at-top

BATCHES = (256, 512, 1024, 2048, 4096)
REPLICAS = (1, 4)
DIM = 128
TEMPERATURE = 0.1
WARMUP, RUNS = 2, 5


def _cpu_seconds():
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _max_rss_mib():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _step_fn(strategy, global_batch):
  """A tf.function computing loss and input gradients on every replica, and
  the per-replica inputs it runs on."""
  r = strategy.num_replicas_in_sync
  z1, z2 = (tf.random.stateless_normal((global_batch, DIM), seed=(s, 0))
            for s in (1, 2))

  def shard(ctx):
    i = ctx.replica_id_in_sync_group
    return tf.split(z1, r)[i], tf.split(z2, r)[i]

  local = strategy.experimental_distribute_values_from_function(shard)

  def replica_step(a, b):
    with tf.GradientTape() as tape:
      tape.watch([a, b])
      loss = nt_xent(a, b, TEMPERATURE)[0] / r
    return loss, tape.gradient(loss, [a, b])

  @tf.function
  def step(a, b):
    return strategy.run(replica_step, args=(a, b))

  return step, local


def measure(global_batch, replicas):
  """Returns {"ms", "cpu_ms": medians per step, "peak_mib": ru_maxrss rise}."""
  devices = [d.name for d in tf.config.list_logical_devices("CPU")][:replicas]
  strategy = tf.distribute.MirroredStrategy(
      devices, cross_device_ops=tf.distribute.ReductionToOneDevice())
  tiny, tiny_inputs = _step_fn(strategy, 8 * replicas)
  for _ in range(WARMUP):
    tiny(*tiny_inputs)
  step, inputs = _step_fn(strategy, global_batch)
  baseline = _max_rss_mib()
  for _ in range(WARMUP):
    step(*inputs)
  times, cpu_times = [], []
  for _ in range(RUNS):
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    loss, _ = step(*inputs)
    strategy.experimental_local_results(loss)[0].numpy()  # wait for the result
    times.append(time.perf_counter() - start)
    cpu_times.append(_cpu_seconds() - cpu_start)
  return {"ms": 1e3 * statistics.median(times),
          "cpu_ms": 1e3 * statistics.median(cpu_times),
          "peak_mib": _max_rss_mib() - baseline}


def main():
  print(f"nt_xent forward+backward, D={DIM}, float32, MirroredStrategy over "
        f"logical CPUs ({os.cpu_count()} cores); median of {RUNS} runs after "
        f"{WARMUP} warm-ups.")
  print("peak MiB: ru_maxrss rise over a baseline taken after a tiny-batch "
        "warm-up, one subprocess per configuration.")
  print(f"{'global batch':>12} {'replicas':>8} {'ms':>9} {'peak MiB':>9} "
        f"{'cpu ms':>9}")
  results = {}
  for batch in BATCHES:
    for replicas in REPLICAS:
      out = subprocess.run(
          [sys.executable, os.path.abspath(__file__), "--one", str(batch),
           str(replicas)], check=True, capture_output=True, text=True).stdout
      results[batch, replicas] = json.loads(out.strip().splitlines()[-1])
      res = results[batch, replicas]
      print(f"{batch:>12} {replicas:>8} {res['ms']:>9.1f} "
            f"{res['peak_mib']:>9.0f} {res['cpu_ms']:>9.1f}", flush=True)
  cpu_overhead = results[4096, 4]["cpu_ms"] / results[4096, 1]["cpu_ms"]
  print(f"cpu_overhead_4096={cpu_overhead:.2f}")
  overhead = results[4096, 4]["ms"] / results[4096, 1]["ms"]
  print(f"overhead_4096={overhead:.2f}")


if __name__ == "__main__":
  if len(sys.argv) == 4 and sys.argv[1] == "--one":
    print(json.dumps(measure(int(sys.argv[2]), int(sys.argv[3]))))
  else:
    main()
