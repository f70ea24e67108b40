"""Train-step speed of ContrastiveModel on CPU, and its fraction of matmul peak.

    .venv/bin/python tools/bench_train.py                  # the whole table
    .venv/bin/python tools/bench_train.py --quick          # fewer steps
    .venv/bin/python tools/bench_train.py --configs r18_32_fp32,r18_32_bf16

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


def run_config(cfg, warmup, timed):
  """Builds, warms up and times one configuration; returns a result dict."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  model, macs = _build(cfg)
  rng = np.random.default_rng(0)
  b, s = cfg["batch"], cfg["size"]
  data = {"views": tf.constant(rng.uniform(size=(b, 2, s, s, 3)), tf.float32),
          "label": tf.constant(rng.integers(0, cfg["classes"], b), tf.int64)}
  model.make_train_function()
  # The float32 peak is also measured next to every configuration: the
  # machine's load drifts, and the best of all measurements is the peak.
  peaks = [run_matmul(MATMUL_REPEATS_PER_CONFIG, ("float32",))]
  times, cpu = [], []
  for step in range(warmup + timed):
    start, cpu_start = time.perf_counter(), time.process_time()
    logs = model.train_function([data])
    loss = float(logs["loss"])
    if step >= warmup:
      times.append(time.perf_counter() - start)
      cpu.append(time.process_time() - cpu_start)
  if not np.isfinite(loss):
    raise FloatingPointError(f"loss {loss} in {cfg}")
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
                      help="1 warm-up and 2 timed steps (a smoke run).")
  parser.add_argument("--configs", default=",".join(CONFIGS),
                      help="comma-separated names out of: " + ", ".join(CONFIGS))
  parser.add_argument("--batch", type=int, default=0,
                      help="override every configuration's batch (development).")
  parser.add_argument("--rounds", type=int, default=0,
                      help="rounds over the configurations (default 2, "
                      "--quick 1); each configuration reports its best.")
  parser.add_argument("--no_sync_bn", action="store_true",
                      help="plain BN instead of the trainer's default sync BN.")
  parser.add_argument("--_one", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--_matmul", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  warmup, timed = STEPS["quick" if args.quick else "full"]

  if args._matmul:  # pylint: disable=protected-access
    print(json.dumps(run_matmul(3 if args.quick else 6)))
    return
  if args._one:  # pylint: disable=protected-access
    print(json.dumps(run_config(json.loads(args._one), warmup, timed)))  # pylint: disable=protected-access
    return

  names = [n.strip() for n in args.configs.split(",") if n.strip()]
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
