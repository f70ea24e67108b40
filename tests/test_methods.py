"""The method interface: every method's whole fit steps equal on 1 and 4
replicas (synchronised BN, LARS), its targets' EMA against the closed form,
the MoCo queue's and the PIRL memory bank's contents and resume, checkpoint
parts, flags, and the representation that export and fine-tuning take."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import mirrored
from tf_ssl import checkpoints
from tf_ssl import methods
from tf_ssl import optim
from tf_ssl.models import ema
from tf_ssl.models.ssl_model import SSLModel

GLOBAL_BATCH = 8
IMAGE = 8
STEPS = 3
HEAD = methods.HeadSpec(hidden_dim=16, output_dim=8, num_layers=2, sync_bn=True)
# VICReg's sqrt(var + 1e-4) and relu(1 - std) amplify float32 rounding into
# the steps of a tiny random network at LARS' 0.5 (the BN offsets of 1 and
# 4 replicas parted by 1e-2 in 3 steps); a smaller rate keeps it at 1e-5.
LR = {"vicreg": 0.05}
LOCAL_IMAGE, LOCAL_CROPS = 5, 2
STEPS_PER_EPOCH = 2
OPTIONS = {"byol": {"momentum": 0.9}, "moco_v2": {"queue_size": 16, "momentum": 0.9},
           "moco_v3": {"momentum": 0.9, "temperature": 0.5},
           "simclr": {"temperature": 0.5}, "supcon": {"temperature": 0.5},
           # The queue fills in steps 0-1 and is used in step 2; the
           # prototypes are frozen in step 0.
           "swav": {"prototypes": 6, "freeze_prototypes_steps": 1, "queue_size": 16,
                    "queue_start_epoch": 0},
           # Epoch 0 (steps 0-1): last layer frozen, teacher at 0.04; epoch 1: 0.07.
           # BN in the head (synchronised in the 1 vs 4 test).
           "dino": {"out_dim": 12, "momentum": 0.9, "warmup_teacher_temperature_epochs": 2,
                    "use_bn_in_head": True},
           "barlow_twins": {"lambd": 0.05}, "vicreg": {},
           "rotation": {}, "jigsaw": {"permutations": 10}, "pirl": {"negatives": 16}}
# Jigsaw tiles of the pretext methods, and PIRL's memory bank rows.
TILE = 4
NUM_EXAMPLES = 40


class TinyBackbone(keras.Model):
  """Conv-BN-ReLU-pool: enough to exercise BN statistics across replicas."""
  feature_dim = 8

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    # Named: checkpoints file variables by their path inside the backbone.
    self.conv = keras.layers.Conv2D(8, 3, use_bias=False, name="conv")
    self.bn = keras.layers.BatchNormalization(synchronized=True, momentum=0.9,
                                              name="bn")
    self.pool = keras.layers.GlobalAveragePooling2D(name="pool")

  def call(self, images, training=False):
    stem = tf.nn.relu(self.bn(self.conv(images), training=training))
    return {"stem": stem, "features": self.pool(stem)}


def _batch(seed=0, multi_crop=False):
  """(views, labels) of one global batch; multi_crop: views are
  {"global": [B, 2, ...], "local": [B, 2, 5, 5, 3]}."""
  rng = np.random.default_rng(seed)
  views = rng.uniform(size=(GLOBAL_BATCH, 2, IMAGE, IMAGE, 3)).astype("float32")
  labels = np.array([0, 1, 2, 0, 1, -1, 2, -1], dtype="int64")
  if multi_crop:
    local = rng.uniform(size=(GLOBAL_BATCH, LOCAL_CROPS, LOCAL_IMAGE, LOCAL_IMAGE, 3))
    views = {"global": views, "local": local.astype("float32")}
  return views, labels


def _inputs(seed, name):
  """The batch entries of global batch `seed` for method `name`: the views
  of _batch (rotation: the first view; jigsaw: 9 tiles; pirl: the first
  view and 9 tiles), the labels and, for PIRL, indices that repeat across
  batches (so bank rows are written twice)."""
  cls = methods.get(name)
  views, labels = _batch(seed, cls.multi_crop)
  tiles = np.random.default_rng(100 + seed).uniform(
      size=(GLOBAL_BATCH, 9, TILE, TILE, 3)).astype("float32")
  if name == "rotation":
    views = views[:, :1]
  elif name == "jigsaw":
    views = tiles
  elif name == "pirl":
    views = {"global": views[:, :1], "tiles": tiles}
  out = {"views": views, "label": labels}
  if "index" in cls.batch_entries:
    out["index"] = (np.arange(GLOBAL_BATCH, dtype="int64") * 2 + 3 * seed) % NUM_EXAMPLES
  return out


def _build(name, initial_weights=None, total_steps=10):
  method = methods.create(name, OPTIONS[name], head=HEAD, total_steps=total_steps,
                          global_batch_size=GLOBAL_BATCH,
                          steps_per_epoch=STEPS_PER_EPOCH, num_examples=NUM_EXAMPLES)
  model = SSLModel(TinyBackbone(), method, num_classes=3, make_backbone=TinyBackbone)
  model(tf.zeros((2, IMAGE, IMAGE, 3)))
  if initial_weights is not None:
    model.set_weights(initial_weights)
  model.compile(optimizer=optim.LARS(learning_rate=LR.get(name, 0.5), weight_decay=1e-4))
  return model


def _fit(strategy, name, initial_weights, steps=STEPS):
  """`steps` fit steps of the global batches _batch(0), _batch(1), ...;
  replica r gets rows [r*b, (r+1)*b) of each (batches go to the replicas in
  turn)."""
  per_replica = GLOBAL_BATCH // strategy.num_replicas_in_sync
  batches = [_inputs(seed, name) for seed in range(steps)]
  rows = tf.nest.map_structure(lambda *b: np.concatenate(b), *batches)

  def dataset_fn(ctx):
    del ctx
    ds = tf.data.Dataset.from_tensor_slices(rows)
    return ds.batch(per_replica, drop_remainder=True)

  with strategy.scope():
    model = _build(name, initial_weights)
  data = strategy.distribute_datasets_from_function(dataset_fn)
  history = model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0)
  return model, history.history


def _weights(model):
  """[(path, value)] of every variable, in creation order."""
  return [(v.path, np.array(v)) for v in model.weights]


@pytest.mark.parametrize("name", ["byol", "moco_v2", "moco_v3", "swav", "dino",
                                  "barlow_twins", "vicreg", "rotation", "jigsaw",
                                  "pirl"])
def test_fit_steps_same_on_1_and_4_replicas(name):
  # Seeded: the initial weights must not depend on which tests ran before.
  keras.utils.set_random_seed(0)
  initial = _build(name).get_weights()
  m1, h1 = _fit(mirrored(1), name, initial)
  m4, h4 = _fit(mirrored(4), name, initial)
  w0 = _weights(_build(name, initial))
  w1, w4 = _weights(m1), _weights(m4)
  moved = [p for (p, a), (_, b) in zip(w0, w1) if not np.allclose(a, b)]
  assert len(moved) >= len(w0) // 2, "the steps should change most variables"
  # Every variable: online, target (EMA and its own BN statistics), queue,
  # prototypes, centre. Float32 rounding differs with the replica count and
  # grows with each step, so the tolerance also allows 0.1% of how far the
  # variable moved; a gradient off by the replica count would be off by a
  # large part of it.
  # Barlow Twins standardises each dimension over the 8 rows, dividing the
  # rounding by small deviations: 1% of the movement there (a gradient off by
  # the replica count is still 75% off).
  moved_share = 1e-2 if name == "barlow_twins" else 1e-3
  for (path, a), (_, b), (_, a0) in zip(w1, w4, w0):
    np.testing.assert_array_less(np.abs(a - b), 2e-5 + 2e-5 * np.abs(a)
                                 + moved_share * np.abs(a - a0), err_msg=path)
  np.testing.assert_allclose(h1["loss"], h4["loss"], rtol=1e-5)
  if name == "moco_v2":
    assert int(m1.queue.pointer.numpy()) == STEPS * GLOBAL_BATCH % 16
  if name == "swav":  # used in the last step, then written again
    assert int(m1.queue_0.filled.numpy()) == 16
  if name == "dino":  # the centre moved off zero, equally on 1 and 4
    assert np.abs(np.array(m1.center.center)).max() > 0
  if name == "pirl":  # rows of every step's examples written, Z estimated once
    written = np.unique(np.concatenate(
        [_inputs(seed, name)["index"] for seed in range(STEPS)]))
    initial_rows = np.array(_build(name, initial).memory_bank.rows)
    rows = np.array(m4.memory_bank.rows)
    changed = np.flatnonzero(np.abs(rows - initial_rows).max(axis=1) > 0)
    np.testing.assert_array_equal(changed, written)
    assert float(m4.memory_bank.normaliser.numpy()) > 0


def test_target_is_the_closed_form_ema_of_the_online_weights():
  """BYOL after n steps: target = copy at step 0, then m(k) * target +
  (1 - m(k)) * online_k at the start of step k (online_k: the weights after
  k updates), with m(k) the cosine schedule; BN statistics are the target's
  own."""
  total = 10
  model = _build("byol", total_steps=total)
  online, target = ema.paired_variables(
      [model.backbone, model.projection_head],
      [model.target_backbone, model.target_projection_head])
  assert len(online) == len(model.backbone.trainable_variables) + len(
      model.projection_head.trainable_variables)
  assert not any(v.trainable for v in target)
  assert not any(v is t for v in model.trainable_variables for t in target)
  expected = None
  for k in range(4):
    theta = [np.array(v) for v in online]
    m = 0.0 if k == 0 else float(ema.cosine_momentum(k, total, 0.9))
    expected = theta if expected is None else [
        m * e + (1 - m) * t for e, t in zip(expected, theta)]
    views, labels = _batch(k)
    model.train_step({"views": tf.constant(views), "label": tf.constant(labels)})
  for e, t in zip(expected, target):
    np.testing.assert_allclose(np.array(t), e, rtol=1e-5, atol=1e-6)
  # The online network moved away from its target.
  assert not np.allclose(np.array(online[0]), np.array(target[0]))
  # Moving statistics are not averaged: the target's come from its own passes.
  t_mean = [v for v in model.target_backbone.variables if "moving_mean" in v.path][0]
  o_mean = [v for v in model.backbone.variables if "moving_mean" in v.path][0]
  assert not np.allclose(np.array(t_mean), np.array(o_mean))


def test_cosine_momentum_schedule():
  m = lambda step: float(ema.cosine_momentum(step, 100, 0.99))
  assert m(0) == pytest.approx(0.99)
  assert m(50) == pytest.approx(0.995)
  assert m(100) == pytest.approx(1.0)
  assert m(250) == pytest.approx(1.0)
  method = methods.create("moco_v2", {"momentum": 0.99}, total_steps=100)
  assert float(method.momentum(50)) == pytest.approx(0.99)  # v2: constant.
  schedules = methods.create("byol", total_steps=100).schedules()
  assert schedules["byol_momentum"](50) == pytest.approx(0.998)


def _step(model, seed):
  inputs = _inputs(seed, model.method.name)
  return model.train_step(tf.nest.map_structure(tf.constant, inputs))


def test_moco_queue_holds_the_latest_keys_and_resumes_exactly(tmp_path):
  model = _build("moco_v2")
  initial = np.array(model.queue.keys)
  np.testing.assert_allclose(np.linalg.norm(initial, axis=1), 1.0, rtol=1e-5)
  captured = {}
  push = model.queue.push

  def spy(keys):
    captured["keys"] = keys
    push(keys)
  model.queue.push = spy
  _step(model, 0)
  model.queue.push = push
  # The first batch's keys at rows [0, 8), the rest untouched, pointer at 8.
  queue = np.array(model.queue.keys)
  np.testing.assert_allclose(queue[:8], np.array(captured["keys"]), rtol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(queue[:8], axis=1), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(queue[8:], initial[8:])
  assert int(model.queue.pointer.numpy()) == 8
  # Resume: a fresh model restored from the checkpoint continues identically.
  checkpoint = checkpoints.make_checkpoint(model, model.optimizer)
  path = checkpoint.save(str(tmp_path / "ckpt"))
  _step(model, 1)
  _step(model, 2)
  fresh = _build("moco_v2")
  fresh.optimizer.build(fresh.trainable_variables)
  checkpoints.make_checkpoint(fresh, fresh.optimizer).read(path).assert_existing_objects_matched()
  assert int(fresh.queue.pointer.numpy()) == 8
  _step(fresh, 1)
  _step(fresh, 2)
  assert int(fresh.queue.pointer.numpy()) == 24 % 16
  for a, b in zip(model.weights, fresh.weights):
    np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-6, atol=1e-7,
                               err_msg=a.path)


def test_pirl_bank_moves_to_the_image_rows_keeps_z_and_resumes_exactly(tmp_path):
  model = _build("pirl")
  bank = model.memory_bank
  initial = np.array(bank.rows)
  np.testing.assert_allclose(np.linalg.norm(initial, axis=1), 1.0, rtol=1e-5)
  assert float(bank.normaliser.numpy()) == 0.0  # not estimated yet
  captured = {}
  update = bank.update

  def spy(rows, index, momentum):
    captured.update(rows=np.array(rows), index=np.array(index), momentum=momentum)
    update(rows, index, momentum)
  bank.update = spy
  _step(model, 0)
  bank.update = update
  # The batch's rows: normalise(0.5 m + 0.5 f) of the image branch's unit
  # rows; every other row untouched.
  index = _inputs(0, "pirl")["index"]
  np.testing.assert_array_equal(captured["index"], index)
  assert captured["momentum"] == 0.5
  np.testing.assert_allclose(np.linalg.norm(captured["rows"], axis=1), 1.0, rtol=1e-5)
  want = 0.5 * initial[index] + 0.5 * captured["rows"]
  want /= np.linalg.norm(want, axis=1, keepdims=True)
  rows = np.array(bank.rows)
  np.testing.assert_allclose(rows[index], want, rtol=1e-5, atol=1e-6)
  others = np.setdiff1d(np.arange(NUM_EXAMPLES), index)
  np.testing.assert_array_equal(rows[others], initial[others])
  z = float(bank.normaliser.numpy())
  assert z > 0  # estimated on the first batch...
  # Resume: a fresh model restored from the checkpoint continues identically.
  path = checkpoints.make_checkpoint(model, model.optimizer).save(str(tmp_path / "c"))
  _step(model, 1)
  _step(model, 2)
  assert float(bank.normaliser.numpy()) == z  # ... and kept
  fresh = _build("pirl")
  fresh.optimizer.build(fresh.trainable_variables)
  checkpoints.make_checkpoint(fresh, fresh.optimizer).read(path).assert_existing_objects_matched()
  np.testing.assert_array_equal(np.array(fresh.memory_bank.rows), rows)
  assert float(fresh.memory_bank.normaliser.numpy()) == z
  _step(fresh, 1)
  _step(fresh, 2)
  for a, b in zip(model.weights, fresh.weights):
    np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-6, atol=1e-7,
                               err_msg=a.path)
  # The bank is a checkpoint part of its own; the representation the backbone.
  assert "memory_bank" in checkpoints._parts(model)  # pylint: disable=protected-access
  assert model.representation is model.backbone


def test_queue_must_hold_whole_batches():
  with pytest.raises(ValueError, match="multiple of --global_batch_size=8"):
    methods.create("moco_v2", {"queue_size": 20}, global_batch_size=8)


def test_checkpoint_parts_are_named_and_never_collide():
  model = _build("byol")
  parts = checkpoints._parts(model)  # pylint: disable=protected-access
  assert {"backbone", "projection_head", "predictor", "target_backbone",
          "target_projection_head", "probe_head"} <= set(parts)
  # The online and target backbones share their relative names, each in its part.
  assert set(parts["backbone"]) == set(parts["target_backbone"])
  # A layer filed in two parts would give two checkpoint entries one value.
  model.target_projection_head = model.projection_head
  with pytest.raises(ValueError, match="filed twice"):
    checkpoints._parts(model)  # pylint: disable=protected-access


def test_the_representation_is_what_export_and_init_take(tmp_path):
  from tf_ssl import export  # pylint: disable=g-import-not-at-top
  model = _build("byol")
  for k in range(2):
    _step(model, k)
  path = checkpoints.make_checkpoint(model, model.optimizer).save(str(tmp_path / "c"))
  fresh = TinyBackbone()
  fresh(tf.zeros((1, IMAGE, IMAGE, 3)))
  checkpoints.restore_backbone(fresh, path)
  images = tf.constant(_batch(5)[0][:, 0])
  want = model.backbone(images)["features"]
  np.testing.assert_allclose(fresh(images)["features"], want, rtol=1e-5)
  assert not np.allclose(model.target_backbone(images)["features"], want)
  module = export.build_export_module(model)
  out = module.call_endpoint(images)
  np.testing.assert_allclose(out["features"], want, rtol=1e-5)
  assert {"projection", "prediction"} <= set(out)


def test_a_flag_of_another_method_is_an_error(tmp_path):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from tf_ssl import flags as tf_ssl_flags  # pylint: disable=g-import-not-at-top
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  base = ["tf_ssl", f"--workdir={tmp_path}", "--train_steps=10"]
  try:
    FLAGS.unparse_flags()
    FLAGS(base + ["--method=simclr", "--byol_momentum=0.99"])
    with pytest.raises(flags.ValidationError, match="--byol_momentum=0.99 is an option of --method=byol"):
      tf_ssl_flags.pretrain_config()
    FLAGS.unparse_flags()
    FLAGS(base + ["--method=moco_v3", "--moco_queue_size=4096"])
    with pytest.raises(flags.ValidationError, match="--method=moco_v2"):
      tf_ssl_flags.pretrain_config()
    FLAGS.unparse_flags()
    FLAGS(base + ["--method=moco_v2", "--moco_queue_size=4096", "--moco_momentum=0.99"])
    config = tf_ssl_flags.pretrain_config()
    assert config.method_options == {"queue_size": 4096, "momentum": 0.99}
    assert config.temperature == 0.2 and config.model.proj_head == "mlp"
    FLAGS.unparse_flags()
    FLAGS(base + ["--method=byol", "--byol_predictor_lr_multiplier=10"])
    assert tf_ssl_flags.pretrain_config().method_options == {
        "predictor_lr_multiplier": 10.0}
    FLAGS.unparse_flags()
    FLAGS(base + ["--method=byol", "--temperature=0.1"])
    with pytest.raises(flags.ValidationError, match="--temperature=0.1 is an option of"):
      tf_ssl_flags.pretrain_config()
    FLAGS.unparse_flags()
    FLAGS(base + ["--method=byol", "--num_views=3"])
    with pytest.raises(flags.ValidationError, match="takes 2 views"):
      tf_ssl_flags.pretrain_config()
  finally:
    FLAGS.unparse_flags()


def test_byol_predictor_learning_rate_multiplier_takes_the_predictor_only():
  byol = lambda options: methods.create(
      "byol", options, head=HEAD, total_steps=10, global_batch_size=GLOBAL_BATCH,
      steps_per_epoch=STEPS_PER_EPOCH, num_examples=NUM_EXAMPLES)
  method = byol({"predictor_lr_multiplier": 10.0})
  model = SSLModel(TinyBackbone(), method, num_classes=3, make_backbone=TinyBackbone)
  model(tf.zeros((2, IMAGE, IMAGE, 3)))
  optimizer = optim.LARS(0.5, lr_multipliers=method.learning_rate_multipliers())
  optimizer.build(model.trainable_variables)
  factors = {v.path: f for v, f in zip(model.trainable_variables, optimizer._lr_factor)}
  predictor = {p for p in factors if "/predictor/" in p}
  assert len(predictor) == 5  # two Dense, a BN's gamma and beta
  assert all(factors[p] == 10.0 for p in predictor)
  assert all(f == 1.0 for p, f in factors.items() if p not in predictor)
  assert byol({}).learning_rate_multipliers() == ()
  with pytest.raises(ValueError, match="byol_predictor_lr_multiplier"):
    byol({"predictor_lr_multiplier": 0.0})


def test_heads_are_the_references():
  """BYOL: Linear(bias)-BN-ReLU-Linear(no bias), no last BN, for projector
  and predictor; MoCo v3: no biases, projector ends in an affine-free BN,
  predictor without it; MoCo v2: the MLP with biases, no BN."""
  def layout(head):
    return [(d.use_bias, None if bn is None else (bn.center, bn.scale))
            for d, bn in zip(head.dense_layers, head.bn_layers)]
  byol = _build("byol")
  assert layout(byol.projection_head) == [(True, (True, True)), (False, None)]
  assert layout(byol.predictor) == [(True, (True, True)), (False, None)]
  assert byol.predictor.dense_layers[0].units == HEAD.hidden_dim
  moco_v3 = _build("moco_v3")
  assert layout(moco_v3.projection_head) == [(False, (True, True)), (False, (False, False))]
  assert layout(moco_v3.predictor) == [(False, (True, True)), (False, None)]
  assert layout(_build("moco_v2").projection_head) == [(True, None), (True, None)]
  # SwAV: biases everywhere; Barlow Twins: none; VICReg: all but the last.
  bn = (True, True)
  assert layout(_build("swav").projection_head) == [(True, bn), (True, None)]
  assert layout(_build("barlow_twins").projection_head) == [(False, bn), (False, None)]
  assert layout(_build("vicreg").projection_head) == [(True, bn), (False, None)]


def test_swav_prototypes_stay_unit_frozen_first_and_queue_when_full():
  """The prototypes are unit columns after every update and do not move in
  the frozen step 0; the queues start filling at queue_start_epoch and hold
  unit rows."""
  model = _build("swav")
  kernel = lambda: np.array(model.prototypes.kernel)
  initial = kernel()
  np.testing.assert_allclose(np.linalg.norm(initial, axis=0), 1.0, rtol=1e-5)
  _step(model, 0)
  np.testing.assert_allclose(kernel(), initial, atol=1e-6)  # frozen
  assert int(model.queue_0.filled.numpy()) == GLOBAL_BATCH
  _step(model, 1)
  assert not np.allclose(kernel(), initial, atol=1e-4)
  np.testing.assert_allclose(np.linalg.norm(kernel(), axis=0), 1.0, rtol=1e-5)
  assert bool(model.queue_0.full) and bool(model.queue_1.full)
  queue = np.array(model.queue_1.keys)
  np.testing.assert_allclose(np.linalg.norm(queue, axis=1), 1.0, rtol=1e-5)
  late = methods.create("swav", dict(OPTIONS["swav"], queue_start_epoch=1), head=HEAD,
                        total_steps=10, global_batch_size=GLOBAL_BATCH,
                        steps_per_epoch=STEPS_PER_EPOCH)
  model = SSLModel(TinyBackbone(), late, num_classes=3)
  model(tf.zeros((2, IMAGE, IMAGE, 3)))
  model.compile(optimizer=optim.LARS(learning_rate=0.5))
  _step(model, 0)
  assert int(model.queue_0.filled.numpy()) == 0  # epoch 0 < the start epoch


def test_dino_freezes_the_last_layer_warms_the_teacher_and_exports_the_teacher(tmp_path):
  model = _build("dino")
  method = model.method
  head = model.projection_head
  # One BN per hidden layer; no bias before it (BN would remove it).
  hidden = head.dense_layers[:-1]
  assert len(head.bn_layers) == len(hidden) == len(
      model.target_projection_head.bn_layers) >= 1
  assert not any(d.use_bias for d in hidden) and head.dense_layers[-1].use_bias
  assert [round(float(method.teacher_temperature(k)), 6) for k in (0, 1, 2, 3, 9)] == [
      0.04, 0.04, 0.07, 0.07, 0.07]
  # The layer's weights are its kernel's unit columns (weight normalisation);
  # weight decay alone only shrinks them.
  last = lambda: np.array(tf.math.l2_normalize(model.projection_head.last_kernel, 0))
  initial = last()
  _step(model, 0)
  _step(model, 1)  # epoch 0: frozen
  np.testing.assert_allclose(last(), initial, rtol=1e-5, atol=1e-7)
  _step(model, 2)
  assert not np.allclose(last(), initial)
  # The teacher is the representation: evaluation, export, --init.
  assert model.representation is model.target_backbone
  parts = checkpoints._parts(model)  # pylint: disable=protected-access
  assert {"backbone", "online_backbone", "center"} <= set(parts)
  path = checkpoints.make_checkpoint(model, model.optimizer).save(str(tmp_path / "c"))
  fresh = TinyBackbone()
  fresh(tf.zeros((1, IMAGE, IMAGE, 3)))
  checkpoints.restore_backbone(fresh, path)
  images = tf.constant(_batch(5)[0][:, 0])
  want = model.target_backbone(images)["features"]
  np.testing.assert_allclose(fresh(images)["features"], want, rtol=1e-5)
  assert not np.allclose(model.backbone(images)["features"], want)


def test_multi_crop_flags(tmp_path):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from tf_ssl import flags as tf_ssl_flags  # pylint: disable=g-import-not-at-top
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  base = ["tf_ssl", f"--workdir={tmp_path}", "--train_steps=10", "--image_size=32"]
  try:
    FLAGS.unparse_flags()
    FLAGS(base + ["--method=swav", "--local_crops=6", "--crop_min_area=0.14"])
    data = tf_ssl_flags.pretrain_config().data
    assert (data.local_crops, data.local_crop_size, data.local_crop_min_area) == (6, 14, 0.05)
    for args, match in [
        (["--method=byol", "--local_crops=2"], "takes no local crops"),
        (["--method=dino", "--local_crops=2", "--crop_min_area=0.04"], "local_crop_min_area"),
        (["--method=swav", "--swav_queue_size=-1"], "--swav_queue_size=-1"),
        (["--method=vicreg", "--barlow_lambd=0.1"], "option of --method=barlow_twins")]:
      FLAGS.unparse_flags()
      FLAGS(base + args)
      with pytest.raises(flags.ValidationError, match=match):
        tf_ssl_flags.pretrain_config()
  finally:
    FLAGS.unparse_flags()
  with pytest.raises(ValueError, match="builds its own head"):
    methods.create("dino", head=methods.HeadSpec(kind="simclr")).projector()
