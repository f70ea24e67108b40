"""Every command-line flag of tf_ssl, and their conversion to plain configs.

The only module that reads FLAGS. Entry points call `pretrain_config()` once,
after absl has parsed the command line; everything below them takes the
resulting dataclasses. Validation happens here, before any work, and each
error names the flag to change.
"""

import dataclasses
from typing import Optional

from absl import flags

from tf_ssl import methods
from tf_ssl.models import heads

FLAGS = flags.FLAGS

# Run and machine.
flags.DEFINE_string("workdir", None, "Checkpoints, summaries, flags, results and export go here (local or gs://).")
flags.DEFINE_enum("strategy", "auto", ["default", "mirrored", "multi_worker", "tpu", "auto"], "tf.distribute strategy.")
flags.DEFINE_string("tpu", None, "TPU to use with --strategy=tpu|auto: 'local' on a TPU VM, a name or grpc:// address.")
flags.DEFINE_integer("steps_per_execution", 1, "Train steps run inside one tf.function call.")
flags.DEFINE_bool("jit_compile", False, "Compile the train step with XLA (measured slower on CPU; TPU always compiles).")
flags.DEFINE_bool("mixed_precision", False, "bfloat16 compute with float32 variables and loss.")
flags.DEFINE_integer("seed", 0, "Seed of initialisation, data order and augmentation.")
flags.DEFINE_bool("deterministic", False, "Deterministic input pipeline (slower).")

# Data.
flags.DEFINE_string("dataset", "fashion_mnist", "fashion_mnist | tfds:<name> | folder:<path> | tfrecord:<glob>.")
flags.DEFINE_string("data_dir", None, "tfds data_dir, or the folder holding the Fashion-MNIST IDX files.")
flags.DEFINE_string("train_split", "train", "Split used for pretraining.")
flags.DEFINE_string("eval_split", "test", "Labelled split used for k-NN and linear evaluation.")
flags.DEFINE_integer("image_size", 32, "Side of the square training views in pixels.")
flags.DEFINE_float("color_strength", 0.5, "Colour jitter strength s (1.0 ImageNet, 0.5 CIFAR).")
flags.DEFINE_enum("blur", "auto", ["auto", "on", "off"], "Gaussian blur; auto = on at >= 96 px.")
flags.DEFINE_float("crop_min_area", 0.08, "Lower bound of the random-resized-crop area fraction.")
flags.DEFINE_integer("num_views", 2, "Views per image (2 in the papers; with more, SimCLR counts every other view of the image as a positive). rotation, jigsaw and pirl make views of their own and take only the default.")
flags.DEFINE_integer("local_crops", 0, "Multi-crop (swav, dino): local crops per image besides the --num_views global views (6 SwAV, 8 DINO; 0: none).")
flags.DEFINE_integer("local_crop_size", 0, "Side of the local crops in pixels; 0: 96/224 of --image_size.")
flags.DEFINE_list("progressive_resolution", [], "Train at smaller views early, as fast ImageNet trainers do: SIZE:FRACTION pairs, e.g. 16:0.3,22:0.6 trains the first 30% of the steps at 16 px, up to 60% at 22 px and the rest at --image_size (local crops scale alike; evaluation stays at --image_size). Empty: --image_size throughout.")
flags.DEFINE_float("local_crop_min_area", 0.05, "Lower bound of the local crops' area fraction; the upper is --crop_min_area (SwAV 0.05-0.14, DINO 0.05-0.4).")
flags.DEFINE_enum("cache", "auto", ["auto", "on", "off"], "Cache decoded images in memory; auto: small datasets only.")

# Model.
flags.DEFINE_string("backbone", "resnet18", "resnet18|34|50|101|152|200, optionally _x<width>; or bit_r<depth>x<width>.")
flags.DEFINE_bool("small_image_stem", None, "3x3 stride-1 stem without max-pool; default: on when --image_size <= 32.")
flags.DEFINE_bool("sync_bn", True, "Synchronise BatchNorm statistics across replicas.")
flags.DEFINE_integer("proj_layers", 2, "Projection head layers (SimCLR v1: 2, v2: 3).")
flags.DEFINE_integer("proj_hidden_dim", 0, "Hidden width of the projection head; 0: the backbone's feature width, as SimCLR (2048 for a ResNet-50).")
flags.DEFINE_integer("proj_dim", 128, "Output width of the projection head.")

# Method and optimisation.
flags.DEFINE_enum("method", "simclr", list(methods.NAMES), "Pretraining method (tf_ssl/methods/; docs/recipes.md has each recipe).")
flags.DEFINE_enum("simclr_version", "2", ["1", "2"], "Brightness jitter, 1: additive, 2: multiplicative (docs/recipes.md).")
flags.DEFINE_enum("proj_head", "auto", ["auto"] + list(heads.KINDS), "Projection head: auto = the method's own (simclr for SimCLR and SupCon, mlp for MoCo v2, else the method's name); simclr = both SimCLR codebases' (Dense without bias + BN per layer, ReLU between, last BN without centre; --proj_layers 2 for v1, 3 for v2); mlp = SupCon's and MoCo v2's PyTorch head (Linear-ReLU-Linear with biases, no BN); byol = BYOL's (Linear+BN+ReLU, last Linear without bias); moco_v3 = MoCo v3's (hidden layers without bias + BN, last BN without affine); swav, barlow_twins, vicreg = theirs (Linear+BN+ReLU, last Linear; biases as each reference). DINO always builds its own head (GELU MLP to the --proj_dim bottleneck, weight-normalised last layer to --dino_out_dim).")
# Method options: one flag per field of a method's Config (tf_ssl/methods/),
# named with the method's prefix; None means the method's default. A flag of
# another method than --method is an error.
flags.DEFINE_float("temperature", None, "Softmax temperature of the contrastive loss; default: the method's (simclr, supcon, swav 0.1; moco_v2 0.2; moco_v3 1.0; pirl 0.07).")
flags.DEFINE_float("supcon_base_temperature", None, "SupCon loss scale is temperature / base temperature (default 0.07).")
flags.DEFINE_enum("supcon_contrast_mode", None, ["all", "one"], "SupCon anchors: every view (default), or the first.")
flags.DEFINE_enum("supcon_summation", None, ["outside", "inside"], "SupCon L_out (default) or L_in.")
flags.DEFINE_enum("supcon_denominator", None, ["all", "negatives"], "SupCon denominator (default all).")
flags.DEFINE_float("byol_momentum", None, "BYOL target EMA momentum at step 0, cosine to 1 (default 0.996).")
flags.DEFINE_float("byol_predictor_lr_multiplier", None, "BYOL: the predictor's learning rate over the rest's (default 1.0, the paper's; SimSiam and DirectPred found a faster predictor helps).")
flags.DEFINE_integer("byol_pred_hidden_dim", None, "BYOL predictor hidden width (default 0: the projector's hidden width).")
flags.DEFINE_float("moco_momentum", None, "MoCo key-encoder EMA momentum: constant for moco_v2 (default 0.999), from it to 1 by cosine for moco_v3 (default 0.99).")
flags.DEFINE_integer("moco_queue_size", None, "moco_v2: keys in the queue, a multiple of --global_batch_size (default 65536).")
flags.DEFINE_integer("moco_pred_hidden_dim", None, "moco_v3: predictor hidden width (default 0: the projector's hidden width).")
flags.DEFINE_integer("swav_prototypes", None, "SwAV prototypes (default 3000).")
flags.DEFINE_float("swav_epsilon", None, "SwAV Sinkhorn-Knopp entropy epsilon (default 0.05).")
flags.DEFINE_integer("swav_sinkhorn_iterations", None, "SwAV Sinkhorn-Knopp iterations (default 3).")
flags.DEFINE_integer("swav_freeze_prototypes_steps", None, "SwAV: no gradient to the prototypes for this many first steps (default 313, one epoch at batch 4096).")
flags.DEFINE_integer("swav_queue_size", None, "SwAV: projections queued per global view, a multiple of --global_batch_size (default 0: none; 3840 at batch 256).")
flags.DEFINE_integer("swav_queue_start_epoch", None, "SwAV: the epoch the queue starts filling; it is used once full (default 15).")
flags.DEFINE_integer("dino_out_dim", None, "DINO head output width K (default 65536).")
flags.DEFINE_float("dino_momentum", None, "DINO teacher EMA momentum at step 0, cosine to 1 (default 0.996).")
flags.DEFINE_float("dino_student_temperature", None, "DINO student temperature (default 0.1).")
flags.DEFINE_float("dino_teacher_temperature", None, "DINO teacher temperature after the warm-up (default 0.07).")
flags.DEFINE_float("dino_warmup_teacher_temperature", None, "DINO teacher temperature at epoch 0 (default 0.04).")
flags.DEFINE_integer("dino_warmup_teacher_temperature_epochs", None, "DINO: epochs of the linear teacher temperature warm-up, by epoch (default 30; 0: none).")
flags.DEFINE_float("dino_center_momentum", None, "DINO centre momentum (default 0.9).")
flags.DEFINE_integer("dino_freeze_last_layer_epochs", None, "DINO: epochs without gradient to the head's last layer (default 1).")
flags.DEFINE_bool("dino_use_bn_in_head", None, "DINO: BatchNorm after each hidden layer of the head, the reference's use_bn_in_head (default false).")
flags.DEFINE_float("barlow_lambd", None, "Barlow Twins off-diagonal weight lambda (default 0.0051).")
flags.DEFINE_float("vicreg_sim_weight", None, "VICReg invariance weight (default 25).")
flags.DEFINE_float("vicreg_var_weight", None, "VICReg variance weight (default 25).")
flags.DEFINE_float("vicreg_cov_weight", None, "VICReg covariance weight (default 1).")
flags.DEFINE_integer("jigsaw_permutations", None, "Jigsaw: permutations of the 9 tiles to tell apart, a fixed set far apart in Hamming distance (default 100; 1000 in the paper).")
flags.DEFINE_integer("pirl_negatives", None, "PIRL: memory-bank negatives per example (default 4096; 32000 in the paper on ImageNet).")
flags.DEFINE_float("pirl_momentum", None, "PIRL: memory-bank momentum, m <- normalise(momentum * m + (1 - momentum) * f) (default 0.5).")
flags.DEFINE_float("pirl_lambd", None, "PIRL: weight of the jigsaw term, 1 - it the image term's (default 0.5).")
flags.DEFINE_integer("global_batch_size", 256, "Images per step over all replicas (each gives num_views views).")
flags.DEFINE_integer("train_steps", None, "Training length in steps (exactly one of this and --train_epochs).")
flags.DEFINE_float("train_epochs", None, "Training length in epochs of --train_split.")
flags.DEFINE_float("warmup_epochs", 10, "Linear warmup length in epochs.")
flags.DEFINE_enum("optimizer", "lars", ["lars", "sgd", "adamw"], "Optimiser.")
flags.DEFINE_float("learning_rate", 0.3, "Base learning rate before --lr_scaling.")
flags.DEFINE_enum("lr_scaling", "linear", ["linear", "sqrt", "none"], "linear: lr*B/256, sqrt: lr*sqrt(B).")
flags.DEFINE_float("weight_decay", 1e-6, "Weight decay (added to the gradient for LARS and SGD, as the references; decoupled, lr * wd * w, for AdamW).")
flags.DEFINE_float("momentum", 0.9, "Momentum of LARS and SGD.")

# Checkpoints, evaluation, export.
flags.DEFINE_integer("checkpoint_every_steps", 1000, "Save a checkpoint every this many steps.")
flags.DEFINE_integer("keep_checkpoints", 3, "Checkpoints kept in --workdir.")
flags.DEFINE_integer("knn_k", 200, "Neighbours of the k-NN evaluation.")
flags.DEFINE_float("knn_temperature", 0.1, "Temperature of the weighted k-NN vote.")
flags.DEFINE_integer("eval_every_steps", 0, "k-NN accuracy to TensorBoard every this many steps (0: only at the end).")
flags.DEFINE_integer("eval_examples", 10000, "Labelled examples (bank and queries each) of the k-NN during training.")
flags.DEFINE_integer("final_eval_examples", 0, "Examples of each split in the end-of-run k-NN and linear evaluation, the first ones (0: whole splits; ImageNet-sized splits need a cap: the features are held in memory).")
flags.DEFINE_bool("baselines", False, "Also evaluate raw pixels and the random-init encoder.")
flags.DEFINE_bool("export", True, "Export a SavedModel to <workdir>/saved_model at the end.")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  workdir: str
  strategy: str
  tpu: Optional[str]
  steps_per_execution: int
  jit_compile: bool
  mixed_precision: bool
  seed: int
  deterministic: bool
  checkpoint_every_steps: int
  keep_checkpoints: int


@dataclasses.dataclass(frozen=True)
class DataConfig:
  dataset: str
  data_dir: Optional[str]
  train_split: str
  eval_split: str
  image_size: int
  color_strength: float
  simclr_version: int
  blur: Optional[bool]  # None: the recipe's default for the image size.
  crop_min_area: float
  num_views: int
  cache: object  # True, False or "auto", as tf_ssl.data.pipeline takes it.
  local_crops: int = 0  # multi-crop: local crops per image
  local_crop_size: int = 0
  local_crop_min_area: float = 0.05


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  backbone: str
  small_image_stem: bool
  sync_bn: bool
  proj_layers: int
  proj_hidden_dim: int
  proj_dim: int
  proj_head: str


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
  run: RunConfig
  data: DataConfig
  model: ModelConfig
  method: str
  method_options: dict  # {field of the method's Config: value given}
  global_batch_size: int
  train_steps: Optional[int]
  train_epochs: Optional[float]
  warmup_epochs: float
  optimizer: str
  learning_rate: float
  lr_scaling: str
  weight_decay: float
  momentum: float
  knn_k: int
  knn_temperature: float
  eval_every_steps: int
  eval_examples: int
  final_eval_examples: int
  baselines: bool
  export: bool
  # ((view size, fraction of the steps it ends at), ...), increasing.
  progressive_resolution: tuple = ()

  @property
  def temperature(self):
    """The method's temperature (given or its default); None if it has none."""
    config = methods.get(self.method).Config(**self.method_options)
    return getattr(config, "temperature", None)


def _check(condition, flag, message):
  if not condition:
    raise flags.ValidationError(f"--{flag}={getattr(FLAGS, flag)!r}: {message}")


def _validate_common():
  _check(FLAGS.workdir, "workdir", "give a directory for checkpoints and results.")
  _check(FLAGS.steps_per_execution >= 1, "steps_per_execution", "must be >= 1.")
  _check(FLAGS.checkpoint_every_steps >= 1, "checkpoint_every_steps", "must be >= 1.")
  _check(FLAGS.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1.")
  _check(FLAGS.global_batch_size >= 1, "global_batch_size", "must be >= 1.")
  _check(FLAGS.image_size >= 8, "image_size", "must be >= 8 pixels.")
  _check((FLAGS.train_steps is None) != (FLAGS.train_epochs is None), "train_steps",
         f"give exactly one of --train_steps and --train_epochs (got --train_epochs="
         f"{FLAGS.train_epochs!r}).")
  if FLAGS.train_steps is not None:
    _check(FLAGS.train_steps > 0, "train_steps", "must be positive.")
    # model.fit runs whole executions; the schedule must end where they do.
    _check(FLAGS.train_steps % FLAGS.steps_per_execution == 0, "train_steps",
           f"must be a multiple of --steps_per_execution={FLAGS.steps_per_execution}.")
  if FLAGS.train_epochs is not None:
    _check(FLAGS.train_epochs > 0, "train_epochs", "must be positive.")
  _check(FLAGS.learning_rate > 0, "learning_rate", "must be positive.")
  _check(FLAGS.weight_decay >= 0, "weight_decay", "must be >= 0.")
  _check(FLAGS.warmup_epochs >= 0, "warmup_epochs", "must be >= 0.")


def _run_config():
  return RunConfig(
      workdir=FLAGS.workdir, strategy=FLAGS.strategy, tpu=FLAGS.tpu,
      steps_per_execution=FLAGS.steps_per_execution, jit_compile=FLAGS.jit_compile,
      mixed_precision=FLAGS.mixed_precision, seed=FLAGS.seed,
      deterministic=FLAGS.deterministic,
      checkpoint_every_steps=FLAGS.checkpoint_every_steps,
      keep_checkpoints=FLAGS.keep_checkpoints)


def pretrain_config():
  """Validates the pretraining flags and returns a PretrainConfig."""
  _validate_common()
  _check(0 < FLAGS.crop_min_area <= 1, "crop_min_area", "must be in (0, 1].")
  _check(FLAGS.proj_layers >= 1, "proj_layers", "must be >= 1.")
  _check(FLAGS.proj_hidden_dim >= 0, "proj_hidden_dim", "must be >= 0 (0: the feature width).")
  _check(FLAGS.eval_every_steps >= 0, "eval_every_steps", "must be >= 0 (0: only at the end).")
  _check(FLAGS.eval_examples >= 1, "eval_examples", "must be >= 1.")
  _check(FLAGS.final_eval_examples >= 0, "final_eval_examples", "must be >= 0 (0: whole splits).")
  _check(FLAGS.knn_k >= 1, "knn_k", "must be >= 1.")
  small_stem = FLAGS.small_image_stem
  if small_stem is None:
    small_stem = FLAGS.image_size <= 32
  blur = {"auto": None, "on": True, "off": False}[FLAGS.blur]
  method_options = _method_options(FLAGS.method)
  method_class = methods.get(FLAGS.method)
  try:
    method_class.Config(**method_options)
  except ValueError as e:
    raise flags.ValidationError(str(e)) from None
  _check(FLAGS.local_crops >= 0, "local_crops", "must be >= 0.")
  _check(FLAGS.local_crop_size >= 0, "local_crop_size", "must be >= 0 (0: 96/224 of --image_size).")
  _check(0 < FLAGS.local_crop_min_area <= FLAGS.crop_min_area, "local_crop_min_area",
         f"must be in (0, --crop_min_area={FLAGS.crop_min_area}]: the local crops' "
         "areas end where the global ones' start.")
  try:
    method_class.check_views(FLAGS.num_views, FLAGS.local_crops)
  except ValueError as e:
    raise flags.ValidationError(str(e)) from None
  proj_head = FLAGS.proj_head
  if proj_head == "auto":
    proj_head = method_class.default_head
  progressive = parse_progressive_resolution(FLAGS.progressive_resolution,
                                             FLAGS.image_size)
  return PretrainConfig(
      run=_run_config(),
      data=DataConfig(
          dataset=FLAGS.dataset, data_dir=FLAGS.data_dir,
          train_split=FLAGS.train_split, eval_split=FLAGS.eval_split,
          image_size=FLAGS.image_size, color_strength=FLAGS.color_strength,
          simclr_version=int(FLAGS.simclr_version), blur=blur,
          crop_min_area=FLAGS.crop_min_area, num_views=FLAGS.num_views,
          cache={"auto": "auto", "on": True, "off": False}[FLAGS.cache],
          local_crops=FLAGS.local_crops,
          local_crop_size=FLAGS.local_crop_size or max(
              8, round(FLAGS.image_size * 96 / 224)),
          local_crop_min_area=FLAGS.local_crop_min_area),
      model=ModelConfig(
          backbone=FLAGS.backbone, small_image_stem=small_stem, sync_bn=FLAGS.sync_bn,
          proj_layers=FLAGS.proj_layers, proj_hidden_dim=FLAGS.proj_hidden_dim,
          proj_dim=FLAGS.proj_dim, proj_head=proj_head),
      method=FLAGS.method, method_options=method_options,
      global_batch_size=FLAGS.global_batch_size,
      train_steps=FLAGS.train_steps, train_epochs=FLAGS.train_epochs,
      warmup_epochs=FLAGS.warmup_epochs, optimizer=FLAGS.optimizer,
      learning_rate=FLAGS.learning_rate, lr_scaling=FLAGS.lr_scaling,
      weight_decay=FLAGS.weight_decay, momentum=FLAGS.momentum,
      knn_k=FLAGS.knn_k,
      knn_temperature=FLAGS.knn_temperature,
      eval_every_steps=FLAGS.eval_every_steps, eval_examples=FLAGS.eval_examples,
      final_eval_examples=FLAGS.final_eval_examples,
      baselines=FLAGS.baselines,
      export=FLAGS.export,
      progressive_resolution=progressive)


def parse_progressive_resolution(items, image_size):
  """["16:0.3", "22:0.6"] -> ((16, 0.3), (22, 0.6)), checked: sizes from 8
  up to below --image_size and fractions in (0, 1), both increasing."""
  phases = []
  for item in items:
    size, sep, fraction = item.partition(":")
    try:
      phase = (int(size), float(fraction))
    except ValueError:
      phase = None
    if not sep or phase is None:
      raise flags.ValidationError(
          f"--progressive_resolution: {item!r} is not SIZE:FRACTION (e.g. 16:0.3).")
    last_size, last_fraction = phases[-1] if phases else (7, 0.0)
    if not (last_size < phase[0] < image_size and last_fraction < phase[1] < 1):
      raise flags.ValidationError(
          f"--progressive_resolution: {item!r}: sizes must increase from 8 to below "
          f"--image_size={image_size} and fractions increase within (0, 1).")
    phases.append(phase)
  return tuple(phases)


def _method_options(method):
  """{Config field: value} of the method's flags that were given; a given
  flag of another method is an error naming the methods that read it."""
  options = {}
  fields = {methods.flag_name(method, f.name): f.name
            for f in dataclasses.fields(methods.get(method).Config)}
  for flag, owners in sorted(methods.flag_owners().items()):
    value = FLAGS[flag].value
    if value is None:
      continue
    if flag not in fields:
      raise flags.ValidationError(
          f"--{flag}={value!r} is an option of --method={' / '.join(owners)}, "
          f"and this run is --method={method}; drop it.")
    options[fields[flag]] = value
  return options


_DURATIONS = ("train_steps", "train_epochs")


def parse_command_line(argv):
  """absl's parser (app.run's flags_parser), where a duration given on the
  command line replaces a flagfile's.

  `--flagfile=configs/x.cfg --train_steps=20` is a quick try of a config
  whose file says --train_epochs: the command line's --train_steps wins and
  the file's --train_epochs is dropped (both on the command line itself is
  still an error).
  """
  from absl import app  # pylint: disable=g-import-not-at-top
  rest = app.parse_flags_with_usage(argv)
  direct = {a.lstrip("-").split("=", 1)[0] for a in argv[1:] if a.startswith("-")}
  given = [name for name in _DURATIONS if name in direct]
  if len(given) == 1:
    for name in _DURATIONS:
      if name != given[0] and FLAGS[name].present:
        FLAGS[name].unparse()
  return rest


def flags_as_text():
  """The resolved flags as a flagfile, so a run can be replayed."""
  return FLAGS.flags_into_string()


# ---------------------------------------------------------------------------
# Fine-tuning (python -m tf_ssl.finetune). Reuses the run, data, model and
# optimisation flags above; these are the ones only fine-tuning reads.
# ---------------------------------------------------------------------------
FINETUNE_MODES = ("linear", "finetune", "hyperrule")
flags.DEFINE_enum("mode", "hyperrule", list(FINETUNE_MODES),
                  "linear: frozen backbone, crop+flip; finetune: whole network (from "
                  "--finetune_after_block); hyperrule: BiT-HyperRule.")
flags.DEFINE_string("init", None, "Start from: a tf_ssl checkpoint (prefix, checkpoints/ dir or "
                    "pretraining workdir), a BiT .npz, an exported SavedModel dir, or 'none' "
                    "(random init).")
flags.DEFINE_integer("finetune_proj_layers", 0, "Keep this many leading projection-head layers "
                     "from the init (SimCLRv2 fine-tunes from the first); needs --proj_layers, "
                     "--proj_hidden_dim, --proj_dim, --proj_head of the pretraining run.")
flags.DEFINE_integer("finetune_after_block", -1, "finetune mode: -1 trains everything; k in 0..4 "
                     "freezes the stem and blocks 1..k (SimCLR's fine_tune_after_block).")
flags.DEFINE_float("label_fraction", None, "Train on this class-balanced fraction of the labels (0.01, 0.1).")
flags.DEFINE_integer("labels_per_class", None, "Train on this many labelled examples per class.")
flags.DEFINE_integer("subset_seed", 0, "Seed of the label subset: equal seeds, equal subsets.")
flags.DEFINE_integer("num_classes", 0, "Classes of the head; 0: from the dataset (checked against it otherwise).")
flags.DEFINE_bool("nesterov", False, "Nesterov momentum for --optimizer=sgd (SimCLR linear evaluation).")
flags.DEFINE_bool("zero_init_head", True, "Zero-initialise the classifier (BiT); else N(0, 0.01) as SimCLR.")
flags.DEFINE_float("hyperrule_base_lr", 0.003, "HyperRule learning rate at batch 512 (scaled linearly).")
flags.DEFINE_float("mixup_alpha", None, "MixUp alpha; default: the HyperRule's rule in hyperrule mode, else 0.")
flags.DEFINE_integer("resize_size", 0, "hyperrule: resize side before the random crop; 0: HyperRule rule.")
flags.DEFINE_integer("crop_size", 0, "hyperrule: train crop / test resize side; 0: HyperRule rule.")
flags.DEFINE_integer("eval_batch_size", 0, "Eval batch over all replicas; 0: max(--global_batch_size, 256).")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  """Everything a fine-tuning run needs; flat, with library defaults.

  `finetune_config()` fills it from the flags; a tool or notebook builds it
  directly, e.g. FinetuneConfig(mode="linear", init="runs/x/checkpoints",
  labels_per_class=10, train_steps=500), and varies it with
  dataclasses.replace. Field names equal the flag names. Invalid values raise
  ValueError naming the field as a flag (checked on construction and replace).
  """
  mode: str = "hyperrule"
  init: Optional[str] = None           # None or "none": random initialisation.
  # Data.
  dataset: str = "fashion_mnist"
  data_dir: Optional[str] = None
  train_split: str = "train"
  eval_split: str = "test"
  label_fraction: Optional[float] = None
  labels_per_class: Optional[int] = None
  subset_seed: int = 0
  num_classes: int = 0
  image_size: int = 32                 # linear / finetune view side.
  resize_size: int = 0                 # hyperrule; 0: hyperrule.get_resolution.
  crop_size: int = 0
  mixup_alpha: Optional[float] = None
  cache: object = "auto"
  # Model.
  backbone: str = "resnet18"
  small_image_stem: bool = False
  sync_bn: bool = False
  finetune_proj_layers: int = 0
  proj_layers: int = 3                 # The pretrained projection head's shape.
  proj_hidden_dim: int = 0             # 0: the backbone's feature width.
  proj_dim: int = 128
  proj_head: str = "simclr"            # The pretraining run's --proj_head.
  finetune_after_block: int = -1
  zero_init_head: bool = True
  # Optimisation (linear / finetune; hyperrule fixes its own).
  global_batch_size: int = 512
  train_steps: Optional[int] = None
  train_epochs: Optional[float] = None
  optimizer: str = "sgd"
  learning_rate: float = 0.1
  lr_scaling: str = "linear"
  momentum: float = 0.9
  nesterov: bool = False
  weight_decay: float = 0.0
  warmup_epochs: float = 0.0
  hyperrule_base_lr: float = 0.003
  eval_batch_size: int = 0
  # Run.
  workdir: Optional[str] = None        # None: no checkpoints, files or export.
  strategy: str = "default"
  tpu: Optional[str] = None
  seed: int = 0
  deterministic: bool = False
  mixed_precision: bool = False
  steps_per_execution: int = 1
  jit_compile: bool = False
  checkpoint_every_steps: int = 1000
  keep_checkpoints: int = 3
  export: bool = True

  def __post_init__(self):
    def check(condition, field, message):
      if not condition:
        raise ValueError(f"--{field}={getattr(self, field)!r}: {message}")
    check(self.mode in FINETUNE_MODES, "mode", f"pick one of {FINETUNE_MODES}.")
    check(self.optimizer in ("sgd", "lars"), "optimizer",
          "fine-tuning uses sgd (momentum, optionally --nesterov) or lars.")
    check(self.lr_scaling in ("linear", "sqrt", "none"), "lr_scaling",
          "pick linear, sqrt or none.")
    check(self.label_fraction is None or self.labels_per_class is None,
          "label_fraction", "give at most one of --label_fraction and --labels_per_class.")
    check(self.label_fraction is None or 0 < self.label_fraction <= 1,
          "label_fraction", "must be in (0, 1], e.g. 0.01 or 0.1.")
    check(self.labels_per_class is None or self.labels_per_class >= 1,
          "labels_per_class", "must be >= 1.")
    check(self.num_classes >= 0, "num_classes", "must be >= 0 (0: from the dataset).")
    check(self.global_batch_size >= 1, "global_batch_size", "must be >= 1.")
    check(self.eval_batch_size >= 0, "eval_batch_size", "must be >= 0.")
    check(self.image_size >= 8, "image_size", "must be >= 8 pixels.")
    check(self.resize_size >= 0 and self.crop_size >= 0, "crop_size",
          "--crop_size and --resize_size must be >= 0 (0: the HyperRule's).")
    check((self.resize_size == 0) == (self.crop_size == 0), "crop_size",
          f"give both --crop_size and --resize_size (--resize_size={self.resize_size}) "
          "or neither.")
    check(self.crop_size <= self.resize_size, "crop_size",
          f"must not exceed --resize_size={self.resize_size}.")
    check(self.mixup_alpha is None or self.mixup_alpha >= 0, "mixup_alpha", "must be >= 0.")
    check(self.proj_head in heads.KINDS, "proj_head", f"pick one of {heads.KINDS}.")
    check(self.finetune_proj_layers >= 0, "finetune_proj_layers", "must be >= 0.")
    check(self.finetune_proj_layers <= self.proj_layers, "finetune_proj_layers",
          f"the pretrained head has --proj_layers={self.proj_layers} layers.")
    check(-1 <= self.finetune_after_block <= 4, "finetune_after_block",
          "must be -1 (train everything) or 0..4.")
    check(self.mode == "finetune" or self.finetune_after_block == -1,
          "finetune_after_block", "only --mode=finetune freezes leading blocks.")
    check(self.train_steps is None or self.train_steps > 0, "train_steps", "must be positive.")
    check(self.train_epochs is None or self.train_epochs > 0, "train_epochs", "must be positive.")
    if self.mode == "hyperrule":
      check(self.train_epochs is None, "train_epochs",
            "--mode=hyperrule takes its length from the HyperRule schedule (or "
            "--train_steps, which rescales it); drop --train_epochs.")
      check(self.hyperrule_base_lr > 0, "hyperrule_base_lr", "must be positive.")
    else:
      check((self.train_steps is None) != (self.train_epochs is None), "train_steps",
            "give exactly one of --train_steps and --train_epochs "
            f"(got --train_epochs={self.train_epochs!r}).")
      check(self.learning_rate > 0, "learning_rate", "must be positive.")
    check(self.weight_decay >= 0, "weight_decay", "must be >= 0.")
    check(self.warmup_epochs >= 0, "warmup_epochs", "must be >= 0.")
    check(self.steps_per_execution >= 1, "steps_per_execution", "must be >= 1.")
    check(not self.train_steps or self.train_steps % self.steps_per_execution == 0,
          "train_steps", f"must be a multiple of --steps_per_execution="
          f"{self.steps_per_execution} (model.fit runs whole executions).")
    check(self.checkpoint_every_steps >= 1, "checkpoint_every_steps", "must be >= 1.")
    check(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1.")


# Shared optimisation flags that --mode=hyperrule replaces by the HyperRule
# (SGD momentum 0.9, lr 0.003 * B / 512, no weight decay, its own schedule).
_HYPERRULE_FIXED = ("optimizer", "learning_rate", "lr_scaling", "momentum",
                    "nesterov", "weight_decay", "warmup_epochs")


def finetune_config():
  """Validates the fine-tuning flags and returns a FinetuneConfig."""
  _check(FLAGS.workdir, "workdir", "give a directory for checkpoints and results.")
  if FLAGS.mode == "hyperrule":
    for name in _HYPERRULE_FIXED:
      _check(not FLAGS[name].present, name,
             "--mode=hyperrule fixes SGD momentum 0.9, lr --hyperrule_base_lr * "
             "batch / 512, no weight decay and the step schedule; drop this flag "
             "or use --mode=finetune.")
  image_size = FLAGS.image_size
  if FLAGS.mode == "hyperrule" and FLAGS.crop_size:
    image_size = FLAGS.crop_size
  small_stem = FLAGS.small_image_stem
  if small_stem is None:
    small_stem = image_size <= 32 and (FLAGS.mode != "hyperrule" or FLAGS.crop_size > 0)
  return _config_from_flags(FinetuneConfig, small_image_stem=bool(small_stem))


def _config_from_flags(config_class, **overrides):
  """config_class (FinetuneConfig or a subclass) from the flags of its
  fields, with `overrides`; a bad value is a flags.ValidationError."""
  fields = {f.name for f in dataclasses.fields(config_class)}
  values = {name: getattr(FLAGS, name) for name in fields}
  if values["proj_head"] == "auto":
    values["proj_head"] = FinetuneConfig.proj_head
  values["cache"] = {"auto": "auto", "on": True, "off": False}[FLAGS.cache]
  # The shared flags' defaults are pretraining's (LARS, lr 0.3, 10 warmup
  # epochs); fine-tuning's own defaults apply unless a flag was given.
  for name in _HYPERRULE_FIXED:
    if not FLAGS[name].present:
      values[name] = getattr(FinetuneConfig, name)
  values.update(overrides)
  try:
    return config_class(**values)
  except ValueError as e:
    raise flags.ValidationError(str(e)) from None


# ---------------------------------------------------------------------------
# Distillation (python -m tf_ssl.distill): fine-tuning's flags (the student
# is trained as --mode=finetune) plus these.
# ---------------------------------------------------------------------------
flags.DEFINE_string("teacher", None, "The teacher classifier: a tf_ssl.finetune workdir (its "
                    "saved_model/) or an exported classifier SavedModel.")
flags.DEFINE_float("distill_temperature", 1.0, "Softmax temperature of teacher and student "
                   "(SimCLRv2: 1).")
flags.DEFINE_float("distill_label_weight", 0.0, "Weight w of the labelled cross-entropy: loss = "
                   "(1 - w) * distillation + w * CE on the --labels_per_class / --label_fraction "
                   "subset (SimCLRv2's alpha is 1 - w); 0: unlabelled images only.")


@dataclasses.dataclass(frozen=True)
class DistillConfig(FinetuneConfig):
  """A distillation run: fine-tuning's fields (mode is always "finetune";
  init is the STUDENT's start) plus the teacher and the loss's options."""
  mode: str = "finetune"
  teacher: Optional[str] = None
  distill_temperature: float = 1.0
  distill_label_weight: float = 0.0

  def __post_init__(self):
    super().__post_init__()
    def check(condition, field, message):
      if not condition:
        raise ValueError(f"--{field}={getattr(self, field)!r}: {message}")
    check(self.mode == "finetune", "mode", "distillation trains the whole student "
          "(--mode=finetune); drop --mode.")
    check(self.teacher is not None and self.teacher not in ("", "none"), "teacher",
          "give the fine-tuned teacher: a tf_ssl.finetune workdir or an exported "
          "classifier SavedModel.")
    check(self.distill_temperature > 0, "distill_temperature", "must be > 0.")
    check(0 <= self.distill_label_weight <= 1, "distill_label_weight",
          "must be in [0, 1].")
    labelled = self.labels_per_class is not None or self.label_fraction is not None
    check(self.distill_label_weight == 0 or labelled, "distill_label_weight",
          "the labelled term needs --labels_per_class or --label_fraction (the "
          "labels the teacher was fine-tuned on).")
    check(self.distill_label_weight > 0 or not labelled, "labels_per_class",
          "distillation uses labels only with --distill_label_weight > 0; drop "
          "--labels_per_class / --label_fraction or give the weight.")


def distill_config():
  """Validates the distillation flags and returns a DistillConfig."""
  _check(FLAGS.workdir, "workdir", "give a directory for checkpoints and results.")
  _check(FLAGS.mode == "finetune" or not FLAGS["mode"].present, "mode",
         "distillation trains the whole student (finetune); drop --mode.")
  small_stem = FLAGS.small_image_stem
  if small_stem is None:
    small_stem = FLAGS.image_size <= 32
  return _config_from_flags(DistillConfig, mode="finetune",
                            small_image_stem=bool(small_stem))
