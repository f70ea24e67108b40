"""tools/label_efficiency.py on tiny in-memory data: the report's schema,
accuracies in [0, 1], the PNG, flags read from the pretraining run, and the
linear classifier seeing the very subset fine-tuning draws."""

import importlib.util
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from tf_ssl import checkpoints
from tf_ssl.data import sources
from tf_ssl.data import subsets
from tf_ssl.models import ProjectionHead, build_backbone
from tf_ssl.models.contrastive import ContrastiveModel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 8
CLASSES = 3


def _tool():
  spec = importlib.util.spec_from_file_location(
      "label_efficiency", os.path.join(REPO, "tools", "label_efficiency.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


le = _tool()


def _source(n, seed):
  """Images whose class shows as one bright channel."""
  rng = np.random.default_rng(seed)
  labels = np.arange(n) % CLASSES
  images = rng.integers(0, 100, (n, SIZE, SIZE, 3)).astype(np.uint8)
  for c in range(CLASSES):
    images[labels == c, :, :, c] = 200
  return sources.from_arrays(images, labels, CLASSES)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A pretraining workdir: checkpoints/ckpt-3 of a tiny ContrastiveModel and
  the flags.txt the trainer writes (a subset of its lines)."""
  root = tmp_path_factory.mktemp("pretrain")
  model = ContrastiveModel(build_backbone("resnet18x0.25", small_image_stem=True),
                           ProjectionHead(16, 8, 2), num_classes=CLASSES)
  model(tf.zeros((2, SIZE, SIZE, 3)))
  checkpoints.make_checkpoint(model).write(str(root / "checkpoints" / "ckpt-3"))
  (root / "flags.txt").write_text(
      "--nohelp\n--backbone=resnet18x0.25\n--dataset=fashion_mnist\n"
      f"--image_size={SIZE}\n--nomixed_precision\n--small_image_stem\n--sync_bn\n")
  return str(root)


def test_small_pieces():
  assert le.parse_label_counts("all,20, 10,20") == [10, 20, None]
  with pytest.raises(ValueError, match="labels_per_class"):
    le.parse_label_counts("10,ten")
  assert le.steps_for(100, 64, 20, 50, 300) == 50        # min
  assert le.steps_for(500, 64, 20, 50, 300) == 157       # ceil(20 * 500 / 64)
  assert le.steps_for(60000, 64, 20, 50, 300) == 300     # max


def test_flags_come_from_the_pretraining_run(workdir, tmp_path):
  expected = {"backbone": "resnet18x0.25", "dataset": "fashion_mnist",
              "image_size": SIZE, "small_image_stem": True}
  assert le.pretraining_flags(workdir) == expected
  assert le.pretraining_flags(os.path.join(workdir, "checkpoints", "ckpt-3")) == expected
  args = le._parser().parse_args(["--init", workdir, "--out", str(tmp_path),
                                  "--image_size", "16"])
  config = le.config_from_args(args)
  assert (config.backbone, config.image_size, config.small_image_stem) == (
      "resnet18x0.25", 16, True)  # A given flag wins over flags.txt.
  assert (config.mode, config.nesterov, config.global_batch_size) == ("finetune", True, 64)


def test_linear_subset_is_the_finetuning_subset():
  n = 90
  source = _source(n, 0)
  index = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones(
      (1, 1, 1, 3), np.uint8)
  marked = sources.from_arrays(index, source.labels(), CLASSES)
  picked = subsets.label_subset(marked, per_class=4, seed=7)  # As run_finetune.
  got = le.subset_indices(source.labels(), 4, seed=7)
  np.testing.assert_array_equal(picked.images[:, 0, 0, 0], got)
  np.testing.assert_array_equal(le.subset_indices(source.labels(), None, 7),
                                np.arange(n))


@pytest.mark.slow  # ~30 s of CPU: four tiny fine-tuning runs and two distillations.
def test_report_json_and_png(workdir, tmp_path):
  args = le._parser().parse_args(["--init", workdir, "--out", str(tmp_path),
                                  "--batch_size", "8"])
  base = le.config_from_args(args)
  out = str(tmp_path / "report")
  report = le.run(base, [2, None], _source(48, 1), _source(24, 2), out,
                  fixed_steps=2, linear_steps=20, command="test", distill_steps=2)
  with open(os.path.join(out, "label_efficiency.json")) as f:
    saved = json.load(f)
  assert saved == json.loads(json.dumps(report))
  for key in ("command", "backbone", "init", "total_seconds", "results",
              "finetune_recipe", "num_classes", "test_examples"):
    assert key in saved, key
  assert saved["backbone"] == "resnet18x0.25" and saved["init"] == workdir
  assert [r["labels_per_class"] for r in saved["results"]] == ["2", "all"]
  assert [r["examples"] for r in saved["results"]] == [2 * CLASSES, 48]
  for row in saved["results"]:
    for method in le.METHODS:
      assert 0.0 <= row[f"{method}_top1"] <= 1.0
    assert row["seconds"] >= 0 and row["finetune_steps"] == 2
    # The teacher is the fine-tuned network itself, scored the same way.
    assert row["distill_teacher_top1"] == row["finetune_top1"]
  assert saved["distill_steps"] == 2
  with open(os.path.join(out, "label_efficiency.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert "| all | 48 |" in le.table(report) and "distilled" in le.table(report)
