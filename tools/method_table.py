r"""Every pretraining method at equal compute on one machine: accuracy per CPU-minute.

    .venv/bin/python tools/method_table.py --out=runs/method_table
    .venv/bin/python tools/method_table.py --methods=simclr,byol,barlow_twins \
        --train_epochs=1 --out=runs/method_table_1ep

For each method, one after the other, the trainer runs its Fashion-MNIST
config in its own process:

    python -m tf_ssl.train --flagfile=configs/<method>_fashion_mnist.cfg \
        --workdir=<out>/runs/<method> [--train_epochs=E] [--mixed_precision=B]

Budget: each config's own epochs (the default), which fill the SimCLR
default's budget by the methods' measured step-time ratios (README, "Other
methods at the default's size"); or --train_epochs for all alike. Every run
keeps its config's periodic k-NN (a fixed 5,000-image bank and query set,
every 1,000 steps), which gives each method's curve, and ends with the
trainer's k-NN and linear evaluation on the whole splits. The first run
launched by this command also evaluates the floors, raw pixels and the
random-init encoder (--floors=false: none).

Resumption: a method whose workdir has results.json is not run again; an
interrupted one resumes from its checkpoint (the trainer's own resume), so
rerunning the command after a preemption continues where it stopped. Ctrl-C
or SIGTERM stops the running trainer gracefully (it checkpoints) and ends
the command. The table is rebuilt from whatever has finished, so
--collect_only gives it without training.

Writes to --out:
  method_table.json  per method: config, status, final k-NN and linear
                     top-1, train and wall minutes, and the k-NN curve as
                     [training minutes, top-1] pairs; the floors; the
                     machine (CPU model, cores, load at each run's start).
  method_table.png   k-NN top-1 against training minutes, one line per
                     method, the full-split final k-NN as a marker at the
                     run's end, the floors as dashed lines.
and prints the table (top-1 %). Training minutes of a curve point are its
step times the run's mean step time (its train time over its steps), so a
point is where the run was at that fraction of its training time.

SupCon trains with the labels (every Fashion-MNIST image is labelled): its
row says so. A method without a Fashion-MNIST config is an error naming the
configs that exist.
"""

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import matplotlib  # pylint: disable=g-import-not-at-top

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (method, config name under configs/, extra trainer flags, note).
METHODS = (
    ("simclr", "simclr_fashion_mnist", (), ""),
    ("supcon", "simclr_fashion_mnist", ("--method=supcon",), "uses the labels"),
    ("byol", "byol_fashion_mnist", (), ""),
    ("moco_v2", "mocov2_fashion_mnist", (), ""),
    ("moco_v3", "mocov3_fashion_mnist", (), ""),
    ("swav", "swav_fashion_mnist", (), ""),
    ("dino", "dino_fashion_mnist", (), ""),
    ("barlow_twins", "barlow_twins_fashion_mnist", (), ""),
    ("vicreg", "vicreg_fashion_mnist", (), ""),
    ("pirl", "pirl_fashion_mnist", (), ""),
    ("rotation", "rotation_fashion_mnist", (), ""),
    ("jigsaw", "jigsaw_fashion_mnist", (), ""),
)
FLOORS = (("raw_pixel", "raw pixels"), ("random_init", "random init"))


# ------------------------------------------------------------------- plan
def select(names):
  """The METHODS entries for a comma-separated list ("all": every one)."""
  known = {m[0]: m for m in METHODS}
  if names in (None, "", "all"):
    return list(METHODS)
  chosen = []
  for name in names.split(","):
    name = name.strip()
    if name not in known:
      raise ValueError(f"--methods: {name!r} has no Fashion-MNIST config here; "
                       f"known: {', '.join(known)}.")
    chosen.append(known[name])
  return chosen


def command(method, out, train_epochs=None, mixed_precision=None, floors=False,
            python=sys.executable):
  """The trainer's command line for one METHODS entry."""
  name, config, extra, _ = method
  args = [python, "-m", "tf_ssl.train", f"--flagfile=configs/{config}.cfg",
          f"--workdir={workdir_of(out, name)}", *extra,
          f"--baselines={'true' if floors else 'false'}"]
  if train_epochs is not None:
    args.append(f"--train_epochs={train_epochs:g}")
  if mixed_precision is not None:
    args.append(f"--mixed_precision={'true' if mixed_precision else 'false'}")
  return args


def workdir_of(out, name):
  return os.path.join(out, "runs", name)


def finished(out, name):
  return os.path.exists(os.path.join(workdir_of(out, name), "results.json"))


# -------------------------------------------------------------------- run
class _Stop:
  """SIGINT / SIGTERM: forward SIGTERM to the running trainer, then stop."""

  def __init__(self):
    self.requested = False
    self.child = None

  def __call__(self, signum, frame):
    del signum, frame
    self.requested = True
    if self.child is not None and self.child.poll() is None:
      self.child.send_signal(signal.SIGTERM)


def run_all(methods, out, train_epochs=None, mixed_precision=None, floors=True,
            launch=None, log=print):
  """Runs every method not yet finished, in order; returns the start loads.

  launch(args, log_path) -> return code runs one trainer (default: a
  subprocess in the repository, its output appended to log_path, stopped
  with SIGTERM on Ctrl-C). The first run launched evaluates the floors
  unless some finished run has them already.
  """
  stop = _Stop()
  if launch is None:
    def launch(args, log_path):
      with open(log_path, "a") as f:
        stop.child = subprocess.Popen(args, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
        return stop.child.wait()
    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
  else:
    previous = {}
  loads = {}
  need_floors = floors and not _floors(out, methods)
  try:
    for method in methods:
      name = method[0]
      if finished(out, name):
        log(f"{name}: finished earlier, kept ({workdir_of(out, name)}/results.json)")
        continue
      if stop.requested:
        break
      os.makedirs(workdir_of(out, name), exist_ok=True)
      args = command(method, out, train_epochs, mixed_precision, floors=need_floors)
      loads[name] = _load()
      log(f"{name}: {' '.join(args[1:])}  (load {loads[name]})")
      t = time.time()
      code = launch(args, os.path.join(out, "runs", f"{name}.log"))
      log(f"{name}: exit {code} after {(time.time() - t) / 60:.1f} min")
      if code != 0 or stop.requested or not finished(out, name):
        log(f"{name}: stopped before its results; rerun the command to resume it.")
        break
      need_floors = False
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  return loads


def _load():
  try:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())
  except OSError:
    return "?"


# ---------------------------------------------------------------- collect
def _read_json(path):
  with open(path) as f:
    return json.load(f)


def _history(workdir):
  path = os.path.join(workdir, "history.jsonl")
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line:
        rows.append(json.loads(line))
  return rows


def collect_one(out, method):
  """One method's row: status, final accuracies, minutes and curve."""
  name, config, extra, note = method
  workdir = workdir_of(out, name)
  row = {"method": name, "config": f"configs/{config}.cfg", "extra_flags": list(extra),
         "note": note, "workdir": workdir}
  history = _history(workdir)
  knn = [(r["step"], r["knn_top1"]) for r in history if "knn_top1" in r]
  results_path = os.path.join(workdir, "results.json")
  if not os.path.exists(results_path):
    row["status"] = "unfinished" if history else "not run"
    if history:
      row["last_step"] = max(r["step"] for r in history)
    row["curve_steps"] = [[s, a] for s, a in knn]
    return row
  results = _read_json(results_path)
  steps, seconds = results["train_steps"], results["train_seconds"]
  per_step = seconds / steps / 60 if steps else 0.0
  row.update(status="finished", knn_top1=results["knn_top1"],
             linear_top1=results["linear_top1"], train_steps=steps,
             train_minutes=seconds / 60,
             wall_minutes=results["wall_seconds"] / 60,
             curve=[[round(s * per_step, 3), a] for s, a in knn])
  for prefix, _ in FLOORS:
    if f"{prefix}_knn_top1" in results:
      row[f"{prefix}_knn_top1"] = results[f"{prefix}_knn_top1"]
      row[f"{prefix}_linear_top1"] = results[f"{prefix}_linear_top1"]
  return row


def _floors(out, methods):
  """{"raw_pixel": {"knn_top1", "linear_top1"}, ...} from any finished run."""
  floors = {}
  for method in methods:
    if not finished(out, method[0]):
      continue
    row = collect_one(out, method)
    for prefix, _ in FLOORS:
      if f"{prefix}_knn_top1" in row and prefix not in floors:
        floors[prefix] = {"knn_top1": row[f"{prefix}_knn_top1"],
                          "linear_top1": row[f"{prefix}_linear_top1"]}
  return floors


def collect(out, methods, command_line=None, loads=None):
  """The report of every method's workdir under `out`."""
  previous = {}
  path = os.path.join(out, "method_table.json")
  if os.path.exists(path):
    previous = _read_json(path)
  report = {
      # A rebuild (command_line None) keeps the command that trained.
      "command": command_line or previous.get("command"),
      "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(),
                  "platform": platform.platform(),
                  "load_at_start": {
                      **previous.get("machine", {}).get("load_at_start", {}),
                      **(loads or {})}},
      "methods": [collect_one(out, m) for m in methods],
      "floors": _floors(out, methods),
  }
  return report


def _cpu_model():
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


# ----------------------------------------------------------------- output
def table(report):
  """Markdown table (top-1 %) of the finished methods, then the floors."""
  lines = ["| method | k-NN | linear | train min | wall min | note |",
           "|---|---|---|---|---|---|"]
  for row in report["methods"]:
    if row["status"] == "finished":
      lines.append(f"| {row['method']} | {100 * row['knn_top1']:.1f} | "
                   f"{100 * row['linear_top1']:.1f} | {row['train_minutes']:.1f} | "
                   f"{row['wall_minutes']:.1f} | {row['note']} |")
    else:
      lines.append(f"| {row['method']} | | | | | {row['status']} |")
  for prefix, label in FLOORS:
    floor = report["floors"].get(prefix)
    if floor:
      lines.append(f"| {label} | {100 * floor['knn_top1']:.1f} | "
                   f"{100 * floor['linear_top1']:.1f} | | | floor |")
  return "\n".join(lines)


def plot(report, path):
  """k-NN top-1 (%) against training minutes, one line per finished method."""
  from tf_ssl import plots  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(8.5, 4.5))
  finished = [r for r in report["methods"] if r["status"] == "finished"]
  # tab20's ten dark shades, then its ten light ones: a colour per method
  # for up to 20 (the default cycle repeats after 10). The curve's own
  # points are marked, so a one-point curve shows.
  tab20 = plt.get_cmap("tab20").colors
  colours = tab20[0::2] + tab20[1::2]
  for i, row in enumerate(finished):
    colour = colours[i % len(colours)]
    curve = row["curve"]
    ax.plot([m for m, _ in curve], [100 * a for _, a in curve], "-",
            marker=".", color=colour,
            label=f"{row['method']} ({100 * row['knn_top1']:.1f})")
    ax.plot([row["train_minutes"]], [100 * row["knn_top1"]], "o", color=colour)
  for (prefix, label), style in zip(FLOORS, ("--", ":")):
    floor = report["floors"].get(prefix)
    if floor:
      ax.axhline(100 * floor["knn_top1"], color="grey", linestyle=style,
                 label=f"{label} ({100 * floor['knn_top1']:.1f})")
  ax.set_xlabel("training minutes")
  ax.set_ylabel("k-NN top-1 (%)")
  ax.set_title("Fashion-MNIST, equal budget: lines = periodic k-NN (5,000), "
               "dots = final (all)", fontsize=9)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
  fig.tight_layout()
  plots.save_png(fig, path)
  plt.close(fig)


def write(report, out):
  path = os.path.join(out, "method_table.json")
  with open(path + ".tmp", "w") as f:
    json.dump(report, f, indent=2)
  os.replace(path + ".tmp", path)
  if any(r["status"] == "finished" for r in report["methods"]):
    plot(report, os.path.join(out, "method_table.png"))


# ------------------------------------------------------------------- main
def _bool(text):
  if text.lower() in ("true", "1", "yes"):
    return True
  if text.lower() in ("false", "0", "no"):
    return False
  raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def parser():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True, help="Directory for runs/, the JSON and the PNG.")
  p.add_argument("--methods", default="all",
                 help="Comma-separated method names (default: all).")
  p.add_argument("--train_epochs", type=float, default=None,
                 help="Epochs for every method (default: each config's budget).")
  p.add_argument("--mixed_precision", type=_bool, default=None,
                 help="Override the configs' precision (false on CPUs without bf16).")
  p.add_argument("--floors", type=_bool, default=True,
                 help="Raw pixels and random init, evaluated by the first run.")
  p.add_argument("--collect_only", action="store_true",
                 help="Rebuild the table from the workdirs; train nothing.")
  return p


def main(argv=None):
  args = parser().parse_args(argv)
  args.out = os.path.abspath(args.out)  # The trainers run in the repository.
  try:
    methods = select(args.methods)
    if args.train_epochs is not None and args.train_epochs <= 0:
      raise ValueError(f"--train_epochs={args.train_epochs}: must be positive.")
  except ValueError as e:
    print(f"method_table: error: {e}", file=sys.stderr)
    return 2
  os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
  loads = {}
  if not args.collect_only:
    loads = run_all(methods, args.out, args.train_epochs, args.mixed_precision,
                    args.floors)
  command = None if args.collect_only else " ".join(
      [os.path.basename(sys.executable)] + sys.argv)
  report = collect(args.out, methods, command, loads)
  write(report, args.out)
  print(table(report))
  return 0


if __name__ == "__main__":
  sys.exit(main())
