"""The trainer writes everything through tf.io.gfile: a run whose --workdir is
tf.io.gfile's in-memory `ram://` filesystem (a stand-in for gs:// on TPU
VMs) puts its flags, checkpoints, summaries, history, results, plot and
SavedModel there, resumes from there, and writes nothing locally.

ram:// lives inside one process, so the trainer's main runs in this process.
"""

import json
import os
import uuid

import numpy as np
import pytest
import tensorflow as tf

from tf_ssl import flags as tf_ssl_flags
from tf_ssl import train

TINY = [
    "--backbone=resnet18", "--image_size=16", "--small_image_stem=true",
    "--proj_hidden_dim=32", "--proj_dim=16", "--global_batch_size=8",
    "--warmup_epochs=0", "--learning_rate=0.1", "--strategy=default",
    "--knn_k=5", "--color_strength=0.5", "--blur=off",
    "--checkpoint_every_steps=2",
]


@pytest.fixture
def ram_workdir():
  path = f"ram://tf_ssl_test_{uuid.uuid4().hex}/run"
  yield path
  root = path.rsplit("/", 1)[0]
  if tf.io.gfile.exists(root):
    tf.io.gfile.rmtree(root)  # The files live in this process's memory.


def _train(workdir, folder, *extra):
  """Runs tf_ssl.train's main in this process with these flags."""
  flags = tf_ssl_flags.FLAGS
  flags.unparse_flags()
  try:
    flags(["tf_ssl.train", f"--workdir={workdir}", f"--dataset=folder:{folder}",
           *TINY, *extra])
    train.main([])
  finally:
    flags.unparse_flags()


def _files(root):
  """Every file under `root` (a gfile path), relative to it."""
  found = set()
  for dirpath, _, files in tf.io.gfile.walk(root):
    for name in files:
      found.add(os.path.relpath(os.path.join(dirpath, name), root))
  return found


def _steps(workdir):
  state = tf.train.get_checkpoint_state(f"{workdir}/checkpoints")
  return [int(p.rsplit("-", 1)[1]) for p in state.all_model_checkpoint_paths]


def _summary_tags(workdir):
  tags = set()
  for path in tf.io.gfile.glob(f"{workdir}/summaries/events.*"):
    for event in tf.compat.v1.train.summary_iterator(path):
      tags.update(value.tag for value in event.summary.value)
  return tags


@pytest.mark.slow
def test_a_run_on_ram_filesystem_writes_everything_there_and_resumes(
    tmp_path, monkeypatch, image_folder, ram_workdir):
  # Relative local writes would land in this empty directory.
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)

  _train(ram_workdir, image_folder, "--train_steps=4", "--export=true")

  files = _files(ram_workdir)
  for name in ("flags.txt", "results.json", "history.jsonl",
               "training_curves.png", "checkpoints/checkpoint",
               "saved_model/saved_model.pb",
               "saved_model/variables/variables.index"):
    assert name in files, f"{name} missing from {sorted(files)}"
  assert any(f.startswith("summaries/events.out.tfevents") for f in files)
  assert _steps(ram_workdir) == [2, 4]

  with tf.io.gfile.GFile(f"{ram_workdir}/flags.txt") as f:
    flags_text = f.read()
  assert f"--workdir={ram_workdir}" in flags_text
  assert "--train_steps=4" in flags_text
  with tf.io.gfile.GFile(f"{ram_workdir}/results.json") as f:
    results = json.load(f)
  assert results["train_steps"] == 4
  for key in ("knn_top1", "linear_top1", "wall_seconds"):
    assert key in results
  with tf.io.gfile.GFile(f"{ram_workdir}/training_curves.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with tf.io.gfile.GFile(f"{ram_workdir}/history.jsonl") as f:
    assert max(json.loads(line)["step"] for line in f if line.strip()) == 4
  assert {"loss", "learning_rate"} <= _summary_tags(ram_workdir)

  # The SavedModel loads from ram:// and serves features.
  loaded = tf.saved_model.load(f"{ram_workdir}/saved_model")
  out = loaded.signatures["serving_default"](images=tf.zeros([2, 16, 16, 3]))
  assert out["features"].shape == (2, 512)

  # Rerunning with a longer schedule resumes from the ram:// checkpoint.
  # TF's RamFileSystem does not truncate a file opened for writing (GFile
  # "w" appends to an existing ram:// file; local and gs:// files are
  # truncated), so the files the end of a run rewrites are removed first.
  for name in ("flags.txt", "results.json", "training_curves.png"):
    tf.io.gfile.remove(f"{ram_workdir}/{name}")
  _train(ram_workdir, image_folder, "--train_steps=6", "--export=false")
  assert _steps(ram_workdir)[-1] == 6
  with tf.io.gfile.GFile(f"{ram_workdir}/results.json") as f:
    assert json.load(f)["train_steps"] == 6
  with tf.io.gfile.GFile(f"{ram_workdir}/history.jsonl") as f:
    steps = [json.loads(line)["step"] for line in f if line.strip()]
  # A restart from scratch would log steps 1-4 a second time.
  assert len(steps) == len(set(steps)) and max(steps) == 6, steps

  assert os.listdir(cwd) == [], "nothing is written to local relative paths"
