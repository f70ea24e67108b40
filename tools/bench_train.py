"""Train-step speed of ContrastiveModel on CPU, and its fraction of matmul peak.

    .venv/bin/python tools/bench_train.py                  # the whole table
    .venv/bin/python tools/bench_train.py --quick          # fewer steps
    .venv/bin/python tools/bench_train.py --configs r18_32_fp32,r18_32_bf16
    .venv/bin/python tools/bench_train.py --methods all    # one row per method
    .venv/bin/python tools/bench_train.py --methods simclr,byol --dtype bf16

With --methods, the speed of every pretraining method at the embedded
default's size instead ("Methods mode" below).

Configurations (issue 5, "Speed"): ResNet-18 with the CIFAR stem at 32px,
batch 256, and ResNet-50 at 224px, batch 32, each in float32 and in mixed
bfloat16, each with and without jit_compile. The model is the trainer's
(tf_ssl.train.build_model): sync BN (the flag's default), the SimCLR v1
projection head (2 layers, hidden width = feature width, 128 out), an online
linear probe (10 / 1000 classes, every example labelled), NT-Xent, and LARS.
The timed function is the one `model.fit` runs, `model.train_function`, fed
the same in-memory batch every step, so no input pipeline is timed.

Each configuration runs in its own subprocess, so the dtype policy, the
compiled graphs and the memory of one never leak into the next. Inside it the
first steps (tracing, XLA compilation, oneDNN primitive creation) are warm-up;
a round's step time is the median of its timed steps, each ended by reading
the loss. The 2 cores are shared with other jobs, so every configuration runs
in 2 rounds (the second in reverse order) and reports its faster round, as the
matmul peak is a best-of; the table shows every round's median as the noise.
One image is two views, so images/s = batch / step time.

Peak fraction = achieved FLOP/s / the float32 matmul peak measured in the same
run (a 4096^3 tf.matmul in a tf.function, best of several, 2 FLOPs per
multiply-add; measured before and after the models, the better is used and
both are printed as a noise indicator). The FLOPs of a step are counted from
the model itself: the multiply-adds of every Conv2D and Dense layer at the
benchmark's image size (BN, ReLU, pooling and the loss are not counted), times
2 FLOPs, times 3 for forward + backward, times 2 views per image.

The last line is `peak_fraction_r50_224=<x> bf16_speedup_r50_224=<y>`: x is
the float32 ResNet-50 224px peak fraction (the better of jit and no jit), y is
the best bfloat16 images/s over the best float32 images/s of that model.
Targets (issue 5): x >= 0.55, y >= 2.

Methods mode (issue 13, --methods all or a comma-separated list of
tf_ssl.methods names; all = every registered method, SupCon included since
the batch is labelled; SimCLR is always added, as the reference). Each
method's model is the trainer's at the embedded default's size: the
configuration is configs/simclr_fashion_mnist.cfg parsed with the trainer's
flags (ResNet-18 x0.25 with the small stem at 28 px, global batch 128, a
2-layer projector 512 wide with 128 out, no sync BN, LARS with the file's
schedule), then tf_ssl.train's build_method, build_model (a 10-class online
probe) and build_optimizer, compiled without jit and with one step per
execution (the file's 26 only group steps into one call). `--method` is
replaced by each method's name; the file's method options
(its temperature) are SimCLR's and are dropped for every other method, which
runs with its own defaults except two: MoCo v2's queue holds 4096 keys (32
batches of 128, about 7% of Fashion-MNIST's 60000 training images, as the
reference's 65536 are 5% of ImageNet; the default 65536 would be more than
an epoch of stale keys), and BYOL's and MoCo v3's predictors are 512 wide
(the projector's width). SwAV, DINO, Barlow Twins and VICReg, whose views
or heads differ in shape from the default's (local crops, 3-layer heads,
prototypes), also read their own configs/<method>_fashion_mnist.cfg, the
shapes their epochs are budgeted for; their timed batch then holds the local
crops too. --batch overrides the batch (a queue then holds the largest
multiple of it up to 4096).

Timed: `model.train_function` on one fixed in-memory batch {"views":
[B, 2, 28, 28, 3] float32, "label": [B]} (rotation, jigsaw and PIRL, which
make views of their own: their views of random images, and for PIRL the
index 0..B-1 into a bank of Fashion-MNIST's 60000 rows), each step ended
by reading the loss, float32 unless --dtype bf16 (mixed bfloat16, set before any layer is
made; it replaces the file's --mixed_precision). Every (method, hooks) pair
is its own subprocess; the first steps are warm-up (3, or 2 with --quick;
--warmup sets it) and a round's step time is the median of the timed steps
(10, or 3 with --quick; --timed sets it); 2 rounds (1 with --quick), the
second in reverse order, each pair reporting its faster round. images/s =
B / step time, and "vs simclr" is a method's images/s over SimCLR's in the
same run.

The split of a method with a target network (BYOL, MoCo v2, MoCo v3: those
whose class overrides `before_step` or `after_update`) is measured by a
second subprocess that runs the same step with both hooks replaced by no-ops
on that method instance before the train function is first traced: no EMA
of the target, no enqueue, everything else (the target's forward passes
included) unchanged. hooks_overhead = step time with hooks / step time
without - 1: what the EMA and the enqueue add beyond the target's extra
forward; issue 13 requires it to be at most 0.10. Each run also reports
the largest change of the target's averaged weights and of the queue over
the run, so the table shows that the no-hooks run really leaves them alone.

The last line is `method_ratios byol=<r> ... hooks_overhead_max=<h>`: r is
each method's images/s over SimCLR's (every method but SimCLR, in the order
given), h the largest hooks_overhead (nan without a target-network method).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

# name -> (depth, image size, batch, cifar stem, probe classes, dtype, jit)
CONFIGS = {}
for _model, _depth, _size, _batch, _stem, _classes in (
    ("r18", 18, 32, 256, True, 10), ("r50", 50, 224, 32, False, 1000)):
  for _jit in (False, True):  # fp32 next to bf16: compared under similar load
    for _dtype in ("fp32", "bf16"):
      CONFIGS[f"{_model}_{_size}_{_dtype}{'_jit' if _jit else ''}"] = dict(
          depth=_depth, size=_size, batch=_batch, cifar_stem=_stem,
          classes=_classes, dtype=_dtype, jit=_jit)
# (warm-up steps, timed steps); the first warm-up step also traces/compiles.
STEPS = {"full": (2, 3), "quick": (1, 2)}
ROUNDS = {"full": 2, "quick": 1}
MATMUL_N = 4096
MATMUL_REPEATS_PER_CONFIG = 3
REFERENCE_GFLOP = {18: 1.1, 50: 8.2}  # issue 5: forward GFLOP per view.


# ----------------------------------------------------------------- subprocess

def _count_forward_macs(model, size):
  """Multiply-adds of every Conv2D and Dense in one forward pass of one view.

  Each layer's `call` is wrapped for one eager forward pass at batch 1 to read
  its input and output shapes, so the count follows whatever the model builds
  (stems, strides, projection shortcuts, heads).
  """
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  # Build first (as the trainer does): the head makes its layers on the first
  # call, and building an unbuilt model also traces `call` symbolically,
  # which would count every layer twice.
  model(tf.zeros((1, size, size, 3)), training=False)
  counts = {"backbone": 0, "heads": 0}

  def wrap(layer, part):
    call = layer.call

    def counted(inputs, *args, **kwargs):
      outputs = call(inputs, *args, **kwargs)
      if isinstance(layer, keras.layers.Conv2D):
        kh, kw, cin, cout = layer.kernel.shape
        _, h, w, _ = outputs.shape
        counts[part] += h * w * kh * kw * cin * cout // layer.groups
      else:
        counts[part] += int(inputs.shape[-1]) * layer.units
      return outputs

    layer.call = counted
    return call

  wrapped = []
  for part, root in (("backbone", model.backbone), ("heads", model)):
    for layer in root._flatten_layers(include_self=False):  # pylint: disable=protected-access
      if part == "heads" and layer is model.backbone:
        continue
      if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
        if part == "heads" and any(layer is l for l, _ in wrapped):
          continue
        wrapped.append((layer, wrap(layer, part)))
  model(tf.zeros((1, size, size, 3)), training=False)
  for layer, call in wrapped:
    layer.call = call
  return counts


def _build(cfg):
  """The trainer's model for one configuration, compiled with LARS."""
  import keras  # pylint: disable=g-import-not-at-top
  from tf_ssl import optim  # pylint: disable=g-import-not-at-top
  from tf_ssl.models import build_backbone  # pylint: disable=g-import-not-at-top
  from tf_ssl.models.contrastive import ContrastiveModel  # pylint: disable=g-import-not-at-top
  from tf_ssl.models.heads import ProjectionHead  # pylint: disable=g-import-not-at-top
  if cfg["dtype"] == "bf16":
    # Before any layer exists: the policy is read when a layer is made.
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
  keras.utils.set_random_seed(0)
  backbone = build_backbone(f"resnet{cfg['depth']}",
                            small_image_stem=cfg["cifar_stem"],
                            sync_bn=cfg["sync_bn"])
  # SimCLR v1 head: hidden width = the feature width (2048 for a ResNet-50).
  head = ProjectionHead(hidden_dim=None, output_dim=128, num_layers=2,
                        sync_bn=cfg["sync_bn"])
  model = ContrastiveModel(backbone, head, num_classes=cfg["classes"],
                           method="simclr", temperature=0.1)
  macs = _count_forward_macs(model, cfg["size"])
  model.compile(optimizer=optim.LARS(0.1, weight_decay=1e-6),
                jit_compile=cfg["jit"])
  return model, macs


def _fixed_batch(batch, size, classes, local_crops=0, local_size=0):
  """The in-memory batch every timed step sees: {"views" [B, 2, S, S, 3],
  "label" [B]}, from a fixed seed; with local crops "views" is
  {"global": [B, 2, S, S, 3], "local": [B, L, s, s, 3]}."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  views = tf.constant(rng.uniform(size=(batch, 2, size, size, 3)), tf.float32)
  if local_crops:
    views = {"global": views, "local": tf.constant(rng.uniform(
        size=(batch, local_crops, local_size, local_size, 3)), tf.float32)}
  return {"views": views,
          "label": tf.constant(rng.integers(0, classes, batch), tf.int64)}


def _method_batch(method, config, batch):
  """The fixed batch of `method` at `config`'s size: _fixed_batch's, or for
  a method that makes views of its own its views of random images; with
  the example index 0..batch-1 when the method takes one."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  d = config.data
  if not method.own_views:
    data = _fixed_batch(batch, d.image_size, FASHION_MNIST_CLASSES,
                        d.local_crops, d.local_crop_size)
  else:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, d.image_size, d.image_size, 3), np.uint8)
    views = method.augment(d)
    data = {"views": views.distort(views.crop_batch(images, tf.constant([0, 1])),
                                   tf.constant([2, 3])),
            "label": tf.constant(rng.integers(0, FASHION_MNIST_CLASSES, batch),
                                 tf.int64)}
  if "index" in method.batch_entries:
    data["index"] = tf.range(batch, dtype=tf.int64)
  return data


def _time_steps(model, data, warmup, timed, what):
  """Runs `model.train_function` warmup + timed times on `data`; returns
  (wall times, cpu times) of the timed steps, each ended by reading the
  loss, and the last loss (an error naming `what` if it is not finite)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  model.make_train_function()
  times, cpu = [], []
  for step in range(warmup + timed):
    start, cpu_start = time.perf_counter(), time.process_time()
    logs = model.train_function([data])
    loss = float(logs["loss"])
    if step >= warmup:
      times.append(time.perf_counter() - start)
      cpu.append(time.process_time() - cpu_start)
  if not np.isfinite(loss):
    raise FloatingPointError(f"loss {loss} in {what}")
  return times, cpu, loss


def run_config(cfg, warmup, timed):
  """Builds, warms up and times one configuration; returns a result dict."""
  model, macs = _build(cfg)
  data = _fixed_batch(cfg["batch"], cfg["size"], cfg["classes"])
  # The float32 peak is also measured next to every configuration: the
  # machine's load drifts, and the best of all measurements is the peak.
  peaks = [run_matmul(MATMUL_REPEATS_PER_CONFIG, ("float32",))]
  times, cpu, loss = _time_steps(model, data, warmup, timed, cfg)
  del model, data
  peaks.append(run_matmul(MATMUL_REPEATS_PER_CONFIG, ("float32",)))
  return {"times": times, "cpu_times": cpu, "macs": macs, "loss": loss,
          "peaks": peaks}


def run_matmul(repeats, dtypes=("float32", "bfloat16")):
  """Best FLOP/s of an N^3 matmul in a tf.function, per dtype.

  Also FLOPs per CPU-second (all threads' time), which other jobs on a shared
  machine disturb far less than the wall time.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out = {}
  for dtype in map(tf.as_dtype, dtypes):
    a = tf.cast(tf.random.normal((MATMUL_N, MATMUL_N), seed=1), dtype)
    b = tf.cast(tf.random.normal((MATMUL_N, MATMUL_N), seed=2), dtype)

    @tf.function
    def matmul(a, b):
      # Reading one element forces the whole product without copying it out.
      return tf.matmul(a, b)[0, 0]

    matmul(a, b).numpy()
    best, best_cpu = float("inf"), float("inf")
    for _ in range(repeats):
      start, cpu_start = time.perf_counter(), time.process_time()
      matmul(a, b).numpy()
      best = min(best, time.perf_counter() - start)
      best_cpu = min(best_cpu, time.process_time() - cpu_start)
    out[dtype.name] = 2 * MATMUL_N**3 / best
    out[dtype.name + "_per_cpu_s"] = 2 * MATMUL_N**3 / best_cpu
  return out


# ------------------------------------------------------ methods mode: subprocess

DEFAULT_CFG = os.path.join(_ROOT, "configs", "simclr_fashion_mnist.cfg")
FASHION_MNIST_TRAIN = 60000  # The schedules' length; no data is read.
FASHION_MNIST_CLASSES = 10
# (warm-up steps, timed steps) of one method's subprocess.
METHOD_STEPS = {"full": (3, 10), "quick": (2, 3)}
MOCO_QUEUE = 4096  # 32 batches of 128 (the module docstring says why).
PRED_HIDDEN = 512  # BYOL and MoCo v3 predictors: the projector's width.
REFERENCE_METHOD = "simclr"
# Methods timed with their own Fashion-MNIST file (method_config says why).
OWN_FILE = ("swav", "dino", "barlow_twins", "vicreg")


def methods_info():
  """{name: {"hooks": bool, "needs_labels": bool}} of every registered
  method, in registry order; hooks: the class overrides `before_step` or
  `after_update` (a target's EMA, a queue's enqueue)."""
  from tf_ssl import methods  # pylint: disable=g-import-not-at-top
  base = methods.Method
  return {name: {"hooks": (cls.before_step is not base.before_step or
                           cls.after_update is not base.after_update),
                 "needs_labels": bool(cls.needs_labels)}
          for name, cls in methods.REGISTRY.items()}


def queue_size(batch):
  """MOCO_QUEUE rounded down to a multiple of the batch (at least one)."""
  return max(batch, MOCO_QUEUE // batch * batch)


def method_file(name):
  """The method's own configs/<name>_fashion_mnist.cfg (moco_v2: mocov2_...),
  or None."""
  path = os.path.join(_ROOT, "configs",
                      name.replace("moco_v", "mocov") + "_fashion_mnist.cfg")
  return path if os.path.exists(path) else None


def method_config(name, batch, dtype="fp32"):
  """The PretrainConfig of `name` at the embedded default's size.

  DEFAULT_CFG parsed with the trainer's flags, with --method=name, the
  batch, the dtype, and the benchmark's method options; the file's method
  options are SimCLR's and are dropped for every other method. A method
  whose views or heads differ in shape from the default's (multi-crop, a
  3-layer projector) has its own Fashion-MNIST file read after
  DEFAULT_CFG, which is what its epochs are budgeted for. Parses the
  process-wide absl FLAGS (from their defaults): meant for the benchmark's
  subprocess.
  """
  import dataclasses  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from tf_ssl import flags as tf_ssl_flags  # pylint: disable=g-import-not-at-top
  from tf_ssl import methods  # pylint: disable=g-import-not-at-top
  fields = {f.name for f in dataclasses.fields(methods.get(name).Config)}
  own = name in OWN_FILE and method_file(name)
  options = {}
  if "queue_size" in fields:
    options["queue_size"] = queue_size(batch)
  if "pred_hidden_dim" in fields:
    options["pred_hidden_dim"] = PRED_HIDDEN
  if "queue_start_epoch" in fields:  # SwAV: enqueue from the first step
    options["queue_start_epoch"] = 0
  given = {methods.flag_name(name, k): v for k, v in options.items()}
  flags.FLAGS.unparse_flags()  # From the defaults, whatever was parsed before.
  ours = ["--workdir=unused", f"--method={name}", f"--global_batch_size={batch}",
          f"--mixed_precision={dtype == 'bf16'}"] + [
              f"--{flag}={value}" for flag, value in given.items()]
  flags.FLAGS(["bench_train", f"--flagfile={DEFAULT_CFG}"] + ours)
  if name != REFERENCE_METHOD:
    for flag in methods.flag_owners():
      if flag not in given and flags.FLAGS[flag].present:
        flags.FLAGS[flag].unparse()
  if own:
    flags.FLAGS(["bench_train", f"--flagfile={own}"] + ours)
  return tf_ssl_flags.pretrain_config()


def _no_op(*args, **kwargs):
  del args, kwargs


def _hooked_variables(model):
  """{"target": [...], "queue": [...]}: the variables only the hooks write
  (the target's averaged weights; the queue's keys)."""
  from tf_ssl.models import ema  # pylint: disable=g-import-not-at-top
  target = []
  for online, tgt in model.method.targets(model):
    target += ema.paired_variables([online], [tgt])[1]
  from tf_ssl.models.queue import KeyQueue  # pylint: disable=g-import-not-at-top
  queue = []  # The keys, not the write pointers.
  for layer in model._flatten_layers():  # pylint: disable=protected-access
    if isinstance(layer, KeyQueue):
      queue += [v for v in layer.variables if v.dtype.startswith("float")]
  return {"target": target, "queue": queue}


def _max_change(before, variables):
  import numpy as np  # pylint: disable=g-import-not-at-top
  if not variables:
    return None
  return max(float(np.max(np.abs(np.asarray(v.numpy(), np.float64) - b)))
             for v, b in zip(variables, before))


def run_method(job):
  """Builds, warms up and times one (method, hooks) job; returns a dict.

  job: {"method", "hooks", "batch", "dtype", "warmup", "timed"}; hooks
  False replaces the method's `before_step` and `after_update` by no-ops on
  its instance before the train function is first traced.
  """
  import dataclasses  # pylint: disable=g-import-not-at-top
  import keras  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from tf_ssl import runner  # pylint: disable=g-import-not-at-top
  from tf_ssl import train  # pylint: disable=g-import-not-at-top
  b = job["batch"]
  config = method_config(job["method"], b, job["dtype"])
  if job["dtype"] == "bf16":
    # Before any layer exists: the policy is read when a layer is made.
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
  keras.utils.set_random_seed(0)
  steps_per_epoch = max(1, FASHION_MNIST_TRAIN // b)
  total_steps = config.train_steps or runner.whole_executions(
      config.train_epochs * steps_per_epoch, config.run.steps_per_execution)
  method = train.build_method(config, total_steps, steps_per_epoch,
                              FASHION_MNIST_TRAIN)
  if not job["hooks"]:
    method.before_step = _no_op
    method.after_update = _no_op
  model = train.build_model(config, FASHION_MNIST_CLASSES, method)
  optimizer, _ = train.build_optimizer(config, steps_per_epoch, total_steps,
                                       method.optimizer_exclusions(),
                                       method.learning_rate_multipliers())
  model.compile(optimizer=optimizer, jit_compile=False)
  optimizer.build(model.trainable_variables)
  watched = _hooked_variables(model)
  before = {k: [np.asarray(v.numpy(), np.float64) for v in vs]
            for k, vs in watched.items()}
  s = config.data.image_size
  data = _method_batch(method, config, b)
  times, cpu, loss = _time_steps(model, data, job["warmup"], job["timed"], job)
  m = config.model
  return {"times": times, "cpu_times": cpu, "loss": loss,
          "target_change": _max_change(before["target"], watched["target"]),
          "queue_change": _max_change(before["queue"], watched["queue"]),
          "model": (f"{m.backbone} {s}px (small stem {m.small_image_stem}), "
                    f"projector {m.proj_layers} layers {m.proj_hidden_dim}->"
                    f"{m.proj_dim}, sync_bn {m.sync_bn}, {config.optimizer}"),
          "head": m.proj_head,
          "options": dataclasses.asdict(method.config),
          "params": int(model.count_params())}


# --------------------------------------------------------------------- driver

def cpu_description(cpuinfo="/proc/cpuinfo"):
  """The CPU model and which bfloat16 matmul instructions it has.

  A bfloat16 step can only beat float32 by what the matmul units allow:
  AMX tiles (amx_bf16) give several times the float32 rate, AVX-512 BF16
  (avx512_bf16, dot products of bf16 pairs) about twice. The measured
  bfloat16 / float32 matmul ratio printed below is the ceiling either way.
  """
  try:
    with open(cpuinfo) as f:
      text = f.read()
  except OSError:
    return "CPU: unknown (no /proc/cpuinfo)"
  model = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                if line.startswith("model name")), "unknown")
  cpu_flags = set()
  for line in text.splitlines():
    if line.startswith("flags"):
      cpu_flags.update(line.split(":", 1)[1].split())
  has = lambda flag: "yes" if flag in cpu_flags else "no"
  return (f"CPU: {model}; amx_bf16: {has('amx_bf16')}, "
          f"avx512_bf16: {has('avx512_bf16')}")


def _subprocess(args):
  proc = subprocess.run([sys.executable, os.path.abspath(__file__)] + args,
                        capture_output=True, text=True, cwd=_ROOT, check=False)
  if proc.returncode:
    sys.stderr.write(proc.stderr[-4000:])
    raise RuntimeError(f"bench_train {' '.join(args)} failed "
                       f"(exit {proc.returncode}); its stderr is above.")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="1 warm-up and 2 timed steps (--methods: 2 and 3), "
                      "one round (a smoke run).")
  parser.add_argument("--configs", default=None,
                      help="comma-separated names out of: " + ", ".join(CONFIGS)
                      + " (default: all of them).")
  parser.add_argument("--methods", default=None,
                      help="methods mode: 'all' or comma-separated tf_ssl.methods "
                      "names; one row per method at configs/simclr_fashion_mnist"
                      ".cfg's size (simclr, the reference, is always added).")
  parser.add_argument("--dtype", default=None, choices=("fp32", "bf16"),
                      help="methods mode: float32 (default) or mixed bfloat16.")
  parser.add_argument("--warmup", type=int, default=0,
                      help="methods mode: warm-up steps per run (default "
                      f"{METHOD_STEPS['full'][0]}, --quick {METHOD_STEPS['quick'][0]}).")
  parser.add_argument("--timed", type=int, default=0,
                      help="methods mode: timed steps per run (default "
                      f"{METHOD_STEPS['full'][1]}, --quick {METHOD_STEPS['quick'][1]}).")
  parser.add_argument("--batch", type=int, default=0,
                      help="override every configuration's batch (development).")
  parser.add_argument("--rounds", type=int, default=0,
                      help="rounds over the configurations or methods "
                      "(default 2, --quick 1); each reports its best.")
  parser.add_argument("--no_sync_bn", action="store_true",
                      help="plain BN instead of the trainer's default sync BN.")
  parser.add_argument("--_one", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--_matmul", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--_method", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--_methods_info", action="store_true",
                      help=argparse.SUPPRESS)
  args = parser.parse_args()
  warmup, timed = STEPS["quick" if args.quick else "full"]

  if args._matmul:  # pylint: disable=protected-access
    print(json.dumps(run_matmul(3 if args.quick else 6)))
    return
  if args._one:  # pylint: disable=protected-access
    print(json.dumps(run_config(json.loads(args._one), warmup, timed)))  # pylint: disable=protected-access
    return
  if args._method:  # pylint: disable=protected-access
    print(json.dumps(run_method(json.loads(args._method))))  # pylint: disable=protected-access
    return
  if args._methods_info:  # pylint: disable=protected-access
    print(json.dumps(methods_info()))
    return
  if args.methods is not None:
    if args.configs is not None or args.no_sync_bn:
      parser.error("--methods takes the default's configuration; drop "
                   "--configs and --no_sync_bn.")
    if args.batch < 0 or args.warmup < 0 or args.timed < 0 or args.rounds < 0:
      parser.error("--batch, --warmup, --timed and --rounds must be >= 0.")
    return main_methods(args, parser)
  for name in ("dtype", "warmup", "timed"):
    if getattr(args, name):
      parser.error(f"--{name} is an option of --methods.")

  names = [n.strip() for n in (args.configs or ",".join(CONFIGS)).split(",")
           if n.strip()]
  for name in names:
    if name not in CONFIGS:
      parser.error(f"--configs: unknown {name!r}; choose from {', '.join(CONFIGS)}.")
  rounds = args.rounds or ROUNDS["quick" if args.quick else "full"]
  passthrough = ["--quick"] if args.quick else []
  print(f"ContrastiveModel train step on CPU ({os.cpu_count()} cores): "
        f"{rounds} round(s), alternating the order, of one subprocess per "
        f"configuration with {warmup} warm-up + {timed} timed steps; a "
        f"configuration's figure is its fastest round's median step.", flush=True)
  print(cpu_description(), flush=True)
  peaks = [_subprocess(passthrough + ["--_matmul"])]
  results = {name: [] for name in names}
  for r in range(rounds):
    for name in names if r % 2 == 0 else names[::-1]:
      cfg = dict(CONFIGS[name], sync_bn=not args.no_sync_bn)
      if args.batch:
        cfg["batch"] = args.batch
      result = _subprocess(passthrough + ["--_one", json.dumps(cfg)])
      result["cfg"] = cfg
      results[name].append(result)
      print(f"  round {r + 1} {name}: {statistics.median(result['times']):.2f} "
            "s/step", flush=True)
  peaks.append(_subprocess(passthrough + ["--_matmul"]))
  report(peaks, results)


# ------------------------------------------------------- methods mode: driver

def registered_methods():
  """methods_info() from a subprocess: the driver never imports TensorFlow."""
  return _subprocess(["--_methods_info"])


def main_methods(args, parser):
  """--methods: one subprocess per (method, hooks) pair and round; prints
  the table and the `method_ratios ...` line; returns the results."""
  info = registered_methods()
  if args.methods.strip() == "all":
    names = list(info)
  else:
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    for name in names:
      if name not in info:
        parser.error(f"--methods: unknown {name!r}; choose from "
                     f"{', '.join(info)} or all.")
  if REFERENCE_METHOD not in names:
    names.insert(0, REFERENCE_METHOD)
  names = list(dict.fromkeys(names))
  mode = "quick" if args.quick else "full"
  warmup = args.warmup or METHOD_STEPS[mode][0]
  timed = args.timed or METHOD_STEPS[mode][1]
  rounds = args.rounds or ROUNDS[mode]
  batch = args.batch or 128
  dtype = args.dtype or "fp32"
  jobs = []
  for name in names:
    jobs.append((name, True))
    if info[name]["hooks"]:
      jobs.append((name, False))
  print(f"Pretraining methods' train step on CPU ({os.cpu_count()} cores) at "
        f"{os.path.relpath(DEFAULT_CFG, _ROOT)}'s size, batch {batch}, {dtype}: "
        f"{rounds} round(s), alternating the order, of one subprocess per "
        f"method and hooks on/off with {warmup} warm-up + {timed} timed steps; "
        "a run's figure is its fastest round's median step.", flush=True)
  print(cpu_description(), flush=True)
  results = {job: [] for job in jobs}
  for r in range(rounds):
    for name, hooks in jobs if r % 2 == 0 else jobs[::-1]:
      job = dict(method=name, hooks=hooks, batch=batch, dtype=dtype,
                 warmup=warmup, timed=timed)
      result = _subprocess(["--_method", json.dumps(job)])
      result["job"] = job
      results[(name, hooks)].append(result)
      print(f"  round {r + 1} {name} hooks {'on' if hooks else 'off'}: "
            f"{statistics.median(result['times']):.3f} s/step", flush=True)
  report_methods(results)
  return results


def _change(value):
  return "-" if value is None else f"{value:.1e}"


def report_methods(results):
  """Prints the methods table and, last, the `method_ratios ...` line.

  Args:
    results: (method, hooks) -> a list (one per round) of run_method's
      results, each with its "job"; hooks False: the no-hooks run of a
      target-network method. Must hold (REFERENCE_METHOD, True).

  Returns:
    {"ratios": {method: images/s over the reference's}, "hooks_overhead":
    {method: step with hooks / step without - 1}}.
  """
  rows = {}
  for key, runs in results.items():
    medians = [statistics.median(r["times"]) for r in runs]
    best = runs[medians.index(min(medians))]
    step = min(medians)
    rows[key] = dict(
        run=best, step=step, ips=best["job"]["batch"] / step, medians=medians,
        low=min(min(r["times"]) for r in runs),
        high=max(max(r["times"]) for r in runs),
        cpu_wall=statistics.median(best["cpu_times"]) / step)
  ref = rows[(REFERENCE_METHOD, True)]
  first = ref["run"]
  print(f"model: {first['model']}; batch {first['job']['batch']}, "
        f"{first['job']['dtype']}.")
  ratios, overhead = {}, {}
  header = (f"{'method':<10}{'hooks':>6}{'images/s':>10}{'step s':>9}"
            f"{'vs simclr':>10}{'hooks_overhead':>15}  note")
  print(header)
  print("-" * len(header))
  checks = []
  for (name, hooks), row in rows.items():
    ratio = row["ips"] / ref["ips"]
    has_split = (name, not hooks) in rows
    over = ""
    if hooks:
      ratios[name] = ratio
      if has_split:
        overhead[name] = row["step"] / rows[(name, False)]["step"] - 1
        over = f"{overhead[name]:+.3f}"
    run = row["run"]
    state = "on" if hooks else "off"
    if not has_split and hooks:
      state = "-"  # The method has no hooks.
    target, queue = run["target_change"], run["queue_change"]
    for what, change in (("target", target), ("queue", queue)):
      if change is not None and (change > 0) != hooks:
        checks.append(f"CHECK FAILED: {name} hooks {state}: the {what} "
                      f"{'did not change' if hooks else 'changed'} (max "
                      f"|change| {change:.1e}).")
    options = ", ".join([f"head {run['head']}"] +
                        [f"{k}={v}" for k, v in run["options"].items()])
    note = (f"round medians {'/'.join(f'{m:.3f}' for m in row['medians'])} s, "
            f"steps {row['low']:.3f}-{row['high']:.3f} s, "
            f"cpu/wall {row['cpu_wall']:.2f}, max |change| target "
            f"{_change(target)} queue {_change(queue)}; {options}")
    print(f"{name:<10}{state:>6}{row['ips']:>10.1f}{row['step']:>9.3f}"
          f"{ratio:>10.2f}{over:>15}  {note}")
  print("vs simclr = images/s over SimCLR's in this run (one image = two "
        "views). hooks off: the same step with before_step and after_update "
        "as no-ops (the target's forward passes stay); hooks_overhead = step "
        "with hooks / step without - 1, the EMA and enqueue alone (issue 13: "
        "<= 0.10). max |change| = the largest change over the run of the "
        "target's averaged weights and of the queue (0 when no hook wrote "
        "them).")
  for line in checks:
    print(line)
  parts = [f"{name}={ratio:.2f}" for name, ratio in ratios.items()
           if name != REFERENCE_METHOD]
  h = f"{max(overhead.values()):.3f}" if overhead else "nan"
  print(" ".join(["method_ratios"] + parts + [f"hooks_overhead_max={h}"]))
  return {"ratios": ratios, "hooks_overhead": overhead}


def _flops_per_step(result):
  """2 FLOPs per multiply-add x 3 (forward + backward) x 2 views x batch."""
  macs = result["macs"]["backbone"] + result["macs"]["heads"]
  return 2 * 3 * 2 * macs * result["cfg"]["batch"]


def report(peaks, results):
  """Prints the table and, last, the `peak_fraction_r50_224=...` line.

  Args:
    peaks: the matmul subprocesses' results (before and after the models).
    results: name -> a list (one per round) of run_config's results, each
      with its "cfg".
  """
  all_fp32 = peaks + [p for runs in results.values() for r in runs
                      for p in r["peaks"]]
  fp32_peak = max(p["float32"] for p in all_fp32)
  fp32_per_cpu_s = max(p["float32_per_cpu_s"] for p in all_fp32)
  bf16_rate = max(p["bfloat16"] for p in peaks)
  bf16_per_cpu_s = max(p["bfloat16_per_cpu_s"] for p in peaks)
  print(f"float32 matmul {MATMUL_N}^3 before / after all: "
        + " / ".join(f"{p['float32'] / 1e9:.1f}" for p in peaks)
        + " GFLOP/s; next to each configuration: "
        + ", ".join(f"{p['float32'] / 1e9:.0f}" for p in all_fp32[len(peaks):])
        + " (their spread is the machine's load).")
  print(f"float32 PEAK (best of all) = {fp32_peak / 1e9:.1f} GFLOP/s, "
        f"{fp32_per_cpu_s / 1e9:.1f} GFLOP per CPU-second.")
  print("bfloat16 matmul: "
        + " / ".join(f"{p['bfloat16'] / 1e9:.1f}" for p in peaks)
        + f" GFLOP/s, {bf16_per_cpu_s / 1e9:.1f} per CPU-second "
        f"({bf16_rate / fp32_peak:.2f}x float32 wall, "
        f"{bf16_per_cpu_s / fp32_per_cpu_s:.2f}x per CPU-second).")
  seen = set()
  for r in (runs[0] for runs in results.values()):
    key = (r["cfg"]["depth"], r["cfg"]["size"])
    if key not in seen:
      seen.add(key)
      m = r["macs"]
      print(f"ResNet-{key[0]} at {key[1]}px: forward {2 * m['backbone'] / 1e9:.3f}"
            f" GFLOP/view backbone + {2 * m['heads'] / 1e9:.4f} heads, counted "
            f"(issue: ~{REFERENCE_GFLOP.get(key[0], '?')}); the sum is used.")

  rows = []
  for name, runs in results.items():
    medians = [statistics.median(r["times"]) for r in runs]
    r = runs[medians.index(min(medians))]
    step = min(medians)
    cpu_step = statistics.median(r["cpu_times"])
    rows.append(dict(
        name=name, cfg=r["cfg"], step=step, ips=r["cfg"]["batch"] / step,
        fraction=_flops_per_step(r) / step / fp32_peak,
        cpu_fraction=_flops_per_step(r) / cpu_step / fp32_per_cpu_s,
        cpu_wall=cpu_step / step, medians=medians,
        low=min(min(r["times"]) for r in runs),
        high=max(max(r["times"]) for r in runs)))
  best = {}  # (depth, size, dtype) -> the row with the most images/s
  for row in rows:
    key = (row["cfg"]["depth"], row["cfg"]["size"], row["cfg"]["dtype"])
    if key not in best or row["ips"] > best[key]["ips"]:
      best[key] = row

  header = (f"{'model':<10}{'size':>5}{'batch':>6}{'dtype':>6}{'jit':>5}"
            f"{'images/s':>10}{'step s':>9}{'peak frac':>10}  note")
  print(header)
  print("-" * len(header))
  for row in rows:
    cfg = row["cfg"]
    is_best = best[(cfg["depth"], cfg["size"], cfg["dtype"])] is row
    note = (f"{'BEST ' + cfg['dtype'] + '; ' if is_best else ''}"
            f"round medians {'/'.join(f'{m:.2f}' for m in row['medians'])} s, "
            f"steps {row['low']:.2f}-{row['high']:.2f} s, "
            f"cpu/wall {row['cpu_wall']:.2f}, "
            f"per-cpu-s frac {row['cpu_fraction']:.2f}")
    print(f"{'ResNet-' + str(cfg['depth']):<10}{cfg['size']:>5}{cfg['batch']:>6}"
          f"{cfg['dtype']:>6}{'yes' if cfg['jit'] else 'no':>5}{row['ips']:>10.2f}"
          f"{row['step']:>9.2f}{row['fraction']:>10.3f}  {note}")
  print("peak frac = FLOP/s / float32 PEAK (wall). per-cpu-s frac = FLOPs per "
        "CPU-second / the matmul's (what the step would reach with all cores "
        "to itself). cpu/wall = cores busy on average; below the core count "
        "the step waited for other jobs or had too little parallel work.")
  for depth, size in sorted({k[:2] for k in best}):
    a, b = best.get((depth, size, "fp32")), best.get((depth, size, "bf16"))
    if a and b:
      print(f"ResNet-{depth} {size}px: bf16 ({b['name']}) / fp32 ({a['name']}) "
            f"images/s = {b['ips'] / a['ips']:.2f}")
  fp32, bf16 = best.get((50, 224, "fp32")), best.get((50, 224, "bf16"))
  x = f"{fp32['fraction']:.3f}" if fp32 else "nan"
  y = f"{bf16['ips'] / fp32['ips']:.2f}" if fp32 and bf16 else "nan"
  print(f"peak_fraction_r50_224={x} bf16_speedup_r50_224={y}")


if __name__ == "__main__":
  main()
