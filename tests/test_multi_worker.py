"""MultiWorkerMirroredStrategy for real: two worker processes over loopback.

Both workers train ContrastiveModel.fit (ResNet-18 with synchronized BN,
LARS) through tf_ssl.distribute.get_strategy("multi_worker"), each on its
half of every global batch; this process trains the same model on the whole
batches with no strategy. The per-step losses must agree. Then one worker is
SIGKILLed mid-training and the other must fail with an error naming it
instead of waiting for it forever.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tensorflow as tf

import multi_worker_worker as worker

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Hang guards, not timing assertions: far above what the runs take on a busy
# 2-core machine (about 20 s of CPU per worker to start and trace; a dead peer
# is reported after about 15 s, TF's 10 s heartbeat timeout plus polling).
START_TIMEOUT = 420
DEAD_PEER_TIMEOUT = 120


def _free_ports(n):
  """n distinct ports the OS reports free (bound together so none repeats)."""
  sockets = [socket.socket() for _ in range(n)]
  try:
    for s in sockets:
      s.bind(("localhost", 0))
    return [s.getsockname()[1] for s in sockets]
  finally:
    for s in sockets:
      s.close()


class _Worker:
  """A worker subprocess whose merged stdout/stderr is collected by a thread."""

  def __init__(self, index, ports, out, initial_weights):
    tf_config = {"cluster": {"worker": [f"localhost:{p}" for p in ports]},
                 "task": {"type": "worker", "index": index}}
    env = dict(os.environ, TF_CONFIG=json.dumps(tf_config),
               CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    self.index = index
    self.lines = []
    self.proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "tests", "multi_worker_worker.py"),
         out, f"--initial_weights={initial_weights}", "--linger"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self):
    for line in self.proc.stdout:
      self.lines.append(line)

  def output(self):
    return "".join(self.lines)

  def wait_for(self, prefix, timeout):
    """Blocks until a line starts with `prefix`; fails if the worker exits."""
    deadline = time.time() + timeout
    while time.time() < deadline:
      if any(line.startswith(prefix) for line in self.lines):
        return
      if self.proc.poll() is not None:
        self._reader.join(5)
        pytest.fail(f"worker {self.index} exited ({self.proc.returncode}) before "
                    f"{prefix!r}:\n{self.output()[-3000:]}")
      time.sleep(0.2)
    pytest.fail(f"worker {self.index}: no {prefix!r} after {timeout} s:\n"
                f"{self.output()[-3000:]}")

  def wait_exit(self, timeout):
    """The exit code, or None if the worker still runs after `timeout` s."""
    try:
      returncode = self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      return None
    self._reader.join(5)
    return returncode

  def kill(self):
    if self.proc.poll() is None:
      self.proc.send_signal(signal.SIGKILL)
    self.proc.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
  """Starts two lingering workers and trains the reference meanwhile.

  Yields (workers, outputs, reference history). The workers keep training
  after writing their outputs, so the dead-worker test can kill one in the
  middle of training; every worker is killed at the end whatever happened.
  """
  tmp = tmp_path_factory.mktemp("multi_worker")
  model = worker.build_model()
  np.savez(tmp / "init.npz", **{str(i): w for i, w in enumerate(model.get_weights())})
  initial = model.get_weights()
  ports = _free_ports(2)
  outputs = [tmp / f"worker{i}.json" for i in range(2)]
  workers = []
  try:
    for i in range(2):
      workers.append(_Worker(i, ports, str(outputs[i]), str(tmp / "init.npz")))
    # The single-process reference: the same model, optimizer and global
    # batches, no strategy (the default one: one replica, local BN statistics
    # over the whole batch).
    reference = worker.train(model, tf.distribute.get_strategy(),
                             worker.global_batches())
    reference.update(initial_checksum=worker.checksum(initial),
                     update_norms=worker.update_norms(initial, model.get_weights()))
    yield workers, outputs, reference
  finally:
    for w in workers:
      w.kill()


def test_two_workers_match_one_process(cluster):
  workers, outputs, reference = cluster
  for w in workers:
    w.wait_for("finished", START_TIMEOUT)
  results = [json.loads(p.read_text()) for p in outputs]
  print("\nreference loss", reference["loss"])
  for i, result in enumerate(results):
    assert result["replicas"] == 2, f"worker {i} is not in a 2-worker cluster"
    assert result["initial_checksum"] == pytest.approx(reference["initial_checksum"],
                                                       rel=1e-12)
    history = result["history"]
    # Every step: loss (NT-Xent over the global batch with negatives gathered
    # across workers, plus the probe), and the probe loss over the labelled
    # rows of both workers.
    print(f"worker {i} loss", history["loss"],
          *[line.strip() for line in workers[i].lines if "train step" in line])
    for key in ("loss", "contrastive_loss", "probe_loss"):
      np.testing.assert_allclose(history[key], reference[key], rtol=1e-5,
                                 err_msg=f"worker {i}: {key} per step")
    assert len(history["loss"]) == worker.STEPS
    # How far each weight moved in the 3 LARS steps, BN moving statistics
    # included: the summed gradients and synchronized statistics of the
    # workers are those of the whole batch. Loose: the gradients of the last
    # block's BN parameters (64 values per channel at 2x2 pixels) nearly
    # cancel, and their two summation orders differ by up to 6e-4 relative;
    # a wrong sum, scale or statistic changes updates by O(1).
    np.testing.assert_allclose(result["update_norms"], reference["update_norms"],
                               rtol=1e-2, atol=1e-7,
                               err_msg=f"worker {i}: |w_final - w_initial| per weight")
  assert min(reference["update_norms"]) > 0, "some weight did not train"


def test_dead_worker_stops_the_other(cluster):
  workers, _, _ = cluster
  survivor, victim = workers
  victim.wait_for("linger step 1 done", START_TIMEOUT)
  victim.kill()
  killed_at = time.time()
  returncode = survivor.wait_exit(DEAD_PEER_TIMEOUT)
  output = survivor.output()
  assert returncode is not None, (
      f"worker 0 still running {DEAD_PEER_TIMEOUT} s after worker 1 died:\n"
      f"{output[-3000:]}")
  print(f"\nworker 0 exited ({returncode}) {time.time() - killed_at:.1f} s after "
        f"worker 1 died")
  assert returncode != 0
  # Either the coordination service misses the dead task's heartbeats and
  # aborts the collectives waiting for it, or a collective's connection to
  # it breaks first; both raise UnavailableError naming the task.
  assert "UnavailableError" in output, output[-3000:]
  assert "/job:worker/replica:0/task:1" in output, output[-3000:]
