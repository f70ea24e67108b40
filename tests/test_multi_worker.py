"""MultiWorkerMirroredStrategy for real: two worker processes over loopback.

Both workers train ContrastiveModel.fit (ResNet-18 with synchronized BN,
LARS) through tf_ssl.distribute.get_strategy("multi_worker"), each on its
half of every global batch; this process trains the same model on the whole
batches with no strategy. The per-step losses must agree. Then one worker is
SIGKILLed mid-training and the other must fail with an error naming it
instead of waiting for it forever. Last, `python -m tf_ssl.train` runs as two
workers sharing one --workdir: only the chief writes there, and a rerun with
more steps resumes both workers from the chief's checkpoint.
"""

import glob
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


# ------------------------------------------------- the trainer on two workers
# A hang guard per run of both workers, not a timing assertion: each run
# takes about 40 s on a quiet 2-core machine and up to 6 min at load 11.
TRAIN_TIMEOUT = 900


def _trainer_flags():
  import test_train  # pylint: disable=g-import-not-at-top
  return [f for f in test_train.TINY
          if not f.startswith(("--strategy=", "--export="))]


def _train_on_two_workers(workdir, folder, logs, *extra, while_running=None,
                          command=None):
  """Runs `python -m tf_ssl.train` (or `command`, a list of arguments before
  --workdir) as workers 0 and 1 of one TF_CONFIG cluster until both exit;
  fails, after killing both, if either fails or the pair outlives
  TRAIN_TIMEOUT. `while_running(procs, log_paths)`, if given, is called once
  both have started. Returns ([pid], [merged stdout+stderr])."""
  command = command or ["-m", "tf_ssl.train", *_trainer_flags()]
  ports = _free_ports(2)
  procs, paths = [], []
  try:
    for i in range(2):
      tf_config = {"cluster": {"worker": [f"localhost:{p}" for p in ports]},
                   "task": {"type": "worker", "index": i}}
      env = dict(os.environ, TF_CONFIG=json.dumps(tf_config),
                 CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
      paths.append(logs / f"worker{i}.log")
      with open(paths[-1], "w") as log:  # The child keeps its own descriptor.
        procs.append(subprocess.Popen(
            [sys.executable, *command, f"--workdir={workdir}",
             f"--dataset=folder:{folder}", "--strategy=multi_worker", *extra],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    if while_running is not None:
      while_running(procs, paths)
    deadline = time.time() + TRAIN_TIMEOUT
    # A worker that fails leaves the other waiting for it (up to an hour at
    # start-up), so stop at the first failure rather than at the deadline.
    while time.time() < deadline and any(p.poll() is None for p in procs):
      if any(p.poll() not in (None, 0) for p in procs):
        break
      time.sleep(0.5)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
  outputs = [path.read_text() for path in paths]
  for i, (p, output) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, (
        f"worker {i} exited with {p.returncode} (-9: killed after a peer failed "
        f"or after {TRAIN_TIMEOUT} s):\n{output[-4000:]}")
  return [p.pid for p in procs], outputs


def _checkpoint_steps(directory):
  return sorted(int(p.rsplit("-", 1)[1].split(".")[0])
                for p in glob.glob(os.path.join(directory, "ckpt-*.index")))


def _summary_tags(path):
  tags = set()
  for event in tf.compat.v1.train.summary_iterator(path):
    tags.update(value.tag for value in event.summary.value)
  return tags


def test_trainer_on_two_workers_writes_once_and_resumes(tmp_path, image_folder):
  workdir = tmp_path / "run"
  scratch = workdir / "tmp" / "worker1"
  t0 = time.time()
  pids, outputs = _train_on_two_workers(
      workdir, image_folder, tmp_path, "--train_steps=4",
      "--checkpoint_every_steps=2", "--eval_every_steps=2", "--eval_examples=12",
      "--export=true")
  first_run = time.time() - t0

  # Only the chief (worker 0, no "chief" task) wrote to --workdir.
  assert _checkpoint_steps(workdir / "checkpoints") == [2, 4]
  results = json.loads((workdir / "results.json").read_text())
  assert results["train_steps"] == 4
  for key in ("knn_top1", "linear_top1"):
    assert 0.0 <= results[key] <= 1.0, results
  flags_text = (workdir / "flags.txt").read_text()
  assert "--strategy=multi_worker" in flags_text and "--train_steps=4" in flags_text
  assert (workdir / "training_curves.png").exists()
  assert (workdir / "saved_model" / "saved_model.pb").exists()
  # TensorFlow names an event file after the writing process: one file, the
  # chief's, with the view grid, training scalars and the final evaluation.
  [events] = glob.glob(str(workdir / "summaries" / "events.*"))
  assert f".{pids[0]}." in os.path.basename(events), events
  assert {"views", "loss", "learning_rate", "eval/knn_top1"} <= _summary_tags(events)
  history = [json.loads(l) for l in (workdir / "history.jsonl").read_text().splitlines()]
  assert [row["step"] for row in history] == [1, 2, 3, 4]
  # The k-NN monitor ran inside fit on both workers; the chief logged it.
  assert [row["step"] for row in history if "knn_top1" in row] == [2, 4]
  # Worker 1 took part in every save and the export, into its scratch
  # directory, and deleted it at the end.
  assert f"{scratch}/checkpoints/ckpt-4" in outputs[1], outputs[1][-3000:]
  assert f"{scratch}/saved_model" in outputs[1], outputs[1][-3000:]
  assert not scratch.exists(), os.listdir(scratch)
  assert not scratch.parent.exists(), "the last worker out removes <workdir>/tmp"
  assert "Resumed" not in outputs[0] + outputs[1]

  # Rerun with more steps: both workers resume from the chief's step 4.
  t0 = time.time()
  pids, outputs = _train_on_two_workers(
      workdir, image_folder, tmp_path, "--train_steps=6",
      "--checkpoint_every_steps=2", "--export=false")
  second_run = time.time() - t0
  for i, output in enumerate(outputs):
    assert f"Resumed from {workdir}/checkpoints/ckpt-4" in output, (
        f"worker {i}:\n{output[-3000:]}")
  assert _checkpoint_steps(workdir / "checkpoints") == [2, 4, 6]
  assert json.loads((workdir / "results.json").read_text())["train_steps"] == 6
  history = [json.loads(l) for l in (workdir / "history.jsonl").read_text().splitlines()]
  assert [row["step"] for row in history] == [1, 2, 3, 4, 5, 6], "steps 5-6 appended"
  assert len(glob.glob(str(workdir / "summaries" / f"events.*.{pids[0]}.*"))) == 1
  assert len(glob.glob(str(workdir / "summaries" / "events.*"))) == 2
  assert not scratch.exists(), os.listdir(scratch)
  assert not scratch.parent.exists(), "the last worker out removes <workdir>/tmp"
  print(f"\ntwo-worker trainer: {first_run:.0f} s for 4 steps with export, "
        f"{second_run:.0f} s to resume to step 6")


def test_sigterm_to_one_worker_checkpoints_both_at_one_step(tmp_path, image_folder):
  """A save is collective, so a SIGTERM that reaches only worker 1 must make
  both workers save the same step and exit cleanly (not hang in mismatched
  collectives or fail), leaving the chief's checkpoint of that step (which
  resumes like any chief checkpoint, as the test above shows)."""
  workdir = tmp_path / "run"

  def signal_worker_1_once_training(procs, paths):
    # Its first progress line (every 5% of the 400 steps) says it trains.
    deadline = time.time() + TRAIN_TIMEOUT
    while time.time() < deadline and "step 20/400" not in paths[1].read_text():
      assert all(p.poll() is None for p in procs), paths[1].read_text()[-3000:]
      time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)

  _, outputs = _train_on_two_workers(
      workdir, image_folder, tmp_path, "--train_steps=400",
      "--checkpoint_every_steps=1000", "--export=false",
      while_running=signal_worker_1_once_training)
  [step] = _checkpoint_steps(workdir / "checkpoints")
  assert 20 <= step < 400
  for output in outputs:
    assert f"Preempted at step {step}" in output, output[-3000:]
  assert "Another worker got SIGTERM" in outputs[0]


def test_finetune_on_two_workers_writes_once(tmp_path, image_folder):
  """Fine-tuning shares the trainer's run scaffold (tf_ssl/runner.py): only
  the chief writes checkpoints, results, flags and the export to --workdir;
  worker 1 writes into a scratch directory it removes."""
  workdir = tmp_path / "ft"
  command = ["-m", "tf_ssl.finetune", "--backbone=resnet18", "--small_image_stem",
             "--mode=finetune", "--image_size=16", "--global_batch_size=8",
             "--learning_rate=0.05"]
  pids, outputs = _train_on_two_workers(
      workdir, image_folder, tmp_path, "--train_steps=4", "--checkpoint_every_steps=2",
      "--export=true", command=command)
  assert _checkpoint_steps(workdir / "checkpoints") == [2, 4]
  results = json.loads((workdir / "results.json").read_text())
  assert results["train_steps"] == 4 and results["eval_examples"] == 32
  assert "--strategy=multi_worker" in (workdir / "flags.txt").read_text()
  assert (workdir / "saved_model" / "saved_model.pb").exists()
  [events] = glob.glob(str(workdir / "summaries" / "events.*"))
  assert f".{pids[0]}." in os.path.basename(events), events
  scratch = workdir / "tmp" / "worker1"
  assert f"{scratch}/checkpoints/ckpt-4" in outputs[1], outputs[1][-3000:]
  assert not scratch.parent.exists(), "the last worker out removes <workdir>/tmp"
