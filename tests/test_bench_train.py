"""tools/bench_train.py: the FLOP count against hand counts and published
figures, one tiny configuration end to end, and the report's arithmetic;
the --methods mode's configurations, a tiny run of it end to end (with the
hooks really off in the no-hooks run) and its report's arithmetic.
No timing assertions."""

import os
import re
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "tools"))
import bench_train  # pylint: disable=g-import-not-at-top,wrong-import-position


def _cfg(depth=18, size=32, batch=2, cifar_stem=True, classes=10):
  return dict(depth=depth, size=size, batch=batch, cifar_stem=cifar_stem,
              classes=classes, dtype="fp32", jit=False, sync_bn=True)


def _resnet18_cifar_macs(size=32):
  """Conv multiply-adds of ResNet-18 with the 3x3 stride-1 stem, by hand.

  Every block's first unit has a 1x1 projection shortcut, block1's included
  (the SimCLR reference's ResNet; docs/recipes.md)."""
  total = size * size * 3 * 3 * 3 * 64  # stem
  hw, cin = size, 64
  for cout in (64, 128, 256, 512):
    if cout != cin:  # strided first unit: 3x3 s2, 1x1 s2 projection
      hw //= 2
      total += hw * hw * (9 * cin * cout + cin * cout)
      total += hw * hw * 9 * cout * cout
    else:  # block1: stride 1, 64 -> 64, still a 1x1 projection
      total += 2 * hw * hw * 9 * cout * cout + hw * hw * cin * cout
    total += 2 * hw * hw * 9 * cout * cout  # second unit
    cin = cout
  return total


def test_counted_flops_resnet18_cifar_match_hand_count():
  _, macs = bench_train._build(_cfg())  # pylint: disable=protected-access
  assert macs["backbone"] == _resnet18_cifar_macs() == 559_611_904
  # Projection head 512-512-128 and the 10-class probe.
  assert macs["heads"] == 512 * 512 + 512 * 128 + 512 * 10


def test_counted_flops_resnet50_224_match_published():
  _, macs = bench_train._build(_cfg(50, 224, 1, False, 1000))  # pylint: disable=protected-access
  # torchvision lists ResNet-50 (v1.5) at 4.09 G multiply-adds including the
  # 2048x1000 classifier; the "8.2 GFLOP per view" is the same figure.
  assert abs(macs["backbone"] + 2048 * 1000 - 4.09e9) < 0.01e9
  assert macs["heads"] == 2048 * 2048 + 2048 * 128 + 2048 * 1000


def test_tiny_configuration_runs(monkeypatch):
  monkeypatch.setattr(bench_train, "MATMUL_N", 64)
  result = bench_train.run_config(_cfg(), warmup=1, timed=2)
  assert len(result["times"]) == len(result["cpu_times"]) == 2
  assert all(t > 0 for t in result["times"])
  assert result["loss"] > 0
  assert len(result["peaks"]) == 2 and result["peaks"][0]["float32"] > 0


def _fake(depth, size, dtype, jit, step, batch=32, macs=4e9):
  cfg = dict(_cfg(depth, size, batch), dtype=dtype, jit=jit)
  peak = {"float32": 1e11, "float32_per_cpu_s": 5e10}
  return [{"cfg": cfg, "times": [step, step * 1.1, step * 0.9],
          "cpu_times": [2 * step] * 3, "macs": {"backbone": macs, "heads": 0},
          "peaks": [peak]}]


def test_report_uses_the_best_round_and_the_best_of_jit_and_no_jit(capsys):
  peaks = [{"float32": 1e11, "float32_per_cpu_s": 5e10,
            "bfloat16": 2e11, "bfloat16_per_cpu_s": 1e11}] * 2
  results = {
      # Two rounds: the faster one counts.
      "r50_224_fp32": (_fake(50, 224, "fp32", False, 30.0) +
                       _fake(50, 224, "fp32", False, 20.0)),
      "r50_224_fp32_jit": _fake(50, 224, "fp32", True, 16.0),
      "r50_224_bf16": _fake(50, 224, "bf16", False, 10.0),
      "r50_224_bf16_jit": _fake(50, 224, "bf16", True, 40.0),
  }
  bench_train.report(peaks, results)
  lines = capsys.readouterr().out.strip().splitlines()
  # 12 x 4e9 x 32 FLOPs in 16 s over 1e11 FLOP/s; bf16 32/10 over fp32 32/16.
  fraction = 12 * 4e9 * 32 / 16.0 / 1e11
  assert lines[-1] == (f"peak_fraction_r50_224={fraction:.3f} "
                       "bf16_speedup_r50_224=1.60")
  table = [l for l in lines if l.startswith("ResNet-50   224")]
  assert len(table) == 4
  assert "BEST fp32" in table[1] and "BEST bf16" in table[2]
  assert "round medians 30.00/20.00 s" in table[0]
  assert f"{32 / 20.0:10.2f}{20.0:9.2f}" in table[0]


def test_cpu_description_names_the_bf16_instructions(tmp_path):
  cpuinfo = tmp_path / "cpuinfo"
  cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU\n"
                     "flags\t\t: fpu avx512f avx512_bf16\n")
  assert bench_train.cpu_description(str(cpuinfo)) == (
      "CPU: Some CPU; amx_bf16: no, avx512_bf16: yes")
  cpuinfo.write_text("model name\t: Other\nflags\t\t: amx_bf16 amx_tile\n")
  assert "amx_bf16: yes, avx512_bf16: no" in bench_train.cpu_description(str(cpuinfo))
  assert "unknown" in bench_train.cpu_description(str(tmp_path / "missing"))


# ---------------------------------------------------------------- --methods

@pytest.fixture
def flags_reset():
  """method_config parses the process-wide FLAGS; other tests start from
  the defaults again."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  yield
  flags.FLAGS.unparse_flags()


def test_method_config_is_the_default_at_its_size(flags_reset):  # pylint: disable=redefined-outer-name,unused-argument
  del flags_reset
  configs = {name: bench_train.method_config(name, 128)
             for name in ("simclr", "supcon", "byol", "moco_v2", "moco_v3")}
  for config in configs.values():
    assert config.global_batch_size == 128
    assert config.data.image_size == 28
    assert (config.model.backbone, config.model.small_image_stem) == (
        "resnet18x0.25", True)
    assert (config.model.proj_layers, config.model.proj_hidden_dim,
            config.model.proj_dim, config.model.sync_bn) == (2, 512, 128, False)
    assert config.optimizer == "lars"
    assert not config.run.mixed_precision
  # The file's temperature is SimCLR's; every other method keeps its own.
  assert configs["simclr"].method_options == {"temperature": 0.2}
  assert configs["supcon"].method_options == {}
  assert configs["moco_v2"].method_options == {"queue_size": 4096}
  assert configs["byol"].method_options == {"pred_hidden_dim": 512}
  assert configs["moco_v3"].method_options == {"pred_hidden_dim": 512}
  assert bench_train.method_config("moco_v2", 24).method_options == {
      "queue_size": 4080}
  assert bench_train.method_config("simclr", 8, "bf16").run.mixed_precision
  # Multi-crop and 3-layer heads: the method's own file's shapes.
  swav = bench_train.method_config("swav", 128)
  assert (swav.data.local_crops, swav.data.local_crop_size) == (6, 12)
  assert swav.method_options["prototypes"] == 512
  assert bench_train.method_config("vicreg", 128).model.proj_layers == 3


def test_methods_info_marks_the_methods_with_hooks():
  info = bench_train.methods_info()
  assert {n for n, i in info.items() if i["hooks"]} == {
      "byol", "moco_v2", "moco_v3", "swav", "dino", "pirl"}
  assert info["supcon"]["needs_labels"] and not info["simclr"]["needs_labels"]


def test_methods_mode_end_to_end(monkeypatch, capsys):
  # Tiny: batch 8, 2 warm-up + 2 timed steps, one round; SimCLR, BYOL with
  # hooks and BYOL without, each in its own subprocess. The registry is
  # read in this process (the driver asks a subprocess otherwise).
  monkeypatch.setattr(bench_train, "registered_methods",
                      bench_train.methods_info)
  monkeypatch.setattr(sys, "argv", [
      "bench_train.py", "--methods", "simclr,byol", "--batch", "8",
      "--warmup", "2", "--timed", "2", "--rounds", "1"])
  results = bench_train.main()
  out = capsys.readouterr().out
  lines = out.strip().splitlines()

  assert set(results) == {("simclr", True), ("byol", True), ("byol", False)}
  for runs in results.values():
    assert len(runs) == 1 and len(runs[0]["times"]) == 2
    assert runs[0]["loss"] > 0
  assert results[("byol", True)][0]["options"] == {
      "momentum": 0.996, "pred_hidden_dim": 512,
      "predictor_lr_multiplier": 1.0}
  # The hooks write the target; without them it keeps its initial weights.
  assert results[("byol", True)][0]["target_change"] > 0
  assert results[("byol", False)][0]["target_change"] == 0
  assert results[("simclr", True)][0]["target_change"] is None
  assert "CHECK FAILED" not in out

  rows = {tuple(l.split()[:2]): l.split() for l in lines
          if l.split()[:1] in (["simclr"], ["byol"])}
  assert set(rows) == {("simclr", "-"), ("byol", "on"), ("byol", "off")}
  assert rows[("simclr", "-")][4] == "1.00"  # vs simclr
  for row in rows.values():
    assert float(row[2]) > 0 and float(row[3]) > 0  # images/s, step s
  match = re.fullmatch(
      r"method_ratios byol=(\d+\.\d\d) hooks_overhead_max=(-?\d+\.\d+)",
      lines[-1])
  assert match, lines[-1]
  assert match.group(1) == rows[("byol", "on")][4]
  assert float(match.group(2)) == pytest.approx(
      float(rows[("byol", "on")][5]), abs=1e-3)


def _fake_method(name, hooks, steps, target=None, queue=None, batch=128):
  return [{"job": dict(method=name, hooks=hooks, batch=batch, dtype="fp32"),
           "times": [s, s * 1.2, s * 0.9], "cpu_times": [2 * s] * 3,
           "loss": 1.0, "target_change": target, "queue_change": queue,
           "model": "m", "head": "h", "options": {}} for s in steps]


def test_report_methods_arithmetic(capsys):
  results = {
      ("simclr", True): _fake_method("simclr", True, [0.6, 0.5]),
      ("byol", True): _fake_method("byol", True, [1.1], 0.1),
      ("byol", False): _fake_method("byol", False, [1.0], 0.0),
      ("moco_v2", True): _fake_method("moco_v2", True, [0.8], 0.1, 0.5),
      ("moco_v2", False): _fake_method("moco_v2", False, [0.78, 0.75], 0.0,
                                       0.0),
  }
  out = bench_train.report_methods(results)
  lines = capsys.readouterr().out.strip().splitlines()
  # Best rounds: simclr 0.5 s, byol 1.1 / 1.0, moco_v2 0.8 / 0.75.
  assert out["ratios"] == pytest.approx(
      {"simclr": 1.0, "byol": 0.5 / 1.1, "moco_v2": 0.5 / 0.8})
  assert out["hooks_overhead"] == pytest.approx(
      {"byol": 0.1, "moco_v2": 0.8 / 0.75 - 1})
  assert lines[-1] == (f"method_ratios byol={0.5 / 1.1:.2f} "
                       f"moco_v2={0.5 / 0.8:.2f} hooks_overhead_max="
                       f"{max(0.1, 0.8 / 0.75 - 1):.3f}")
  assert not any("CHECK FAILED" in l for l in lines)
  # A no-hooks run whose target moved, or a run with hooks whose queue
  # did not, is reported.
  results[("byol", False)] = _fake_method("byol", False, [1.0], 0.2)
  results[("moco_v2", True)] = _fake_method("moco_v2", True, [0.8], 0.1, 0.0)
  bench_train.report_methods(results)
  checks = [l for l in capsys.readouterr().out.splitlines()
            if l.startswith("CHECK FAILED")]
  assert len(checks) == 2
  assert "byol hooks off: the target changed" in checks[0]
  assert "moco_v2 hooks on: the queue did not change" in checks[1]
