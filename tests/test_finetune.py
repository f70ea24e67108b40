"""Fine-tuning: init from each kind of pretrained model and their errors,
exact masked top-1/top-5, frozen encoders, the HyperRule run end to end, and
the command line with resumption after SIGTERM."""

import dataclasses
import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tf_ssl import checkpoints
from tf_ssl import export
from tf_ssl import finetune
from tf_ssl import flags
from tf_ssl import pretrained
from tf_ssl.data import augment
from tf_ssl.data import sources
from tf_ssl.models import ProjectionHead, bit, build_backbone
from tf_ssl.models.classifier import build_classifier
from tf_ssl.models.contrastive import ContrastiveModel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 8
CLASSES = 6


def _arrays(n, seed, classes=CLASSES, unlabelled=0):
  """Tiny images whose class shows in one bright channel."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, classes, n)
  images = rng.integers(0, 100, (n, SIZE, SIZE, 3)).astype(np.uint8)
  for c in range(classes):
    images[labels == c, :, :, c % 3] = 155 + 25 * (c // 3 % 4)
  labels[:unlabelled] = -1
  return images, labels


def _source(n, seed, **kwargs):
  images, labels = _arrays(n, seed, **kwargs)
  return sources.from_arrays(images, labels, kwargs.get("classes", CLASSES))


def _config(**kwargs):
  base = dict(backbone="bit_r18x0.5", small_image_stem=True, image_size=SIZE,
              global_batch_size=8, train_steps=6, learning_rate=0.05)
  base.update(kwargs)
  return flags.FinetuneConfig(**base)


def _randomise(model, seed):
  """Non-trivial values everywhere (fresh models have zero-init parts)."""
  rng = np.random.default_rng(seed)
  for v in model.variables:
    if "moving_variance" in v.path:
      v.assign(rng.uniform(0.5, 1.5, v.shape).astype("float32"))
    else:
      v.assign(rng.normal(0, 0.1, v.shape).astype("float32"))


def _values(layer):
  return {n: np.array(v.numpy()) for n, v in checkpoints.variables_by_name(layer).items()}


def _assert_same(a, b):
  assert a.keys() == b.keys()
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.fixture(scope="module")
def pretrained_model(tmp_path_factory):
  """A 'pretrained' ContrastiveModel (BN ResNet-18, v2 head of 3 layers) as
  a make_checkpoint checkpoint and as an exported SavedModel."""
  root = tmp_path_factory.mktemp("pretrained")
  model = ContrastiveModel(build_backbone("resnet18", small_image_stem=True),
                           ProjectionHead(32, 8, 3), num_classes=CLASSES)
  model(tf.zeros((2, SIZE, SIZE, 3)))
  _randomise(model, 0)
  prefix = checkpoints.make_checkpoint(model).write(str(root / "ckpt" / "ckpt-7"))
  saved = export.export_saved_model(model, str(root / "saved_model"))
  return dict(model=model, checkpoint=prefix, checkpoint_dir=str(root / "ckpt"),
              saved_model=saved, root=root)


def _fresh(backbone="resnet18", small_image_stem=True, proj=True):
  b = build_backbone(backbone, small_image_stem=small_image_stem)
  head = None
  if proj:
    head = ProjectionHead(32, 8, 3)
    head.build((None, b.feature_dim))
  return b, head


@pytest.mark.parametrize("kind", ["checkpoint", "checkpoint_dir"])
def test_checkpoint_init_copies_backbone_and_first_projection_layer(pretrained_model, kind):
  source = pretrained_model["model"]
  backbone, head = _fresh()
  fresh_head = _values(head)
  info = pretrained.load_init(backbone, pretrained_model[kind], head, proj_layers=1)
  assert info["kind"] == "checkpoint"
  _assert_same(_values(backbone), _values(source.backbone))
  got, want = _values(head), _values(source.projection_head)
  for name in got:
    if name.startswith(("dense_1/", "batch_norm_1/")):
      np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    else:  # Later layers keep their fresh values.
      np.testing.assert_array_equal(got[name], fresh_head[name], err_msg=name)
  assert info["restored"] == len(backbone.variables) + 5  # kernel, BN x4


def test_saved_model_init_copies_the_backbone(pretrained_model):
  backbone, head = _fresh()
  info = pretrained.load_init(backbone, pretrained_model["saved_model"])
  assert info == {"kind": "saved_model", "path": pretrained_model["saved_model"],
                  "restored": len(backbone.variables)}
  _assert_same(_values(backbone), _values(pretrained_model["model"].backbone))
  with pytest.raises(ValueError, match="come only from a tf_ssl checkpoint"):
    pretrained.load_init(backbone, pretrained_model["saved_model"], head, proj_layers=1)


def test_init_kind_errors_name_the_path(tmp_path):
  assert pretrained.init_kind(None) == ("none", None)
  assert pretrained.init_kind("none") == ("none", None)
  with pytest.raises(ValueError, match="not a BiT .npz file, a SavedModel"):
    pretrained.init_kind(str(tmp_path))
  with pytest.raises(ValueError, match="file not found"):
    pretrained.init_kind(str(tmp_path / "missing.npz"))


def test_checkpoint_of_another_architecture_names_the_difference(pretrained_model):
  backbone, _ = _fresh("resnet34", proj=False)
  before = _values(backbone)
  with pytest.raises(ValueError) as e:
    pretrained.load_init(backbone, pretrained_model["checkpoint"],
                         backbone_name="resnet34")
  message = str(e.value)
  assert "--backbone=resnet34" in message and "nothing restored" in message
  assert "block1/unit03" in message  # resnet34 has 3 units in block1, resnet18 2
  _assert_same(_values(backbone), before)  # all or nothing


def test_saved_model_of_another_architecture_and_without_signature(pretrained_model, tmp_path):
  backbone, _ = _fresh(small_image_stem=False, proj=False)  # 7x7 stem, not 3x3
  before = _values(backbone)
  with pytest.raises(ValueError, match=r"stem/conv2d/kernel: SavedModel shape "
                     r"\(3, 3, 3, 64\) != target shape \(7, 7, 3, 64\)"):
    pretrained.load_init(backbone, pretrained_model["saved_model"])
  _assert_same(_values(backbone), before)
  # A SavedModel that is not a tf_ssl export.
  module = tf.Module()
  module.v = tf.Variable(1.0)
  tf.saved_model.save(module, str(tmp_path / "plain"))
  with pytest.raises(ValueError, match="no serving_default signature"):
    pretrained.load_init(backbone, str(tmp_path / "plain"))


@pytest.fixture(scope="module")
def bit_npz(tmp_path_factory):
  model = build_backbone("bit_r18x0.5", small_image_stem=True, num_classes=3)
  rng = np.random.default_rng(1)
  arrays = {k: rng.normal(size=v.shape).astype("float32")
            for k, v in bit.checkpoint_keys(model).items()}
  path = str(tmp_path_factory.mktemp("bit") / "tiny.npz")
  np.savez(path, **arrays)
  return path, arrays


def test_bit_npz_init_drops_the_head(bit_npz):
  path, arrays = bit_npz
  backbone = build_backbone("bit_r18x0.5", small_image_stem=True)
  info = pretrained.load_init(backbone, path)
  assert info["kind"] == "bit_npz"
  for key, var in bit.checkpoint_keys(backbone).items():
    np.testing.assert_array_equal(var.numpy(), arrays[key], err_msg=key)
  assert info["restored"] == len(backbone.variables)


def test_bit_npz_missing_and_extra_keys_and_wrong_family(bit_npz, tmp_path):
  path, arrays = bit_npz
  key = "resnet/block2/unit01/b/standardized_conv2d/kernel"
  missing = {k: v for k, v in arrays.items() if k != key}
  np.savez(tmp_path / "missing.npz", **missing)
  backbone = build_backbone("bit_r18x0.5", small_image_stem=True)
  with pytest.raises(ValueError, match=f"{key}: missing from the file"):
    pretrained.load_init(backbone, str(tmp_path / "missing.npz"))
  np.savez(tmp_path / "extra.npz", **arrays, **{"resnet/block5/unit01/kernel": np.zeros(3)})
  with pytest.raises(ValueError, match="resnet/block5/unit01/kernel: in the file"):
    pretrained.load_init(backbone, str(tmp_path / "extra.npz"))
  with pytest.raises(ValueError, match="not one \\(use e.g. --backbone=bit_r50x1"):
    pretrained.load_init(build_backbone("resnet18"), path, backbone_name="resnet18")


def _numpy_topk(logits, labels, k):
  order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
  keep = labels >= 0
  top1 = (order[:, 0] == labels)[keep].mean()
  top5 = (order == labels[:, None]).any(1)[keep].mean()
  return top1, top5, keep.sum()


def test_evaluate_counts_every_example_once(strategy):
  """37 examples (3 unlabelled), batches of 8 over 1/2/4 replicas: padding
  and unlabelled rows never count; equals NumPy on the model's logits."""
  images, _ = _arrays(37, seed=3, classes=12)
  with strategy.scope():
    model = build_classifier(build_backbone("resnet18", small_image_stem=True), 12,
                             zero_init_head=False)
  _randomise(model.head, 4)
  view = lambda r: augment.eval_view(r, SIZE)
  x = np.stack([view({"image": tf.constant(i)}).numpy() for i in images])
  logits = model(x, training=False)["logits"].numpy()
  # Labels chosen from the logits so that every outcome occurs: a top-1 hit,
  # a top-5 hit that is not top-1, a miss; and three unlabelled rows.
  order = np.argsort(-logits, axis=1, kind="stable")
  labels = order[np.arange(37), np.arange(37) % 3 * 4]  # ranks 0, 4, 8
  labels[:3] = -1
  source = sources.from_arrays(images, labels, 12)
  got = finetune.evaluate(model, strategy, source, 8, view, SIZE)
  top1, top5, count = _numpy_topk(logits, labels, 5)
  assert got["eval_examples"] == count == 34
  assert got["top1"] == pytest.approx(top1) and top1 == pytest.approx(12 / 34)
  assert got["top5"] == pytest.approx(top5) and top5 == pytest.approx(23 / 34)


def _fit(model, steps=3, mixup=False):
  images, labels = _arrays(16, seed=5)
  x = (images / 255.).astype("float32")
  y = tf.one_hot(labels, CLASSES) if mixup else labels
  data = tf.data.Dataset.from_tensors({"image": x[:8], "label": y[:8]}).repeat()
  model.compile(optimizer=tf.keras.optimizers.SGD(0.5, momentum=0.9))
  return model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0)


def test_linear_mode_leaves_the_encoder_bit_identical():
  backbone = build_backbone("resnet18", small_image_stem=True)
  _randomise(backbone, 6)
  head = ProjectionHead(32, 8, 3)
  head.build((None, backbone.feature_dim))
  model = build_classifier(backbone, CLASSES, projection_head=head, proj_layers=1,
                           freeze_encoder=True)
  assert [v.path for v in model.trainable_variables] == [
      "classifier/head/kernel", "classifier/head/bias"]
  before, before_head = _values(backbone), _values(head)
  history = _fit(model)
  _assert_same(_values(backbone), before)  # incl. BN moving statistics
  _assert_same(_values(head), before_head)
  assert np.abs(model.head.kernel.numpy()).sum() > 0
  assert np.isfinite(history.history["loss"][-1])


def test_finetune_after_block_freezes_the_stem_and_leading_blocks():
  backbone = build_backbone("resnet18", small_image_stem=True)
  _randomise(backbone, 7)
  model = build_classifier(backbone, CLASSES, finetune_after_block=1,
                           weight_decay=1e-3)
  before = _values(backbone)
  _fit(model, mixup=True)  # soft labels too
  after = _values(backbone)
  for name in before:
    same = np.array_equal(before[name], after[name])
    frozen = name.startswith(("stem/", "block1/"))
    assert same == frozen, name
  decayed = [v.path for v in model.decayed_variables()]
  assert decayed and all(p.endswith("/kernel") and "/head/" not in p for p in decayed)
  assert not any("stem/" in p or "block1/" in p for p in decayed)


def test_label_subsets_are_the_same_for_the_same_seed():
  source = _source(120, seed=8)
  config = _config(labels_per_class=3, subset_seed=1)
  a, b = (finetune.select_labels(source, config).images for _ in range(2))
  np.testing.assert_array_equal(a, b)
  assert len(a) == 3 * CLASSES
  other = finetune.select_labels(source, dataclasses.replace(config, subset_seed=2))
  assert not np.array_equal(a, other.images)
  fraction = finetune.select_labels(
      source, dataclasses.replace(config, labels_per_class=None, label_fraction=0.1))
  assert 0.05 * 120 <= fraction.num_examples <= 0.15 * 120 + CLASSES


class _FakeSource:
  def __init__(self, n, hw, classes):
    self.num_examples, self.image_size, self.num_classes = n, hw, classes


def test_hyperrule_plan_follows_the_tables():
  cfg = flags.FinetuneConfig(mode="hyperrule", global_batch_size=128)
  plan = finetune.make_plan(cfg, _FakeSource(50_000, (32, 32), 10), 10)
  assert plan["schedule"] == [500, 3000, 6000, 9000, 10000]
  assert (plan["resize_size"], plan["crop_size"]) == (160, 128)
  assert plan["mixup_alpha"] == 0.1 and plan["peak_lr"] == pytest.approx(0.00075)
  few = finetune.make_plan(dataclasses.replace(cfg, labels_per_class=5),
                           _FakeSource(50, (375, 500), 10), 10)
  assert few["dataset_size"] == 50 and few["schedule"] == [100, 200, 300, 400, 500]
  assert (few["resize_size"], few["crop_size"]) == (512, 480) and few["mixup_alpha"] == 0
  short = finetune.make_plan(dataclasses.replace(cfg, train_steps=50),
                             _FakeSource(1000, (8, 8), 10), 10)
  assert short["schedule"] == [10, 20, 30, 40, 50]


def test_plans_are_whole_executions():
  # model.fit runs whole executions of --steps_per_execution steps; a plan
  # that is not a multiple would train past its schedule's end.
  src = _FakeSource(1000, (8, 8), 10)
  cfg = flags.FinetuneConfig(mode="linear", train_epochs=1.0, global_batch_size=64,
                             steps_per_execution=5)
  assert finetune.make_plan(cfg, src, 10)["total_steps"] == 20     # 16 -> 20
  rule = finetune.make_plan(
      flags.FinetuneConfig(mode="hyperrule", global_batch_size=128,
                           steps_per_execution=300), src, 10)
  assert rule["schedule"] == [100, 200, 300, 400, 600]              # 500 -> 600
  assert rule["total_steps"] == 600
  with pytest.raises(ValueError, match="--train_steps=7: must be a multiple of "
                     "--steps_per_execution=2"):
    flags.FinetuneConfig(mode="linear", train_steps=7, steps_per_execution=2)


def test_run_ends_at_the_plan_with_several_steps_per_execution():
  # 40 examples / 8 = 5 steps, rounded up to 6 = 2 executions of 3; the
  # unrounded plan ran one execution past the schedule's end.
  config = _config(mode="linear", train_steps=None, train_epochs=1.0,
                   steps_per_execution=3)
  results = finetune.run_finetune(config, train_source=_source(40, 0),
                                  eval_source=_source(8, 1), verbose=0)
  assert results["plan"]["total_steps"] == 6 and results["train_steps"] == 6


def test_config_errors_name_the_flag():
  with pytest.raises(ValueError, match="--mode='probe'"):
    flags.FinetuneConfig(mode="probe")
  with pytest.raises(ValueError, match="--label_fraction=0.1: give at most one"):
    flags.FinetuneConfig(label_fraction=0.1, labels_per_class=10)
  with pytest.raises(ValueError, match="--train_steps=None: give exactly one"):
    flags.FinetuneConfig(mode="linear")
  with pytest.raises(ValueError, match="--train_epochs=2.0: --mode=hyperrule"):
    flags.FinetuneConfig(mode="hyperrule", train_epochs=2.0)
  with pytest.raises(ValueError, match="--finetune_after_block=2: only --mode=finetune"):
    flags.FinetuneConfig(mode="linear", train_steps=1, finetune_after_block=2)


def test_class_count_not_matching_the_head():
  with pytest.raises(ValueError, match="--num_classes=7 does not match the 6 classes"):
    finetune.run_finetune(_config(mode="linear", num_classes=7),
                          train_source=_source(16, 0), eval_source=_source(8, 1))


def test_linear_run_from_checkpoint_keeps_the_backbone(pretrained_model, tmp_path):
  """run_finetune in linear mode from a checkpoint: the exported classifier
  carries the pretrained backbone unchanged; it also serves as an --init."""
  config = _config(mode="linear", backbone="resnet18", init=pretrained_model["checkpoint_dir"],
                   finetune_proj_layers=1, proj_layers=3, proj_hidden_dim=32, proj_dim=8,
                   workdir=str(tmp_path / "linear"), train_steps=4)
  results, model = finetune.run_finetune(config, train_source=_source(32, 2),
                                         eval_source=_source(13, 3), verbose=0,
                                         return_model=True)
  assert results["init"]["kind"] == "checkpoint" and results["eval_examples"] == 13
  assert results["saved_model"] == str(tmp_path / "linear" / "saved_model")
  _assert_same(_values(model.backbone), _values(pretrained_model["model"].backbone))
  backbone, _ = _fresh(proj=False)
  info = pretrained.load_init(backbone, str(tmp_path / "linear" / "saved_model"))
  assert info["kind"] == "saved_model"
  _assert_same(_values(backbone), _values(pretrained_model["model"].backbone))


@pytest.mark.slow
def test_hyperrule_end_to_end_with_export_and_resume_checks(bit_npz, tmp_path):
  workdir = tmp_path / "hyperrule"
  config = _config(mode="hyperrule", init=bit_npz[0], crop_size=SIZE, resize_size=10,
                   mixup_alpha=0.2, train_steps=10, checkpoint_every_steps=5,
                   workdir=str(workdir))
  train, test = _source(40, 10), _source(21, 11)
  results = finetune.run_finetune(config, train_source=train, eval_source=test, verbose=0)
  saved = json.loads((workdir / "results.json").read_text())
  assert saved["top1"] == results["top1"] and saved["train_steps"] == 10
  plan = saved["plan"]
  assert plan["schedule"] == [2, 4, 6, 8, 10] and plan["mixup_alpha"] == 0.2
  assert plan["peak_lr"] == pytest.approx(0.003 * 8 / 512)
  assert saved["init"]["kind"] == "bit_npz" and saved["eval_examples"] == 21
  assert sorted(os.listdir(workdir / "checkpoints"))[0].startswith("checkpoint")
  assert (workdir / "training_curves.png").exists()
  # The export serves logits and probabilities; its top-1 is the run's.
  served = tf.saved_model.load(str(workdir / "saved_model")).signatures["serving_default"]
  images, labels = _arrays(21, 11)
  x = tf.image.resize(images, [SIZE, SIZE]) / 255.  # BiT eval: resize to crop
  out = served(images=tf.cast(x, tf.float32))
  assert sorted(out) == ["logits", "probabilities"]
  np.testing.assert_allclose(out["probabilities"].numpy().sum(1), 1.0, rtol=1e-5)
  top1, top5, _ = _numpy_topk(out["logits"].numpy(), labels, 5)
  assert results["top1"] == pytest.approx(top1)
  assert results["top5"] == pytest.approx(top5)
  # Rerunning a finished run resumes (no training) and gives the same result.
  again = finetune.run_finetune(config, train_source=train, eval_source=test, verbose=0)
  assert again["init"]["kind"] == "resumed" and again["top1"] == results["top1"]
  # A workdir checkpoint with another head size stops with a message.
  with pytest.raises(ValueError, match="does not fit this model"):
    finetune.run_finetune(dataclasses.replace(config, num_classes=4),
                          train_source=_source(40, 10, classes=4),
                          eval_source=_source(8, 11, classes=4), verbose=0)


# ------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("images")
  for split, n in (("train", 12), ("test", 5)):
    images, labels = _arrays(n * 2, seed=len(split), classes=2)
    for i, (image, label) in enumerate(zip(images, labels)):
      os.makedirs(root / split / f"class{label}", exist_ok=True)
      Image.fromarray(image).save(root / split / f"class{label}" / f"{i}.png")
  return str(root)


def _command(workdir, folder, *extra):
  return [sys.executable, "-m", "tf_ssl.finetune", f"--workdir={workdir}",
          f"--dataset=folder:{folder}", "--backbone=resnet18", "--small_image_stem",
          "--strategy=default", *extra]


def _run(args, timeout=600):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=timeout)


def _steps(workdir):
  return [int(p.rsplit("-", 1)[1].split(".")[0])
          for p in glob.glob(str(workdir / "checkpoints" / "ckpt-*.index"))]


@pytest.mark.parametrize("extra, message", [
    (["--mode=hyperrule", "--learning_rate=0.1"], "--learning_rate=0.1: --mode=hyperrule fixes"),
    (["--mode=linear", "--train_steps=2", "--init=/no/such/checkpoint"], "/no/such/checkpoint"),
])
def test_command_line_errors_are_one_line(tmp_path, image_folder, extra, message):
  result = _run(_command(tmp_path / "w", image_folder, *extra))
  assert result.returncode != 0
  assert message in result.stderr
  assert "Traceback" not in result.stderr, result.stderr[-2000:]
  assert not (tmp_path / "w" / "checkpoints").exists()


@pytest.mark.slow
def test_command_line_resumes_after_sigterm(tmp_path, image_folder):
  workdir = tmp_path / "run"
  flagfile = tmp_path / "linear.cfg"
  flagfile.write_text("--mode=finetune\n--image_size=8\n--global_batch_size=4\n"
                      "--optimizer=sgd\n--nesterov\n--learning_rate=0.05\n"
                      "--train_steps=40\n--checkpoint_every_steps=2\n--export=false\n")
  cmd = _command(workdir, image_folder, f"--flagfile={flagfile}")
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None and not _steps(workdir):
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 0, stderr[-3000:]
  interrupted = max(_steps(workdir))
  assert 2 <= interrupted < 40, "stopped early at a step boundary, with a checkpoint"
  assert not (workdir / "results.json").exists()

  result = _run(cmd)
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.loads((workdir / "results.json").read_text())
  assert results["train_steps"] == 40 and max(_steps(workdir)) == 40
  assert results["init"]["kind"] == "resumed"
  assert results["eval_examples"] == 10 and results["plan"]["train_examples"] == 24
  assert "Resumed from" in result.stderr
