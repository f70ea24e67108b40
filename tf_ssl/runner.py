"""What every entry point shares: one run scaffold for pretraining and fine-tuning.

An entry point (tf_ssl.train, tf_ssl.finetune) builds its data, model and
optimizer; everything around them comes from here, so each gets the same
machinery from one place:

  run = runner.start(...)           seed, precision, strategy; which worker
                                    writes (only the chief; the others write
                                    into a scratch directory deleted at the end)
  info = runner.restore_or_init(...)  resume order: the latest checkpoint in
                                    --workdir, else the entry point's init
  runner.fit(...)                   model.fit in whole executions with the
                                    NaN guard, exact stop, checkpoints that
                                    survive SIGTERM (agreed across workers),
                                    throughput, progress lines and summaries
  runner.write_results(...)         results.json, TensorBoard, curves (chief)
  runner.finish(run)                removes a non-chief worker's scratch dir

User errors (bad flags, paths, data, --init) end the program with one line
and a non-zero exit: the entry point prepares inside `preparing()` and runs
inside `user_errors()`; internal errors keep their traceback.
"""

import contextlib
import dataclasses
import json
import math
import os
import sys
from typing import Optional

from absl import flags as absl_flags
from absl import logging
import keras
import tensorflow as tf

from tf_ssl import callbacks
from tf_ssl import distribute
from tf_ssl import outputs
from tf_ssl import plots

# A Keras "epoch" (one line of Keras' output) lasts about one pass over the
# data, but at least this many steps, so tiny label subsets do not print a
# line every other step.
MIN_STEPS_PER_CHUNK = 50


class UserError(ValueError):
  """An error the user can fix (a flag, a path, the data): one line, no traceback."""


# What preparing a run raises when a flag, a path, the data or --init is wrong.
_USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError,
                tf.errors.NotFoundError, tf.errors.InvalidArgumentError)


@contextlib.contextmanager
def preparing():
  """Marks errors raised while a run is prepared as the user's to fix.

  Wrap the preparation (flags, sources, model, --init): there a ValueError
  or a missing file comes from what the user gave. The exception itself is
  re-raised unchanged (library callers catch it as before); `user_errors`
  turns it into one line at the command line.
  """
  try:
    yield
  except _USER_ERRORS as e:
    e.tf_ssl_user_error = True
    raise


@contextlib.contextmanager
def user_errors(program):
  """At the command line: a user's error (a UserError, or one raised inside
  `preparing`) ends the program with one line on stderr and exit code 2;
  any other error keeps its traceback. TF_SSL_TRACEBACK=1 shows it always."""
  try:
    yield
  except (absl_flags.Error, *_USER_ERRORS) as e:
    if os.environ.get("TF_SSL_TRACEBACK") or not (
        isinstance(e, (UserError, absl_flags.Error))
        or getattr(e, "tf_ssl_user_error", False)):
      raise
    message = getattr(e, "message", None) or str(e)
    # TensorFlow errors carry a multi-line op context; the first line says it.
    message = " ".join(message.strip().splitlines()[:1]) or type(e).__name__
    print(f"{program}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


@dataclasses.dataclass
class Run:
  """A started run: its strategy and where this process writes.

  Attributes:
    strategy: the tf.distribute strategy.
    workdir: the run's directory (None: write nothing, e.g. a library call).
    own_dir: where this process writes: workdir on the chief, a scratch
      directory <workdir>/tmp/worker<i> on the other workers (they take part
      in collective saves and exports but their files are thrown away).
    is_chief: whether this process writes the run's files.
    writer: TensorBoard writer (a no-op one off the chief or without workdir).
    history_path: <own_dir>/history.jsonl, or None.
  """
  strategy: tf.distribute.Strategy
  workdir: Optional[str]
  own_dir: Optional[str]
  is_chief: bool
  writer: object
  history_path: Optional[str]

  @property
  def replicas(self):
    return self.strategy.num_replicas_in_sync

  def path(self, *names):
    """A path in this process's own directory."""
    return os.path.join(self.own_dir, *names)


def cpu_has_native_bfloat16(cpuinfo="/proc/cpuinfo"):
  """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX), or
  None when it cannot tell (no /proc/cpuinfo)."""
  try:
    with open(cpuinfo) as f:
      flags = f.read()
  except OSError:
    return None
  return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def _warn_if_bfloat16_is_emulated(cpuinfo="/proc/cpuinfo"):
  """Mixed bfloat16 on a CPU without bfloat16 instructions is emulated: a
  ResNet-18 train step measured 7x slower than float32 on an AVX2-only EPYC
  (6.3 s against 0.88 s), where an AVX-512 BF16 one runs it 1.8x faster."""
  if tf.config.list_logical_devices("TPU") or tf.config.list_logical_devices("GPU"):
    return False  # TPU and GPU replicas compute bfloat16 natively.
  if cpu_has_native_bfloat16(cpuinfo) is False:
    logging.warning(
        "--mixed_precision=true on a CPU without bfloat16 instructions (no "
        "avx512_bf16 or amx_bf16 in /proc/cpuinfo): bfloat16 is emulated and "
        "a train step runs several times slower than float32; pass "
        "--mixed_precision=false on this machine.")
    return True
  return False


def start(workdir, strategy_name="default", tpu=None, seed=0,
          mixed_precision=False, strategy=None, flags_text=None):
  """Seeds, sets the precision policy, builds the strategy and the directories.

  Args:
    workdir: the run's directory, or None to write nothing.
    strategy_name, tpu: as tf_ssl.distribute.get_strategy takes them.
    seed: seeds Python, NumPy and TensorFlow (initialisation).
    mixed_precision: bfloat16 compute with float32 variables.
    strategy: an existing strategy to use instead (library calls in a loop).
    flags_text: written to <workdir>/flags.txt by the chief, if given.
  """
  keras.utils.set_random_seed(seed)
  keras.mixed_precision.set_global_policy(
      "mixed_bfloat16" if mixed_precision else "float32")
  if strategy is None:
    strategy = distribute.get_strategy(strategy_name, tpu)
  if mixed_precision:
    _warn_if_bfloat16_is_emulated()
  is_chief, task_id = distribute.worker_info(strategy)
  own_dir = writer = history_path = None
  if workdir:
    own_dir = workdir if is_chief else os.path.join(workdir, "tmp", f"worker{task_id}")
    tf.io.gfile.makedirs(own_dir)
    history_path = os.path.join(own_dir, "history.jsonl")
    if is_chief and flags_text is not None:
      outputs.write_text(os.path.join(workdir, "flags.txt"), flags_text)
  if workdir and is_chief:
    writer = tf.summary.create_file_writer(os.path.join(workdir, "summaries"))
  else:
    writer = tf.summary.create_noop_writer()
  return Run(strategy, workdir, own_dir, is_chief, writer, history_path)


def whole_executions(steps, steps_per_execution):
  """`steps` rounded up to a multiple of `steps_per_execution`: model.fit
  runs whole executions, so a schedule must end where they do."""
  return steps_per_execution * int(math.ceil(steps / steps_per_execution))


def warmup_steps(warmup_epochs, steps_per_epoch, total_steps, fraction=0.1):
  """Warmup in steps, clamped with a warning when it would fill the run.

  A run no longer than its warmup would end at the peak learning rate
  without ever decaying; it then warms up for `fraction` of the run instead
  (SimCLR's 10 of 100 epochs).
  """
  steps = int(round(warmup_epochs * steps_per_epoch))
  if steps >= total_steps > 1 and steps > 0:
    clamped = max(1, int(fraction * total_steps))
    logging.warning(
        "--warmup_epochs=%g is %d steps, not shorter than the run's %d: warming "
        "up for %d steps (%d%% of the run) instead.", warmup_epochs, steps,
        total_steps, clamped, round(100 * fraction))
    return clamped
  return min(steps, total_steps)


def restore_or_init(run, checkpoint, init_fn=None, keep=3):
  """Resume order: the latest checkpoint in <workdir>/checkpoints, else init_fn().

  Every worker reads the chief's checkpoint; this process saves into its
  own directory. Returns (manager or None, info dict: {"kind": "resumed",
  "path": ...} or whatever init_fn returns, {"kind": "none"} without one).
  """
  if not run.workdir:
    return None, (init_fn() if init_fn else {"kind": "none"})
  manager = tf.train.CheckpointManager(checkpoint, run.path("checkpoints"),
                                       max_to_keep=keep)
  latest = tf.train.latest_checkpoint(os.path.join(run.workdir, "checkpoints"))
  if latest:
    try:
      checkpoint.read(latest).assert_existing_objects_matched()
    except (ValueError, AssertionError, tf.errors.OpError) as e:
      raise UserError(
          f"--workdir={run.workdir} holds {latest}, which does not fit this model "
          f"(another --backbone, head or method?); use a fresh --workdir. "
          f"TensorFlow said: {str(e).splitlines()[0]}") from e
    logging.info("Resumed from %s", latest)
    return manager, {"kind": "resumed", "path": latest}
  return manager, (init_fn() if init_fn else {"kind": "none"})


def fit(run, model, data, *, total_steps, steps_per_pass, global_batch_size,
        schedule, manager=None, checkpoint_every_steps=1000, extra_callbacks=(),
        verbose=None):
  """Trains `model` on `data` from its optimizer's step to `total_steps`.

  Args:
    run: the Run.
    model: a compiled Keras model (steps_per_execution set in compile).
    data: a distributed dataset of training batches (repeats forever).
    total_steps: where training ends (a multiple of steps_per_execution).
    steps_per_pass: steps of one pass over the training data; a Keras epoch
      is about that long (at least MIN_STEPS_PER_CHUNK), in whole executions.
    global_batch_size: images per step, for images/s.
    schedule: the learning-rate schedule, or {name: fn(step)} of every
      schedule to log beside the metrics (the learning rate and a method's,
      e.g. its EMA momentum).
    manager: a tf.train.CheckpointManager, or None for no checkpoints.
    checkpoint_every_steps: save period.
    extra_callbacks: run after the NaN guard and the stop, before the
      checkpoint (so their logs reach history.jsonl, e.g. a k-NN monitor).
    verbose: Keras verbosity; None: a bar on a terminal, lines elsewhere.

  Returns:
    (preempted: bool, last_logs: dict of the last Keras epoch's metrics).
  """
  step = model.optimizer.iterations
  spe = model.steps_per_execution
  verbose = callbacks.keras_verbosity(verbose)
  fit_callbacks = [callbacks.NonFiniteGuard(step),
                   callbacks.StopAtStep(step, total_steps), *extra_callbacks]
  saver = None
  if manager is not None:
    saver = callbacks.CheckpointAndPreemption(manager, step, checkpoint_every_steps,
                                              distribute.any_worker(run.strategy))
    fit_callbacks.append(saver)
  fit_callbacks.append(callbacks.Throughput(
      global_batch_size, step, schedule, writer=run.writer,
      every_steps=max(1, min(50, total_steps // 20)), history_path=run.history_path,
      total_steps=total_steps,
      log_every_steps=callbacks.progress_log_every(total_steps, verbose)))
  start_step = int(step.numpy())
  remaining = total_steps - start_step
  last_logs = {}
  if remaining > 0:
    chunk = min(total_steps, max(steps_per_pass, MIN_STEPS_PER_CHUNK))
    chunk = max(spe, chunk // spe * spe)
    history = model.fit(data, steps_per_epoch=chunk, shuffle=False,  # tf.data shuffles
                        initial_epoch=start_step // chunk,
                        epochs=start_step // chunk + int(math.ceil(remaining / chunk)),
                        callbacks=fit_callbacks, verbose=verbose)
    last_logs = {k: float(v[-1]) for k, v in history.history.items() if v}
  preempted = bool(saver is not None and saver.preempted)
  if preempted:
    logging.warning("Preempted at step %d; rerun the same command to resume.",
                    int(step.numpy()))
  return preempted, last_logs


def write_results(run, results, step, curves=plots.CURVES):
  """results.json, eval/<key> scalars and the training-curves PNG.

  Written into this process's own directory (the chief's is --workdir); the
  eval scalars are the results whose key ends in "top1" or "top5".
  """
  if not run.own_dir:
    return
  with run.writer.as_default(step=step):
    for key, value in results.items():
      if key.endswith(("top1", "top5")):
        tf.summary.scalar("eval/" + key, value)
  run.writer.flush()
  outputs.write_text(run.path("results.json"), json.dumps(results, indent=2))
  plots.training_curves(run.history_path, run.path("training_curves.png"),
                        curves=curves)


def finish(run):
  """Removes a non-chief worker's scratch directory (and <workdir>/tmp once
  the last one is gone)."""
  if run.is_chief or not run.own_dir:
    return
  tf.io.gfile.rmtree(run.own_dir)
  # Another worker may be finishing at the same moment, so a directory
  # already gone or not yet empty is fine.
  try:
    scratch = os.path.dirname(run.own_dir)
    if not tf.io.gfile.listdir(scratch):
      tf.io.gfile.rmtree(scratch)
  except tf.errors.OpError:
    pass
