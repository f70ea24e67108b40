"""tools/method_table.py without training: which methods run (finished ones
are kept, a failed one stops the queue), the trainer's command line, the
curve's minutes from the run's mean step time, the floors, the table and
the PNG, and one-line errors."""

import importlib.util
import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool():
  spec = importlib.util.spec_from_file_location(
      "method_table", os.path.join(REPO, "tools", "method_table.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


mt = _tool()


def _fake_run(out, name, steps=100, seconds=600.0, knn=((50, 0.5), (100, 0.6)),
              floors=False, finish=True):
  """A trainer's workdir: history.jsonl with periodic k-NN, results.json."""
  workdir = mt.workdir_of(out, name)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "history.jsonl"), "w") as f:
    for step in range(10, steps + 1, 10):
      row = {"step": step, "loss": 1.0}
      row.update({"knn_top1": a for s, a in knn if s == step})
      f.write(json.dumps(row) + "\n")
  if finish:
    results = {"knn_top1": 0.8, "linear_top1": 0.85, "train_steps": steps,
               "train_seconds": seconds, "wall_seconds": seconds + 60}
    if floors:
      results.update(raw_pixel_knn_top1=0.789, raw_pixel_linear_top1=0.827,
                     random_init_knn_top1=0.49, random_init_linear_top1=0.6)
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results, f)


def test_every_config_the_table_names_exists():
  for _, config, _, _ in mt.METHODS:
    assert os.path.exists(os.path.join(REPO, "configs", f"{config}.cfg")), config
  assert [m[0] for m in mt.select("byol,simclr")] == ["byol", "simclr"]
  with pytest.raises(ValueError, match="'simsiam' has no Fashion-MNIST config"):
    mt.select("simclr,simsiam")


def test_command_line_of_a_run(tmp_path):
  supcon = mt.select("supcon")[0]
  args = mt.command(supcon, str(tmp_path), train_epochs=1.5, mixed_precision=False,
                    floors=True, python="py")
  assert args[:4] == ["py", "-m", "tf_ssl.train", "--flagfile=configs/simclr_fashion_mnist.cfg"]
  assert f"--workdir={tmp_path}/runs/supcon" in args
  # The method flag follows the flagfile, so it replaces the file's.
  assert args.index("--method=supcon") > 3
  assert {"--baselines=true", "--train_epochs=1.5", "--mixed_precision=false"} <= set(args)
  plain = mt.command(supcon, str(tmp_path), python="py")
  assert "--baselines=false" in plain and not any("epochs" in a for a in plain)


def test_runs_skip_finished_methods_and_stop_at_a_failure(tmp_path):
  out = str(tmp_path)
  _fake_run(out, "simclr")
  launched = []

  def launch(args, log_path):
    name = args[4].rsplit("/", 1)[1]
    launched.append((name, "--baselines=true" in args))
    if name == "byol":
      _fake_run(out, "byol")
      return 0
    return 1  # moco_v2 fails: the queue stops before moco_v3.

  methods = mt.select("simclr,byol,moco_v2,moco_v3")
  mt.run_all(methods, out, launch=launch, log=lambda *_: None)
  # simclr was finished; byol evaluated the floors (no finished run had them).
  assert launched == [("byol", True), ("moco_v2", False)]


def test_collect_converts_steps_to_training_minutes(tmp_path):
  out = str(tmp_path)
  _fake_run(out, "simclr", steps=100, seconds=600.0, floors=True)
  _fake_run(out, "byol", finish=False)
  report = mt.collect(out, mt.select("simclr,byol,vicreg"), "cmd", {"simclr": "1.00"})
  simclr, byol, vicreg = report["methods"]
  # 600 s over 100 steps: step 50 is at 5 minutes, step 100 at 10.
  assert simclr["curve"] == [[5.0, 0.5], [10.0, 0.6]]
  assert simclr["train_minutes"] == 10.0 and simclr["wall_minutes"] == 11.0
  assert byol["status"] == "unfinished" and byol["last_step"] == 100
  assert vicreg["status"] == "not run"
  assert report["floors"]["raw_pixel"] == {"knn_top1": 0.789, "linear_top1": 0.827}
  assert report["machine"]["load_at_start"] == {"simclr": "1.00"}
  text = mt.table(report)
  assert "| simclr | 80.0 | 85.0 | 10.0 | 11.0 |  |" in text
  assert "| byol | | | | | unfinished |" in text and "| raw pixels | 78.9 | 82.7 |" in text
  mt.write(report, out)
  with open(os.path.join(out, "method_table.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with open(os.path.join(out, "method_table.json")) as f:
    assert json.load(f) == json.loads(json.dumps(report))
  # A rebuild keeps the command that trained and the loads it recorded.
  rebuilt = mt.collect(out, mt.select("simclr"), None, {})
  assert rebuilt["command"] == "cmd"
  assert rebuilt["machine"]["load_at_start"] == {"simclr": "1.00"}


def test_collect_only_and_bad_flags(tmp_path, capsys):
  _fake_run(str(tmp_path), "vicreg")
  assert mt.main([f"--out={tmp_path}", "--methods=vicreg", "--collect_only"]) == 0
  assert "| vicreg | 80.0 | 85.0 |" in capsys.readouterr().out
  assert mt.main([f"--out={tmp_path}", "--methods=nope"]) == 2
  assert "method_table: error: --methods: 'nope'" in capsys.readouterr().err
  assert mt.main([f"--out={tmp_path}", "--train_epochs=0"]) == 2
