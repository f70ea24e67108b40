"""Every flagfile in configs/ parses, validates, and builds what it describes.

For each configs/*.cfg (globbed, so new files are covered): the header names
the command that runs it, absl parses it with the flags of tf_ssl/flags.py,
the config function accepts it, and for pretraining configs the model is
built at the real image size and the SimCLR views are made from the data
spec (the dataset name must resolve; the data itself need not exist here).
Recipe-invariant checks (stem and blur against image size, batch against the
stated TPU cores) and the published numbers of docs/recipes.md for the
pretraining recipes catch a config edited away from its paper.
"""

import glob
import importlib
import importlib.util
import math
import os
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_ssl import flags as tf_ssl_flags
from tf_ssl import methods
from tf_ssl import optim
from tf_ssl import train
from tf_ssl.data import augment
from tf_ssl.data import sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.cfg")))
FLAGS = tf_ssl_flags.FLAGS

# Class counts of the datasets the configs name, to size the online probe
# without reading the data (which need not be on this machine).
NUM_CLASSES = {"tfds:imagenet2012": 1000, "tfds:cifar10": 10, "fashion_mnist": 10}
# Training examples, for the methods with a row per example (PIRL's bank).
NUM_EXAMPLES = {"tfds:imagenet2012": 1281167, "tfds:cifar10": 50000,
                "fashion_mnist": 60000}
# The pretext methods' heads (no projection endpoint).
PRETEXT_HEADS = {"rotation": "rotation_head", "jigsaw": "jigsaw_head"}
FEATURE_WIDTH = {"resnet18": 512, "resnet18x0.25": 128, "resnet18x0.5": 256, "resnet50": 2048}

# The published recipes (docs/recipes.md and the papers each config cites).
# peak_lr is the learning rate after batch scaling, the number the papers
# state (SimCLR v1: 0.3 * 4096 / 256 = 4.8; v2: 0.1 * sqrt(4096) = 6.4).
PUBLISHED = {
    "simclr_imagenet.cfg": dict(
        dataset="tfds:imagenet2012", backbone="resnet50", image_size=224,
        global_batch_size=4096, train_epochs=100, peak_lr=0.3 * 4096 / 256,
        warmup_epochs=10, weight_decay=1e-6, temperature=0.1, proj_layers=2,
        color_strength=1.0, blur=True, simclr_version=1, method="simclr",
        optimizer="lars"),
    "simclrv2_imagenet.cfg": dict(
        dataset="tfds:imagenet2012", backbone="resnet50", image_size=224,
        global_batch_size=4096, train_epochs=800, peak_lr=6.4,
        warmup_epochs=0.05 * 800, weight_decay=1e-4, temperature=0.1,
        proj_layers=3, color_strength=1.0, blur=True, simclr_version=2,
        method="simclr", optimizer="lars"),
    "supcon_imagenet.cfg": dict(
        dataset="tfds:imagenet2012", backbone="resnet50", image_size=224,
        global_batch_size=6144, train_epochs=350, peak_lr=0.4 * 6144 / 256,
        weight_decay=1e-3, temperature=0.1, method="supcon", optimizer="lars"),
    "simclr_cifar10.cfg": dict(
        dataset="tfds:cifar10", backbone="resnet50", image_size=32,
        global_batch_size=1024, train_epochs=1000, peak_lr=1.0 * 1024 / 256,
        weight_decay=1e-4, temperature=0.5, proj_layers=2, color_strength=0.5,
        blur=False, simclr_version=1, method="simclr", optimizer="lars"),
    # BYOL paper, Table 1 and its appendix: 1000 epochs, 0.2 * B / 256, wd
    # 1.5e-6, target 0.996 -> 1, projector/predictor 4096 -> 256.
    "byol_imagenet.cfg": dict(
        dataset="tfds:imagenet2012", backbone="resnet50", image_size=224,
        global_batch_size=4096, train_epochs=1000, peak_lr=0.2 * 4096 / 256,
        warmup_epochs=10, weight_decay=1.5e-6, method="byol", optimizer="lars",
        byol_momentum=0.996, byol_pred_hidden_dim=4096, proj_hidden_dim=4096,
        proj_dim=256, proj_head="byol", crop_min_area=0.08),
    # facebookresearch/moco README and main_moco.py with --mlp --aug-plus --cos.
    "mocov2_imagenet.cfg": dict(
        dataset="tfds:imagenet2012", backbone="resnet50", image_size=224,
        global_batch_size=256, train_epochs=200, peak_lr=0.03, warmup_epochs=0,
        weight_decay=1e-4, temperature=0.2, method="moco_v2", optimizer="sgd",
        moco_momentum=0.999, moco_queue_size=65536, proj_hidden_dim=2048,
        proj_dim=128, proj_head="mlp", crop_min_area=0.2, color_strength=0.5,
        blur=True),
    # facebookresearch/moco-v3 CONFIG.md, ResNet-50 100 epochs.
    "mocov3_imagenet.cfg": dict(
        dataset="tfds:imagenet2012", backbone="resnet50", image_size=224,
        global_batch_size=4096, train_epochs=100, peak_lr=0.6 * 4096 / 256,
        warmup_epochs=10, weight_decay=1e-6, temperature=1.0, method="moco_v3",
        optimizer="lars", moco_momentum=0.99, proj_hidden_dim=4096, proj_dim=256,
        proj_head="moco_v3", crop_min_area=0.2),
    # facebookresearch/swav scripts/swav_800ep_pretrain.sh (batch 4096).
    "swav_imagenet.cfg": dict(
        dataset="tfds:imagenet2012", backbone="resnet50", image_size=224,
        global_batch_size=4096, train_epochs=800, peak_lr=4.8, warmup_epochs=10,
        weight_decay=1e-6, temperature=0.1, method="swav", optimizer="lars",
        swav_prototypes=3000, swav_epsilon=0.05, swav_freeze_prototypes_steps=313,
        proj_hidden_dim=2048, proj_dim=128, proj_head="swav", crop_min_area=0.14,
        local_crops=6, local_crop_size=96, local_crop_min_area=0.05,
        color_strength=1.0, blur=True),
    # facebookresearch/dino README, the ResNet-50 command.
    "dino_imagenet.cfg": dict(
        dataset="tfds:imagenet2012", backbone="resnet50", image_size=224,
        global_batch_size=512, train_epochs=100, peak_lr=0.03 * 512 / 256,
        warmup_epochs=10, weight_decay=1e-4, method="dino", optimizer="sgd",
        dino_out_dim=65536, dino_momentum=0.996, dino_teacher_temperature=0.04,
        dino_student_temperature=0.1, dino_freeze_last_layer_epochs=1,
        proj_layers=3, proj_hidden_dim=2048, proj_dim=256, crop_min_area=0.14,
        local_crops=8, local_crop_size=96, local_crop_min_area=0.05),
    # facebookresearch/barlowtwins main.py.
    "barlow_twins_imagenet.cfg": dict(
        dataset="tfds:imagenet2012", backbone="resnet50", image_size=224,
        global_batch_size=2048, train_epochs=1000, peak_lr=0.2 * 2048 / 256,
        warmup_epochs=10, weight_decay=1e-6, method="barlow_twins",
        optimizer="lars", barlow_lambd=0.0051, proj_layers=3,
        proj_hidden_dim=8192, proj_dim=8192, proj_head="barlow_twins"),
    # facebookresearch/vicreg main_vicreg.py.
    "vicreg_imagenet.cfg": dict(
        dataset="tfds:imagenet2012", backbone="resnet50", image_size=224,
        global_batch_size=2048, train_epochs=1000, peak_lr=0.2 * 2048 / 256,
        warmup_epochs=10, weight_decay=1e-6, method="vicreg", optimizer="lars",
        vicreg_sim_weight=25.0, vicreg_var_weight=25.0, vicreg_cov_weight=1.0,
        proj_layers=3, proj_hidden_dim=8192, proj_dim=8192, proj_head="vicreg"),
    "supcon_cifar10.cfg": dict(
        dataset="tfds:cifar10", backbone="resnet50", image_size=32,
        global_batch_size=1024, train_epochs=1000, peak_lr=0.5,
        weight_decay=1e-4, temperature=0.1, color_strength=0.5, blur=False,
        crop_min_area=0.2, method="supcon", optimizer="sgd"),
}


def _header(path):
  """The leading comment block of a flagfile, as one string."""
  lines = []
  with open(path) as f:
    for line in f:
      if not line.startswith("#"):
        break
      lines.append(line.lstrip("#").strip())
  return "\n".join(lines)


def _entry_point(path):
  """"train", "finetune" or "distill": the tf_ssl module the header's command runs."""
  match = re.search(r"python -m tf_ssl\.(\w+)", _header(path))
  return match.group(1) if match else None


def _name(path):
  return os.path.basename(path)


@pytest.fixture
def parse(tmp_path):
  """Parses a flagfile into the module-level FLAGS; unparses afterwards so
  the next file (and other tests) start from the defaults."""
  def parse_file(path):
    FLAGS.unparse_flags()
    FLAGS(["tf_ssl", f"--flagfile={path}", f"--workdir={tmp_path / 'work'}"])
  yield parse_file
  FLAGS.unparse_flags()


def test_the_issue_configs_exist():
  names = {_name(p) for p in CONFIGS}
  fashion = [f"{m}_fashion_mnist.cfg" for m in (
      "simclr", "byol", "mocov2", "mocov3", "swav", "dino", "barlow_twins",
      "vicreg", "rotation", "jigsaw", "pirl")]
  for name in list(PUBLISHED) + fashion + ["simclr_fashion_mnist_long.cfg",
                                           "distill_fashion_mnist.cfg",
                                           "distill_imagenet.cfg"]:
    assert name in names


@pytest.mark.parametrize("path", CONFIGS, ids=_name)
def test_header_gives_the_command_with_this_flagfile(path):
  with open(path) as f:
    assert f.readline().startswith("#"), "a config starts with its comment"
  header = _header(path)
  assert _entry_point(path) in ("train", "finetune", "distill"), (
      f"{_name(path)}: the header needs the command, `python -m tf_ssl.<module> "
      "--flagfile=...`")
  assert f"--flagfile=configs/{_name(path)}" in header, (
      f"{_name(path)}: the command in the header must name this file")
  if _entry_point(path) == "train":
    for word in ("hardware", "time", "result"):
      assert word in header.lower(), f"{_name(path)}: the header says no {word}"


def _pretrain_configs():
  return [p for p in CONFIGS if _entry_point(p) == "train"]


def _check_source_name(name, tmp_path):
  """The dataset flag resolves to a source kind (and, for tfds, a dataset
  tfds knows); missing data is fine, an unknown name is not."""
  try:
    sources.make_source(name, "train", str(tmp_path / "no_data"))
  except FileNotFoundError:
    pass  # The name resolved; the data is not on this machine.


@pytest.mark.parametrize("path", _pretrain_configs(), ids=_name)
def test_pretrain_config_builds_its_model_and_views(path, parse, tmp_path):
  parse(path)
  config = tf_ssl_flags.pretrain_config()
  d, m = config.data, config.model

  # Data spec: the source name resolves; the views are the trainer's.
  _check_source_name(d.dataset, tmp_path)
  views = augment.SimCLRAugment(
      d.image_size, color_strength=d.color_strength, version=d.simclr_version,
      blur=d.blur, crop_area=(d.crop_min_area, 1.0), num_views=d.num_views)
  images = np.random.default_rng(0).integers(0, 256, (2, 40, 48, 3), np.uint8)
  out = views.crop_batch(images, tf.constant([1, 2]))
  assert out.shape == (2, d.num_views, d.image_size, d.image_size, 3)
  assert 0.0 <= float(tf.reduce_min(out)) and float(tf.reduce_max(out)) <= 1.0
  # docs/recipes.md: blur at ImageNet resolution only, the small stem for <= 32 px.
  assert views.blur == (d.image_size >= 96)
  assert m.small_image_stem == (d.image_size <= 32)

  # Model spec, built at the config's image size.
  keras.backend.clear_session()
  method = train.build_method(config, num_examples=NUM_EXAMPLES[d.dataset])
  model = train.build_model(config, NUM_CLASSES[d.dataset], method=method)
  endpoints = model(tf.zeros((1, d.image_size, d.image_size, 3)))
  assert endpoints["features"].shape[-1] == FEATURE_WIDTH[m.backbone]
  assert endpoints["probe_logits"].shape[-1] == NUM_CLASSES[d.dataset]
  if config.method in PRETEXT_HEADS:  # No projection: a pretext task's head.
    assert hasattr(model, PRETEXT_HEADS[config.method])
    assert not any(k.startswith("proj") for k in endpoints)
  elif config.method == "pirl":  # VISSL's linear heads to --proj_dim.
    assert endpoints["projection"].shape[-1] == m.proj_dim
  else:
    # DINO's head ends in --dino_out_dim logits after its --proj_dim bottleneck.
    out_dim = (config.method_options.get("out_dim", 65536)
               if config.method == "dino" else m.proj_dim)
    assert endpoints["projection"].shape[-1] == out_dim
    assert f"proj_{m.proj_layers}" in endpoints
    assert f"proj_{m.proj_layers + 1}" not in endpoints

  # The batch divides over the TPU cores the header names ("v3-32").
  cores = re.search(r"TPU v\d+-(\d+)", _header(path))
  if cores:
    assert config.global_batch_size % int(cores.group(1)) == 0
  keras.backend.clear_session()


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_pretrain_config_matches_the_published_recipe(name, parse):
  parse(os.path.join(REPO, "configs", name))
  config = tf_ssl_flags.pretrain_config()
  values = dict(
      dataset=config.data.dataset, backbone=config.model.backbone,
      image_size=config.data.image_size,
      global_batch_size=config.global_batch_size,
      train_epochs=config.train_epochs, warmup_epochs=config.warmup_epochs,
      weight_decay=config.weight_decay, temperature=config.temperature,
      proj_layers=config.model.proj_layers,
      color_strength=config.data.color_strength,
      blur=augment.SimCLRAugment(config.data.image_size,
                                 blur=config.data.blur).blur,
      simclr_version=config.data.simclr_version,
      crop_min_area=config.data.crop_min_area, method=config.method,
      optimizer=config.optimizer, proj_hidden_dim=config.model.proj_hidden_dim,
      proj_dim=config.model.proj_dim, proj_head=config.model.proj_head,
      local_crops=config.data.local_crops,
      local_crop_size=config.data.local_crop_size,
      local_crop_min_area=config.data.local_crop_min_area)
  # The method's own options, by their flag names (byol_momentum, ...).
  values.update({methods.flag_name(config.method, k): v
                 for k, v in config.method_options.items()})
  peak = config.learning_rate
  if config.lr_scaling != "none":
    peak = optim.scale_learning_rate(peak, config.global_batch_size,
                                     config.lr_scaling)
  values["peak_lr"] = peak
  for key, expected in PUBLISHED[name].items():
    if isinstance(expected, float):
      assert math.isclose(values[key], expected, rel_tol=1e-9), (name, key)
    else:
      assert values[key] == expected, (name, key)


def _finetune_config_fn():
  """The config function of tf_ssl.finetune, wherever it is defined."""
  finetune = importlib.import_module("tf_ssl.finetune")
  for module in (tf_ssl_flags, finetune):
    fn = getattr(module, "finetune_config", None)
    if fn is not None:
      return fn
  raise AssertionError("tf_ssl.finetune exists but no finetune_config() was "
                       "found in tf_ssl.flags or tf_ssl.finetune")


@pytest.mark.parametrize(
    "path", [p for p in CONFIGS if _entry_point(p) == "finetune"] or [None],
    ids=lambda p: _name(p) if p else "none")
def test_finetune_config_parses(path, parse, tmp_path):
  if path is None:
    pytest.skip("no fine-tuning configs yet")
  if importlib.util.find_spec("tf_ssl.finetune") is None:
    pytest.skip("tf_ssl/finetune.py does not exist yet")
  config_fn = _finetune_config_fn()
  parse(path)
  config = config_fn()
  _check_source_name(config.dataset, tmp_path)


@pytest.mark.parametrize("path", [p for p in CONFIGS if _entry_point(p) == "distill"],
                         ids=_name)
def test_distill_config_parses(path, parse, tmp_path):
  parse(path)
  FLAGS.teacher = str(tmp_path / "teacher")  # Given per run, like --init.
  config = tf_ssl_flags.distill_config()
  assert config.mode == "finetune" and config.distill_temperature == 1.0
  assert config.labels_per_class is None, "the unlabelled pool is every image"
  _check_source_name(config.dataset, tmp_path)


@pytest.mark.parametrize("extra, brightness, head", [
    ([], 2, "simclr"), (["--simclr_version=1"], 1, "simclr"),
    (["--simclr_version=1", "--proj_head=mlp"], 1, "mlp"),
    (["--proj_head=mlp"], 2, "mlp")])
def test_simclr_version_picks_brightness_and_proj_head_the_head(
    extra, brightness, head, parse, tmp_path):
  """--simclr_version picks only the brightness jitter; the head is the
  SimCLR codebases' (every Dense without bias, then BN, the last BN without
  centre) unless --proj_head=mlp asks for SupCon's Linear-ReLU-Linear."""
  path = tmp_path / "run.cfg"
  with open(os.path.join(REPO, "configs", "simclr_fashion_mnist.cfg")) as f:
    lines = [l for l in f.read().splitlines() if "simclr_version" not in l]
  path.write_text("\n".join(lines + extra) + "\n")
  parse(str(path))
  config = tf_ssl_flags.pretrain_config()
  assert (config.data.simclr_version, config.model.proj_head) == (brightness, head)
  keras.backend.clear_session()
  projection = train.build_model(config, 10).projection_head
  last_bn, last_dense = projection.bn_layers[-1], projection.dense_layers[-1]
  assert (last_bn is not None) == (head == "simclr")
  assert last_dense.use_bias == (head == "mlp")
  if head == "simclr":
    assert not last_bn.center and last_bn.scale
  keras.backend.clear_session()
  path.write_text("\n".join(["--mode=linear", "--train_steps=10"] + extra) + "\n")
  parse(str(path))
  assert tf_ssl_flags.finetune_config().proj_head == head


def test_a_duration_on_the_command_line_replaces_the_flagfiles(tmp_path):
  """A quick try of a config: the command line's --train_steps replaces the
  file's --train_epochs (and the other way round); both on the command line
  is still the error it was."""
  demo = os.path.join(REPO, "configs", "simclr_fashion_mnist.cfg")
  work = f"--workdir={tmp_path}"
  try:
    FLAGS.unparse_flags()
    tf_ssl_flags.parse_command_line(["tf_ssl", f"--flagfile={demo}", "--train_steps=26", work])
    config = tf_ssl_flags.pretrain_config()
    assert (config.train_steps, config.train_epochs) == (26, None)
    assert "--train_epochs" not in tf_ssl_flags.flags_as_text()
    steps_file = tmp_path / "steps.cfg"
    steps_file.write_text("--train_steps=52\n")
    FLAGS.unparse_flags()
    tf_ssl_flags.parse_command_line(["tf_ssl", f"--flagfile={steps_file}",
                                     "--train_epochs=0.5", work])
    config = tf_ssl_flags.pretrain_config()
    assert (config.train_steps, config.train_epochs) == (None, 0.5)
    FLAGS.unparse_flags()
    tf_ssl_flags.parse_command_line(["tf_ssl", "--train_steps=4", "--train_epochs=1", work])
    with pytest.raises(tf_ssl_flags.flags.ValidationError, match="exactly one"):
      tf_ssl_flags.pretrain_config()
  finally:
    FLAGS.unparse_flags()


def test_finetune_takes_its_own_optimisation_defaults(parse, tmp_path):
  """The fine-tuning CLI shares --optimizer, --learning_rate, --warmup_epochs
  ... with pretraining, whose defaults (LARS, 0.3, 10 warmup epochs) are not
  fine-tuning's: flags not given take FinetuneConfig's."""
  path = tmp_path / "linear.cfg"
  path.write_text("--mode=linear\n--train_steps=10\n")
  parse(str(path))
  config = tf_ssl_flags.finetune_config()
  defaults = tf_ssl_flags.FinetuneConfig
  for name in ("optimizer", "learning_rate", "lr_scaling", "momentum",
               "weight_decay", "warmup_epochs"):
    assert getattr(config, name) == getattr(defaults, name), name
  path.write_text("--mode=linear\n--train_steps=10\n--optimizer=lars\n--learning_rate=0.5\n")
  parse(str(path))
  config = tf_ssl_flags.finetune_config()
  assert (config.optimizer, config.learning_rate) == ("lars", 0.5)


def test_projection_hidden_width_defaults_to_the_feature_width(parse, tmp_path):
  """SimCLR's hidden layers are as wide as the features (2048 for a
  ResNet-50, 512 for a ResNet-18); --proj_hidden_dim=0, the default, says so."""
  path = tmp_path / "run.cfg"
  path.write_text("--backbone=resnet18x0.25\n--train_steps=10\n--image_size=16\n")
  parse(str(path))
  config = tf_ssl_flags.pretrain_config()
  keras.backend.clear_session()
  model = train.build_model(config, 0)
  assert model.projection_head.dense_layers[0].units == model.backbone.feature_dim == 128
  keras.backend.clear_session()
