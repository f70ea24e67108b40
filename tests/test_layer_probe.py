"""tools/layer_probe.py: the probe ranks an informative layer above noise;
pooled endpoints are the feature maps' means; a whole command on tiny
workdirs writes its table, JSON and PNG; the per-run cache (one more
workdir probes only that one, changed settings probe again); and each user
error ends the command with one line."""

import importlib.util
import json
import os
import shutil

from absl import flags as absl_flags
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from tf_ssl import checkpoints
from tf_ssl import evaluate
from tf_ssl.data import pipeline
from tf_ssl.data import sources
from tf_ssl.models import ProjectionHead, build_backbone
from tf_ssl.models.contrastive import ContrastiveModel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 16  # conftest's image_folder: 32 16-px images, 2 classes.
ENDPOINTS = ["stem", "block1", "block2", "block3", "block4", "features"]
FAST = dict(examples=20, linear_steps=20, batch_size=16)


def _tool():
  spec = importlib.util.spec_from_file_location(
      "layer_probe", os.path.join(REPO, "tools", "layer_probe.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


lp = _tool()


def _flags_txt(root, dataset, backbone="resnet18x0.25"):
  (root / "flags.txt").write_text(
      f"--nohelp\n--backbone={backbone}\n--dataset={dataset}\n"
      f"--image_size={SIZE}\n--small_image_stem\n--method=simclr\n")


def _pngs(root, classes, per_class):
  """Tiny PNGs, in class folders (classes > 0) or flat (classes = 0)."""
  rng = np.random.default_rng(0)
  for c in range(max(classes, 1)):
    folder = root / f"class{c}" if classes else root
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(per_class):
      Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(
          folder / f"{i}.png")
  return str(root)


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory, image_folder):
  """Two pretraining workdirs (random-init ResNet-18 x0.25 with a 2-class
  online probe, as the trainer files them) on conftest's image folder, and
  broken ones sharing the first one's checkpoint."""
  root = tmp_path_factory.mktemp("layer_probe")
  dataset = f"folder:{image_folder}"
  dirs = {}
  for name in ("a", "b"):
    model = ContrastiveModel(build_backbone("resnet18x0.25", small_image_stem=True),
                             ProjectionHead(16, 8, 2), num_classes=2)
    model(tf.zeros((2, SIZE, SIZE, 3)))
    checkpoints.make_checkpoint(model).write(str(root / name / "checkpoints" / "ckpt-3"))
    _flags_txt(root / name, dataset)
    dirs[name] = str(root / name)
  broken = {
      "no_checkpoint": dataset,
      "other_backbone": dataset,
      "other_dataset": "folder:" + _pngs(root / "three_classes", 3, 2),
      "unlabelled": "folder:" + _pngs(root / "flat", 0, 4),
  }
  for name, data in broken.items():
    if name != "no_checkpoint":
      shutil.copytree(root / "a" / "checkpoints", root / name / "checkpoints")
    (root / name).mkdir(exist_ok=True)
    _flags_txt(root / name, data,
               "resnet34x0.25" if name == "other_backbone" else "resnet18x0.25")
    dirs[name] = str(root / name)
  return dirs


def test_probe_ranks_an_informative_layer_above_noise():
  """Endpoint "signal" holds the class (its mean) under noise, "noise" only
  noise: the logistic regression finds one and not the other, and equal
  features give equal accuracy (the fit is deterministic)."""
  rng = np.random.default_rng(0)
  classes, dim = 3, 8
  means = 3 * rng.normal(size=(classes, dim))

  def split(n):
    labels = rng.integers(0, classes, n)
    signal = means[labels] + rng.normal(size=(n, dim))
    return ({"noise": rng.normal(size=(n, 32)), "signal": signal,
             "signal_again": signal.copy()}, labels)

  top1 = lp.fit_probes(split(300), split(300), classes, lp.Options(linear_steps=200))
  assert list(top1) == ["noise", "signal", "signal_again"]
  assert top1["signal"] > 0.95, top1
  assert top1["noise"] < 0.5, top1  # Chance is 1/3.
  assert top1["signal_again"] == top1["signal"]


def test_pooled_endpoints_are_the_maps_means():
  backbone = build_backbone("resnet18x0.25", small_image_stem=True)
  images = np.random.default_rng(1).integers(0, 255, (6, SIZE, SIZE, 3), np.uint8)
  source = sources.from_arrays(images, np.arange(6) % 2)
  batches = lambda: pipeline.build_eval(source, 4, SIZE)  # 2 batches, 2 pad rows.
  endpoints = lp.endpoints_of(backbone, SIZE)
  assert endpoints == ENDPOINTS
  pooled, labels = evaluate.extract_pooled_features(backbone, batches(), endpoints)
  np.testing.assert_array_equal(labels, np.arange(6) % 2)
  maps = backbone(tf.constant(images, tf.float32) / 255.0, training=False)
  for name in ENDPOINTS:
    expected = maps[name].numpy()
    expected = expected.mean((1, 2)) if expected.ndim == 4 else expected
    assert pooled[name].shape == (6, expected.shape[-1])
    np.testing.assert_allclose(pooled[name], expected, rtol=1e-4, atol=1e-5)
  # The BN ResNet's representation is the pool of its last block.
  np.testing.assert_allclose(pooled["features"], pooled["block4"], atol=1e-6)


def test_command_outputs_and_per_run_cache(workdirs, tmp_path, monkeypatch):
  out = str(tmp_path / "out")
  options = lp.Options(**FAST)
  table = lp.run(lp.parse_runs([workdirs["a"]], ["run a"]), out, options)
  assert list(table) == ["run a"] and list(table["run a"]) == ENDPOINTS
  assert all(0.0 <= v <= 1.0 for v in table["run a"].values())
  with open(os.path.join(out, "layer_probe.json")) as f:
    assert json.load(f) == table
  with open(os.path.join(out, "layer_probe.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with open(os.path.join(out, "runs", "run_a.json")) as f:
    record = json.load(f)
  assert record["settings"]["checkpoint"].endswith(os.path.join("checkpoints", "ckpt-3"))
  assert record["settings"]["backbone"] == "resnet18x0.25"
  assert (record["train_examples"], record["test_examples"]) == (20, 20)  # Of 32.
  assert record["feature_dims"] == {"stem": 16, "block1": 16, "block2": 32,
                                    "block3": 64, "block4": 128, "features": 128}
  assert "| run a | " in lp.table_text(table)

  probed = []
  real = lp.probe_run
  monkeypatch.setattr(lp, "probe_run", lambda label, *a: probed.append(label) or real(label, *a))
  runs = lp.parse_runs([workdirs["a"], workdirs["b"]], ["run a", "b"])
  table2 = lp.run(runs, out, options)
  assert probed == ["b"]  # "run a" came from runs/run_a.json.
  assert list(table2) == ["run a", "b"] and table2["run a"] == table["run a"]
  lp.run(runs[:1], out, lp.Options(**dict(FAST, linear_steps=21)))
  assert probed == ["b", "run a"]  # Another classifier: probed again.


def test_fixed_subsets(image_folder):
  dataset = f"folder:{image_folder}"
  first = lp.load_split(dataset, None, "train", 10, seed=0)
  assert first.num_examples == 10
  np.testing.assert_array_equal(first.labels(),
                                lp.load_split(dataset, None, "train", 10, 0).labels())
  assert lp.load_split(dataset, None, "train", 0, 0).num_examples == 32


def _error_line(capsys, argv):
  """Runs the command as the CLI would; returns its one error line."""
  flag_values = absl_flags.FlagValues()
  lp.define_flags(flag_values)
  flag_values(["layer_probe"] + argv)
  with pytest.raises(SystemExit) as exit_info:
    lp.main(["layer_probe"], flag_values)
  assert exit_info.value.code == 2
  lines = [l for l in capsys.readouterr().err.splitlines()
           if l.startswith("layer_probe: error: ")]
  assert len(lines) == 1, lines
  return lines[0]


@pytest.mark.parametrize("case, expected", [
    ("no_checkpoint", "holds no checkpoint"),
    ("other_backbone", "its checkpoint does not fit the backbone its flags.txt "
                       "names (--backbone=resnet34x0.25"),
    ("other_dataset", "its online probe has 2 classes but --dataset=folder:"),
    ("unlabelled", "has no known class count"),
    ("missing", "does not exist"),
    ("two_labels", "--labels: 2 label(s) for 1 --workdirs"),
])
def test_one_line_errors(workdirs, tmp_path, capsys, case, expected):
  workdir = workdirs.get(case, str(tmp_path / "nowhere"))
  argv = [f"--workdirs={workdir}", f"--out={tmp_path / 'out'}", "--examples=8",
          "--linear_steps=5"]
  if case == "two_labels":
    argv = [f"--workdirs={workdirs['a']}", "--labels=x,y", f"--out={tmp_path}"]
  assert expected in _error_line(capsys, argv)
