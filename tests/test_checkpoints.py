"""Checkpoints: a full resume, restores into other heads and probes, and clear
failures for another architecture or a checkpoint of the wrong kind."""

import re

import numpy as np
import pytest
import tensorflow as tf

from tf_ssl import checkpoints
from tf_ssl import optim
from tf_ssl.models import ProjectionHead, bit, build_backbone
from tf_ssl.models.contrastive import ContrastiveModel

IMAGE = 16


def _model(backbone="resnet18", hidden=64, out=16, layers=3, num_classes=10):
  model = ContrastiveModel(
      build_backbone(backbone, small_image_stem=True),
      ProjectionHead(hidden, out, layers), num_classes=num_classes)
  model(tf.zeros((2, IMAGE, IMAGE, 3)))
  return model


def _randomize(variables, seed):
  """Distinct random values, so zero-init gammas and BN statistics count."""
  rng = np.random.default_rng(seed)
  for v in variables:
    v.assign(rng.normal(size=v.shape).astype(v.dtype))


def _values(variables):
  return [v.numpy().copy() for v in variables]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A ContrastiveModel + built LARS + step, saved by a CheckpointManager."""
  model = _model()
  optimizer = optim.LARS(0.1, weight_decay=1e-4)
  optimizer.build(model.trainable_variables)
  _randomize(model.variables + optimizer.variables, seed=1)
  step = tf.Variable(7, dtype=tf.int64)
  directory = str(tmp_path_factory.mktemp("ckpt"))
  manager = tf.train.CheckpointManager(
      checkpoints.make_checkpoint(model, optimizer, step), directory, 1)
  return model, optimizer, manager.save(checkpoint_number=7), directory


def test_resume_restores_every_variable(saved):
  model, optimizer, path, _ = saved
  fresh = _model()
  fresh_optimizer = optim.LARS(0.1, weight_decay=1e-4)
  fresh_optimizer.build(fresh.trainable_variables)
  step = tf.Variable(0, dtype=tf.int64)
  status = checkpoints.make_checkpoint(fresh, fresh_optimizer, step).read(path)
  status.assert_existing_objects_matched()
  assert int(step) == 7
  # Every variable: BN moving statistics of the blocks included, which a
  # plain tf.train.Checkpoint(model=...) of a Keras 3 model leaves out.
  assert any("moving_mean" in v.path for v in fresh.variables)
  for a, b in zip(model.variables + optimizer.variables,
                  fresh.variables + fresh_optimizer.variables):
    np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=b.path)


def test_restore_backbone_into_other_head_and_probe(saved):
  model, _, _, directory = saved
  target = _model(hidden=32, out=8, layers=2, num_classes=3)
  head_before = _values(target.projection_head.variables)
  probe_before = _values(target.probe_head.variables)
  names = checkpoints.restore_backbone(target.backbone, directory)
  assert len(names) == len(target.backbone.variables)
  for a, b in zip(model.backbone.variables, target.backbone.variables):
    np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=b.path)
  for a, b in zip(head_before + probe_before,
                  target.projection_head.variables + target.probe_head.variables):
    np.testing.assert_array_equal(a, b.numpy())


def test_restore_backbone_into_fine_tuning_classifier(saved):
  model, _, path, _ = saved
  classifier = build_backbone("resnet18", num_classes=7, small_image_stem=True)
  checkpoints.restore_backbone(classifier, path)
  restored = checkpoints.variables_by_name(classifier)
  for name, v in checkpoints.variables_by_name(model.backbone).items():
    np.testing.assert_array_equal(v.numpy(), restored[name].numpy(), err_msg=name)
  # The new classifier keeps its zero init (BiT's fine-tuning start).
  assert all(not np.any(v.numpy()) for v in classifier.head.variables)


def test_restore_leading_projection_layers(saved):
  model, _, path, _ = saved
  # Same hidden width, another output width: layers 1-2 fit, layer 3 not.
  target = _model(hidden=64, out=8, layers=3, num_classes=0)
  last_before = _values(target.projection_head.dense_layers[2].variables)
  names = checkpoints.restore_projection_layers(
      target.projection_head, path, num_layers=2)
  assert names and all(n.split("/")[0][-1] in "12" for n in names)
  saved_head = checkpoints.variables_by_name(model.projection_head)
  target_head = checkpoints.variables_by_name(target.projection_head)
  for name in names:
    np.testing.assert_array_equal(saved_head[name].numpy(),
                                  target_head[name].numpy(), err_msg=name)
  np.testing.assert_array_equal(
      last_before[0], target.projection_head.dense_layers[2].kernel.numpy())
  with pytest.raises(ValueError, match=re.escape(
      "projection_head/dense_3/kernel: checkpoint shape (64, 16) != target "
      "shape (64, 8)")):
    checkpoints.restore_projection_layers(target.projection_head, path)


def test_other_width_fails_naming_variable_and_shapes(saved):
  _, _, path, _ = saved
  wider = build_backbone("resnet18x2", small_image_stem=True)
  before = wider.variables[0].numpy().copy()
  with pytest.raises(ValueError, match=re.escape(
      "backbone/stem/conv2d/kernel: checkpoint shape (3, 3, 3, 64) != target "
      "shape (3, 3, 3, 128)")):
    checkpoints.restore_backbone(wider, path)
  np.testing.assert_array_equal(before, wider.variables[0].numpy())


def test_other_depth_fails_naming_missing_variables(saved):
  _, _, path, _ = saved
  deeper = build_backbone("resnet34", small_image_stem=True)
  with pytest.raises(ValueError, match=r"backbone/block1/unit03/\S+: target "
                     r"shape \(.*\), missing from the checkpoint"):
    checkpoints.restore_backbone(deeper, path)


def test_other_family_fails(saved):
  _, _, path, _ = saved
  with pytest.raises(ValueError, match="missing from the target"):
    checkpoints.restore_backbone(
        build_backbone("bit_r18x0.5", small_image_stem=True), path)


def test_plain_tf_checkpoint_is_refused(tmp_path):
  model = _model()
  path = tf.train.Checkpoint(model=model).write(str(tmp_path / "plain"))
  with pytest.raises(ValueError, match="make_checkpoint"):
    checkpoints.restore_backbone(model.backbone, path)
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="without a checkpoint"):
    checkpoints.restore_backbone(model.backbone, str(tmp_path / "empty"))


def test_bare_backbone_checkpoint(tmp_path):
  backbone = build_backbone("bit_r18x0.5", small_image_stem=True)
  _randomize(backbone.variables, seed=2)
  path = checkpoints.make_checkpoint(backbone).write(str(tmp_path / "bb"))
  target = bit.resnet_v2(18, 0.5, small_image_stem=True, name="other")
  checkpoints.restore_backbone(target, path)
  for a, b in zip(backbone.variables, target.variables):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
