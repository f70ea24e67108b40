"""The trainer end to end, in subprocesses: flag errors, a full tiny run,
and resumption after SIGTERM and SIGKILL."""

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--backbone=resnet18", "--image_size=16", "--small_image_stem=true",
    "--proj_hidden_dim=32", "--proj_dim=16", "--global_batch_size=8",
    "--warmup_epochs=0", "--learning_rate=0.1", "--strategy=default",
    "--knn_k=5", "--color_strength=0.5", "--blur=off", "--export=false",
]


def _flags(workdir, folder, *extra):
  return [f"--workdir={workdir}", f"--dataset=folder:{folder}", *TINY, *extra]


def _command(workdir, folder, *extra):
  return [sys.executable, "-m", "tf_ssl.train", *_flags(workdir, folder, *extra)]


def _run(args, timeout=600):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=timeout)


BAD_FLAGS = [
    (["--train_steps=-3"], "--train_steps=-3"),
    (["--train_steps=4", "--train_epochs=1"], "exactly one of --train_steps"),
    (["--train_steps=4", "--global_batch_size=0"], "--global_batch_size=0"),
    (["--train_steps=4", "--method=simsiam"], "method"),
    (["--train_steps=4", "--dataset=folder:/no/such/folder"], "/no/such/folder"),
    (["--train_steps=4", "--backbone=vgg16"], "vgg16"),
    (["--train_steps=4", "--final_eval_examples=-1"], "--final_eval_examples=-1"),
    (["--train_steps=5", "--steps_per_execution=2"], "--steps_per_execution=2"),
    (["--train_steps=4", "--dataset=tfds:cifar10", "--data_dir=/no/tfds"], "not prepared"),
    (["--train_steps=4", "--global_batch_size=64"], "--global_batch_size=64"),
]

# Runs the trainer's command-line entry (its flag parser, then main) once per
# argument list in one interpreter, so the cases share one TensorFlow import
# (about 5 s each as separate processes): prints [exit code, stderr + stdout]
# per case as JSON. An exception that is not a user's error escapes with its
# traceback and fails the test, as it would show one at the command line.
_BAD_FLAGS_DRIVER = """
import contextlib, io, json, sys
from absl import flags
from tf_ssl import flags as tf_ssl_flags, train
results = []
for argv in json.loads(sys.argv[1]):
  flags.FLAGS.unparse_flags()
  out = io.StringIO()
  code = 0
  with contextlib.redirect_stderr(out), contextlib.redirect_stdout(out):
    try:
      tf_ssl_flags.parse_command_line(["tf_ssl.train", *argv])
      train.main([])
    except SystemExit as e:
      code = e.code
  results.append([code, out.getvalue()])
print(json.dumps(results))
"""


def test_bad_flags_stop_with_a_message_naming_them(tmp_path, image_folder):
  """A user's mistake is one line on stderr and a non-zero exit, no traceback."""
  cases = [_flags(tmp_path / f"w{i}", image_folder, *extra)
           for i, (extra, _) in enumerate(BAD_FLAGS)]
  result = _run([sys.executable, "-c", _BAD_FLAGS_DRIVER, json.dumps(cases)])
  assert result.returncode == 0, result.stderr[-3000:]
  outputs = json.loads(result.stdout.strip().splitlines()[-1])
  for i, ((extra, message), (code, output)) in enumerate(zip(BAD_FLAGS, outputs)):
    assert code not in (0, None), (extra, output[-2000:])
    assert message in output, (extra, output[-2000:])
    assert "Traceback" not in output, (extra, output[-2000:])
    assert not glob.glob(str(tmp_path / f"w{i}" / "checkpoints" / "ckpt-*")), (
        extra, "no work before the error")


def test_supcon_on_unlabelled_images_is_refused_before_any_work(tmp_path, image_folder):
  flat = tmp_path / "flat"
  flat.mkdir()
  for i, path in enumerate(sorted(glob.glob(os.path.join(image_folder, "*", "*.png")))[:12]):
    (flat / f"{i}.png").write_bytes(open(path, "rb").read())
  result = _run(_command(tmp_path / "w", flat, "--train_steps=4", "--method=supcon"))
  assert result.returncode != 0
  assert "--method=supcon needs labels" in result.stderr, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "w" / "checkpoints").exists()


@pytest.mark.slow
def test_tiny_run_writes_results_and_resumes_after_sigterm_and_sigkill(tmp_path, image_folder):
  workdir = tmp_path / "run"
  cmd = _command(workdir, image_folder, "--train_steps=12", "--checkpoint_every_steps=2")
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")

  def start_and_interrupt(sig, at_least):
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
      if _steps(workdir) and max(_steps(workdir)) >= at_least:
        break
      time.sleep(0.2)
    proc.send_signal(sig)
    proc.wait(timeout=120)
    return max(_steps(workdir))

  after_term = start_and_interrupt(signal.SIGTERM, at_least=2)
  assert after_term >= 2
  after_kill = start_and_interrupt(signal.SIGKILL, at_least=after_term + 2)
  assert after_kill >= after_term + 2, "the resumed run continued from the checkpoint"

  result = _run(cmd)
  assert result.returncode == 0, result.stderr[-3000:]
  assert max(_steps(workdir)) == 12
  results = json.loads((workdir / "results.json").read_text())
  assert results["train_steps"] == 12
  for key in ("knn_top1", "linear_top1", "wall_seconds"):
    assert key in results
  # The folder has no train/test sub-folders: the evaluation is on the
  # training images, and the run says so.
  assert results["eval_on_train"] is True
  assert "evaluation is on the training images" in result.stderr
  assert (workdir / "training_curves.png").exists()
  assert "--train_steps=12" in (workdir / "flags.txt").read_text()


@pytest.mark.slow
def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    tmp_path, image_folder):
  workdir = tmp_path / "run"
  first = _run(_command(workdir, image_folder, "--train_steps=4",
                        "--checkpoint_every_steps=2"))
  assert first.returncode == 0, first.stderr[-3000:]
  # Resumed from step 4, a learning rate of 1e30 overflows the weights within
  # a step or two and the loss turns NaN.
  diverged = _run(_command(workdir, image_folder, "--train_steps=8",
                           "--checkpoint_every_steps=2", "--learning_rate=1e30"))
  assert diverged.returncode != 0
  match = re.search(r"(loss|grad_norm_per_replica) is (nan|inf|-inf) at step (\d+)",
                    diverged.stderr)
  assert match, diverged.stderr[-3000:]
  assert int(match.group(3)) > 4
  assert max(_steps(workdir)) == 4, "no checkpoint after the last good step"
  # The kept checkpoint holds finite weights (resuming one is tested above).
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  reader = tf.train.load_checkpoint(str(workdir / "checkpoints" / "ckpt-4"))
  floats = [reader.get_tensor(name) for name, dtype in
            reader.get_variable_to_dtype_map().items() if dtype.is_floating]
  assert len(floats) > 50 and all(np.isfinite(t).all() for t in floats)


def _steps(workdir):
  return [int(p.rsplit("-", 1)[1].split(".")[0])
          for p in glob.glob(str(workdir / "checkpoints" / "ckpt-*.index"))]


def _summaries(workdir):
  """{tag: [(step, tensor proto)]} from every event file of the run."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  found = {}
  for path in glob.glob(str(workdir / "summaries" / "events.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        found.setdefault(value.tag, []).append((event.step, value.tensor))
  return found


@pytest.mark.slow
def test_tensorboard_gets_the_view_grid_and_knn_at_each_evaluation(tmp_path, image_folder):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "run"
  result = _run(_command(workdir, image_folder, "--train_steps=4",
                         "--eval_every_steps=2", "--eval_examples=12",
                         "--final_eval_examples=10"))
  assert result.returncode == 0, result.stderr[-3000:]
  with open(workdir / "results.json") as f:
    results = json.load(f)
  # The end-of-run evaluation saw the first 10 of the 32 images of each split.
  assert (results["eval_train_examples"], results["eval_test_examples"]) == (10, 10)
  summaries = _summaries(workdir)
  [(step, grid)] = summaries["views"]
  assert step == 0
  png = tf.make_ndarray(grid)[2]  # [width, height, png]
  # 8 images (rows) x 2 views (columns) of 16 px.
  assert tuple(tf.io.decode_png(png).shape) == (8 * 16, 2 * 16, 3)
  knn_steps = sorted(s for s, _ in summaries["eval/knn_top1"])
  assert knn_steps == [2, 4, 4], "every 2 steps, and the final evaluation at 4"
  for _, value in summaries["eval/knn_top1"]:
    assert 0.0 <= float(tf.make_ndarray(value)) <= 1.0


def test_raw_pixel_baseline_uses_one_channel_of_grayscale_sources():
  from tf_ssl import train  # pylint: disable=g-import-not-at-top
  from tf_ssl.data import sources  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  gray = rng.integers(0, 255, (6, 8, 8, 1), dtype=np.uint8)
  color = rng.integers(0, 255, (6, 8, 8, 3), dtype=np.uint8)
  assert train.is_grayscale(sources.from_arrays(np.repeat(gray, 3, -1)), 8)
  assert train.is_grayscale(sources.from_arrays(gray), 8)
  assert not train.is_grayscale(sources.from_arrays(color), 8)
  images = np.repeat(gray, 3, -1).astype(np.float32) / 255
  flat = train.raw_pixels(True)(images)["features"].numpy()
  np.testing.assert_array_equal(flat, gray.reshape(6, 64) / np.float32(255))
  assert train.raw_pixels(False)(images)["features"].shape == (6, 192)


def test_knn_monitor_runs_the_backbone_on_the_strategys_replicas(strategy_2):
  """The in-training k-NN embeds on the replicas (on a TPU: its cores), as the
  final evaluation does, not on the host outside the strategy."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tf_ssl import train  # pylint: disable=g-import-not-at-top
  from tf_ssl.data import sources  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  source = sources.from_arrays(rng.integers(0, 255, (24, 8, 8), np.uint8),
                               rng.integers(0, 3, 24))
  seen = []

  def embed(images, training=False):
    del training
    seen.append(tf.distribute.get_replica_context().num_replicas_in_sync)
    return {"features": tf.reshape(images, [tf.shape(images)[0], -1])}
  config = type("Config", (), dict(
      eval_examples=24, knn_k=3, knn_temperature=0.1,
      data=type("Data", (), dict(image_size=8))))
  accuracy = train.knn_monitor(strategy_2, embed, source, source, config,
                               batch_size=8, exclude_self=True)()
  assert 0.0 <= accuracy <= 1.0
  assert seen and set(seen) == {2}, seen


@pytest.mark.slow
@pytest.mark.parametrize("method, extra", [
    ("dino", ["--local_crops=2", "--crop_min_area=0.3", "--dino_out_dim=32",
              "--dino_warmup_teacher_temperature_epochs=0"]),
    # MoCo v2 also trains its first 2 steps at 8 px (--progressive_resolution).
    ("moco_v2", ["--moco_queue_size=32", "--progressive_resolution=8:0.5"]),
])
def test_momentum_methods_train_log_their_schedule_and_initialise_finetuning(
    tmp_path, image_folder, method, extra):
  """The trainer runs a method it does not know by name (DINO with
  multi-crop views from image files); the method's momentum is logged
  beside the learning rate; fine-tuning --init takes its representation
  (DINO's teacher) from the workdir."""
  workdir = tmp_path / "run"
  result = _run(_command(workdir, image_folder, f"--method={method}", "--train_steps=4",
                         "--final_eval_examples=16", *extra))
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.loads((workdir / "results.json").read_text())
  assert results["train_steps"] == 4 and "knn_top1" in results
  history = [json.loads(l) for l in (workdir / "history.jsonl").read_text().splitlines()]
  momentum = [h[f"{method}_momentum"] for h in history if f"{method}_momentum" in h]
  if method == "dino":  # 0.996 -> 1 by cosine.
    assert momentum and 0.996 <= min(momentum) < max(momentum) <= 1.0
  else:  # MoCo v2: constant.
    assert momentum and all(m == pytest.approx(0.999) for m in momentum)
    assert "Steps 0 to 2 at 8 px" in result.stderr and "Steps 2 to 4 at 16 px" in result.stderr
  finetune = subprocess.run(
      [sys.executable, "-m", "tf_ssl.finetune", f"--workdir={tmp_path / 'ft'}",
       f"--dataset=folder:{image_folder}", "--mode=linear", "--train_steps=2",
       "--backbone=resnet18", "--image_size=16", "--small_image_stem=true",
       "--global_batch_size=8", "--export=false", f"--init={workdir}"],
      cwd=REPO, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), capture_output=True,
      text=True, timeout=600)
  assert finetune.returncode == 0, finetune.stderr[-3000:]
  init = json.loads((tmp_path / "ft" / "results.json").read_text())["init"]
  assert init["kind"] == "checkpoint" and init["restored"] > 0


def test_progressive_resolution_phases_and_their_flag():
  from tf_ssl import train  # pylint: disable=g-import-not-at-top
  from tf_ssl import flags as tf_ssl_flags  # pylint: disable=g-import-not-at-top
  assert train.resolution_phases(100, 28, ((16, 0.3), (22, 0.6))) == [
      (0, 30, 16), (30, 60, 22), (60, 100, 28)]
  # Phase ends round up to whole executions; an empty phase is dropped.
  assert train.resolution_phases(104, 28, ((16, 0.3), (20, 0.31)), 26) == [
      (0, 52, 16), (52, 104, 28)]
  assert train.resolution_phases(10, 28, ()) == [(0, 10, 28)]
  parse = tf_ssl_flags.parse_progressive_resolution
  assert parse(["16:0.3", "22:0.6"], 28) == ((16, 0.3), (22, 0.6))
  for bad in (["16"], ["x:0.3"], ["28:0.5"], ["16:0.5", "12:0.7"], ["16:1.0"], ["4:0.5"]):
    with pytest.raises(Exception, match="--progressive_resolution"):
      parse(bad, 28)
  data = tf_ssl_flags.DataConfig(
      dataset="d", data_dir=None, train_split="train", eval_split="test",
      image_size=224, color_strength=1.0, simclr_version=2, blur=None,
      crop_min_area=0.14, num_views=2, cache=False, local_crops=6, local_crop_size=96)
  small = train.data_at(data, 112)
  assert (small.image_size, small.local_crop_size, small.local_crops) == (112, 48, 6)
