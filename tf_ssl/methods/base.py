"""What a self-supervised method is to the shared model and trainer.

`tf_ssl.models.ssl_model.SSLModel` owns the online backbone, the online
probe and the one `train_step`; a `Method` owns everything that differs:
the layers it adds (projector, predictor, target networks, queues), the
views it wants, its loss, what happens around each update (EMA, enqueue),
its schedules, the optimizer exclusions, and which network is the
representation. Adding a method means one module under tf_ssl/methods/ and
one line in the registry (tf_ssl/methods/__init__.py); the trainer, the
runner and the pipeline stay as they are.
"""

import dataclasses

import tensorflow as tf

from tf_ssl import distribute
from tf_ssl import optim
from tf_ssl.data import augment
from tf_ssl.models import ema


def check_option(ok, flag, value, rule):
  """Raises ValueError "--<flag>=<value>: <rule>" unless ok (Config checks)."""
  if not ok:
    raise ValueError(f"--{flag}={value!r}: {rule}")


@dataclasses.dataclass(frozen=True)
class StepOutput:
  """What `Method.forward` hands back to the train step.

  loss: float32 scalar, this replica's loss (not divided by the replica
    count; the train step does that once).
  metrics: float32 scalars without gradient, averaged over the epoch.
  features: online backbone features [n * B, F] of the n views the online
    network saw, view-major; the online probe trains on them (the batch's
    labels are tiled n times).
  state: tensors `after_update` needs (e.g. the keys to enqueue).
  """
  loss: tf.Tensor
  metrics: dict
  features: tf.Tensor
  state: dict = dataclasses.field(default_factory=dict)


class Method:
  """Base class: a two-view method without extra state.

  Subclasses set `name`, `metric_names` and override `layers` and `forward`;
  the rest has defaults that fit most methods.

  Class attributes:
    name: the --method value.
    needs_labels: the loss uses the batch's labels (SupCon).
    representation: the model attribute holding the network that
      evaluation, fine-tuning --init and export use.
    loss_name: the name the method's loss is logged under (the total,
      "loss", adds the probe's).
    metric_names: the keys of StepOutput.metrics.
    num_views: views per image the method needs; None: any number >= 2.
      With multi-crop these are the global views.
    multi_crop: the method takes local crops besides its global views (a
      batch's "views" is then {"global": [B, V, ...], "local": [B, L, ...]}).
    own_views: the method makes views of its own kind (`augment`), whatever
      --num_views says (rotation, jigsaw, PIRL); `num_views` then only
      documents them.
    batch_entries: batch entries besides "views" and "label" that `forward`
      takes as keyword arguments, e.g. ("index",): each example's record
      index, which the pipeline carries when the source can give one.
  """
  name = ""
  needs_labels = False
  representation = "backbone"
  loss_name = "contrastive_loss"
  metric_names = ()
  num_views = 2
  multi_crop = False
  own_views = False
  batch_entries = ()

  default_head = "simclr"

  @dataclasses.dataclass(frozen=True)
  class Config:
    """The method's options: the fields of its --<prefix>_* flags."""

  def __init__(self, config=None, *, head=None, total_steps=1,
               global_batch_size=None, steps_per_epoch=None, num_examples=None,
               seed=0):
    """
    Args:
      config: the method's Config (its options); None: the defaults.
      head: a HeadSpec for the projector the method builds, or a built
        projection layer to use as it is; None: HeadSpec().
      total_steps: the run's length (the schedules end there).
      global_batch_size: images per step over all replicas (a queue must
        hold whole batches).
      steps_per_epoch: steps in one pass over the training data, for
        options counted in epochs; None: total_steps.
      num_examples: examples in the training data (a memory bank holds one
        row per example); None: not known.
      seed: the run's seed, for draws the method makes inside the step
        (`hashed_ints`).
    """
    self.config = self.Config() if config is None else config
    self.head = HeadSpec() if head is None else head
    self.total_steps = int(total_steps)
    self.global_batch_size = global_batch_size
    self.steps_per_epoch = int(steps_per_epoch or total_steps)
    self.num_examples = None if num_examples is None else int(num_examples)
    self.seed = int(seed)

  def epoch(self, step):
    """The epoch (0, 1, ...) that `step` is in, as an int32 tensor."""
    return tf.cast(step, tf.int32) // max(self.steps_per_epoch, 1)

  def projector(self, name="projection_head", **overrides):
    """The projection head: `head` itself when it is a built layer."""
    if not isinstance(self.head, HeadSpec):
      if overrides or name != "projection_head":
        raise ValueError(f"--method={self.name}: pass a HeadSpec, not a layer, "
                         "to build more than one head.")
      return self.head
    return self.head.build(self.default_head, name=name, **overrides)

  def predictor(self, feature_dim, hidden_dim=0, last_bn=True):
    """A 2-layer predictor of the method's own kind, projection width in and
    out; hidden_dim 0: the projector's hidden width (BYOL, MoCo v3)."""
    spec = self.head if isinstance(self.head, HeadSpec) else HeadSpec()
    hidden = hidden_dim or spec.hidden_dim or feature_dim
    return spec.build(self.default_head, name="predictor", last_bn=last_bn,
                      hidden_dim=hidden, num_layers=2, kind=self.default_head)

  # ---------------------------------------------------------------- building
  def layers(self, backbone, make_backbone):
    """{attribute name: Keras layer} the method adds to the model.

    Args:
      backbone: the online backbone (built; `feature_dim` known).
      make_backbone: zero-argument function building another backbone of
        the same architecture (for a target network), or None.
    """
    raise NotImplementedError

  def targets(self, model):
    """[(online layer, target layer)] pairs moved by EMA; [] for none."""
    del model
    return []

  def build_extra(self, model, images):
    """Builds the layers that `endpoints` does not call (e.g. targets) by
    calling them on `images`, once, when the model is first called."""

  def endpoints(self, model, features, training):
    """Head endpoints of the online network for `features`: the projection
    head's, and "prediction" when the model has a predictor."""
    out = dict(model.projection_head(features, training=training))
    if hasattr(model, "predictor"):
      out["prediction"] = model.predictor(out["projection"],
                                          training=training)["projection"]
    return out

  def project(self, model, images):
    """(features, projection) of the online backbone and projection head
    in training mode."""
    features = model.backbone(images, training=True)["features"]
    return features, model.projection_head(features, training=True)["projection"]

  def online(self, model, images):
    """(features, the predictor's output) of the online network in training
    mode: BYOL's and MoCo v3's query path."""
    features, z = self.project(model, images)
    return features, model.predictor(z, training=True)["projection"]

  # ------------------------------------------------------------------- views
  def augment(self, data):
    """The pretraining views for a tf_ssl.flags.DataConfig."""
    return augment.SimCLRAugment(
        data.image_size, color_strength=data.color_strength,
        version=data.simclr_version, blur=data.blur,
        crop_area=(data.crop_min_area, 1.0), num_views=data.num_views)

  def multi_crop_augment(self, data, global_views):
    """`global_views` (a SimCLRAugment), plus --local_crops local crops of
    --local_crop_size pixels with areas from --local_crop_min_area to
    --crop_min_area when there are any (each crop's blur p=0.5, the
    references' for local crops of both SwAV and DINO)."""
    if not data.local_crops:
      return global_views
    local = augment.SimCLRAugment(
        data.local_crop_size, color_strength=global_views.color_strength,
        version=global_views.version, blur=data.blur,
        crop_area=(data.local_crop_min_area, data.crop_min_area),
        num_views=data.local_crops,
        jitter=global_views.jitter)
    return augment.MultiCropAugment({GLOBAL: global_views, LOCAL: local})

  @classmethod
  def check_views(cls, num_views, local_crops=0):
    """Raises ValueError when the method cannot take `num_views` (global)
    views and `local_crops` local crops."""
    if local_crops and not cls.multi_crop:
      raise ValueError(f"--method={cls.name} takes no local crops; got "
                       f"--local_crops={local_crops} (swav and dino do).")
    if cls.own_views:
      if num_views != DEFAULT_NUM_VIEWS:
        raise ValueError(f"--method={cls.name} makes views of its own "
                         f"(docs/recipes.md); drop --num_views={num_views}.")
      return
    if cls.num_views is not None and num_views != cls.num_views:
      raise ValueError(f"--method={cls.name} takes {cls.num_views} views "
                       f"per image; got --num_views={num_views}.")
    if num_views < 2:
      raise ValueError(f"--method={cls.name} needs >= 2 views per image.")

  # -------------------------------------------------------------- training
  def before_step(self, model, step):
    """Runs at the start of each train step, before the forward pass."""

  def forward(self, model, views, labels, **entries):
    """The loss of one batch: views [B, V, H, W, C], labels [B] or None,
    and the batch's `batch_entries` by name (e.g. index [B]).

    Runs under the train step's GradientTape; returns a StepOutput.
    """
    raise NotImplementedError

  def after_update(self, model, state, step):
    """Runs after the optimizer's update of step `step` (e.g. enqueue)."""

  def schedules(self):
    """{name: fn(step) -> float} logged to TensorBoard beside the
    learning rate (e.g. the EMA momentum)."""
    return {}

  def learning_rate_multipliers(self):
    """((regex, factor), ...): variables whose path matches take factor *
    the learning rate under LARS (Barlow Twins' rate for biases and BN)."""
    return ()

  def optimizer_exclusions(self):
    """Regexes of variable paths LARS leaves out of weight decay and
    trust-ratio adaptation."""
    return optim.DEFAULT_EXCLUDE


def asymmetric_views(data, version=2):
  """BYOL's asymmetric pair of views (blur 1.0 / 0.1, solarise 0 / 0.2) for
  a tf_ssl.flags.DataConfig; version 2 multiplies brightness as
  torchvision's ColorJitter (MoCo v3, Barlow Twins, VICReg, DINO), 1 adds
  a delta as BYOL's repository."""
  return augment.SimCLRAugment.asymmetric(
      data.image_size, color_strength=data.color_strength, blur=data.blur,
      crop_area=(data.crop_min_area, 1.0), version=version)


GLOBAL, LOCAL = "global", "local"
# --num_views' default: what methods with `own_views` accept (it is unused).
DEFAULT_NUM_VIEWS = 2


def global_rows(b):
  """int32 [b]: the global batch rows of this replica's b rows (replica r
  holds rows [r * b, (r + 1) * b), as the input pipeline splits a batch)."""
  return tf.range(b) + distribute.replica_id() * b


def _mix(x):
  """A bijective avalanche of uint32 values (the "lowbias32" integer hash of
  C. Wellons' hash-prospector)."""
  shift = lambda v, n: tf.bitwise.right_shift(v, tf.constant(n, tf.uint32))
  x = tf.bitwise.bitwise_xor(x, shift(x, 16)) * tf.constant(0x7feb352d, tf.uint32)
  x = tf.bitwise.bitwise_xor(x, shift(x, 15)) * tf.constant(0x846ca68b, tf.uint32)
  return tf.bitwise.bitwise_xor(x, shift(x, 16))


def hashed_ints(key, rows, n, maxval):
  """int64 [len(rows), n], each uniform in [0, maxval): a counter-based hash
  of (key..., row, j) for j < n.

  The draws a method makes inside the train step (a permutation, negatives)
  depend only on the key (the seed, the step, what they are for) and the
  GLOBAL row, never on which replica holds the row, so a batch draws the same
  values on 1 and on N replicas. Each value is the top of a 32-bit hash
  scaled to [0, maxval) (multiply-shift; the bias is below maxval / 2^32).

  Args:
    key: integers or integer tensors (e.g. (seed, step, 1)).
    rows: int [b] global rows (`global_rows`).
    n: values per row (a Python int).
    maxval: a Python int in [1, 2^31].
  """
  if not 1 <= maxval <= 2**31:
    raise ValueError(f"hashed_ints: maxval={maxval} must be in [1, 2^31].")
  h = tf.constant(0x9e3779b9, tf.uint32)
  for k in key:
    k = tf.cast(tf.convert_to_tensor(k), tf.int64) % 2**32
    h = _mix(tf.bitwise.bitwise_xor(h, tf.cast(k, tf.uint32)))
  rows = tf.cast(tf.cast(rows, tf.int64) % 2**32, tf.uint32)
  h = _mix(tf.bitwise.bitwise_xor(h, rows))[:, None]
  j = _mix(tf.cast(tf.range(n, dtype=tf.int64) + 0x632be5ab, tf.uint32))
  h = _mix(tf.bitwise.bitwise_xor(h, j[None]))
  return tf.bitwise.right_shift(tf.cast(h, tf.int64) * maxval, 32)


def crop_counts(views):
  """(images per replica b, global views, all views) of a batch's views."""
  groups = view_groups(views)
  return (tf.shape(groups[0][1])[0], groups[0][1].shape[1],
          sum(v.shape[1] for _, v in groups))


def check_whole_batches(flag, size, global_batch_size):
  """A queue enqueues whole global batches: ValueError unless `size` is a
  multiple of the batch (None: not known yet)."""
  b = global_batch_size
  if b and size % b:
    raise ValueError(
        f"--{flag}={size} must be a multiple of --global_batch_size={b} "
        f"(each step enqueues a whole batch), e.g. {max(b, size // b * b)}.")


# Optimizer exclusions of the methods whose reference decays and adapts every
# parameter, BN and biases included: only the online probe is left out.
PROBE_ONLY = (r"(^|/)(head|probe_head|linear_head)/",)


def view_groups(views):
  """A batch's views as [(group name, [B, V, H, W, C])], "global" first:
  a tensor is one global group; multi-crop batches are a dict of groups."""
  if not isinstance(views, dict):
    return [(GLOBAL, views)]
  if GLOBAL not in views:
    raise ValueError(f"multi-crop views need a {GLOBAL!r} group; got {sorted(views)}.")
  return [(GLOBAL, views[GLOBAL])] + sorted(
      (k, v) for k, v in views.items() if k != GLOBAL)


def group_features(backbone, views):
  """Online features of every view of every group, view-major, global
  first [(V + L) * B, F]: the backbone runs once per group (one static
  shape each), in training mode."""
  return tf.concat([backbone(views_major(v), training=True)["features"]
                    for _, v in view_groups(views)], axis=0)


def views_major(views):
  """[B, V, H, W, C] -> [V*B, H, W, C], all first views, then all second ..."""
  shape = tf.shape(views)
  views = tf.transpose(views, [1, 0, 2, 3, 4])
  return tf.reshape(views, tf.concat([[-1], shape[2:]], axis=0))


class WithTarget(Method):
  """A method with a target network: copies of the backbone and projector
  ("target_backbone", "target_projection_head") moved towards the online
  ones by EMA.

  The average runs at the start of every step, before the forward pass:
  target <- m * target + (1 - m) * online with m = 0 at step 0 (the target
  starts as a copy of the online network, whatever initialised it) and
  `momentum(step)` after. Averaging at the start of step k with the weights
  after update k - 1 is BYOL's average after update k - 1; MoCo's order.
  Subclasses build "projection_head" in `online_layers`, have a
  `momentum` option in their Config and set `cosine` (the cosine schedule
  from it to 1, or constant).
  """
  cosine = True

  @property
  def base_momentum(self):
    return self.config.momentum

  def online_layers(self, backbone):
    """{name: layer} of the online heads; must hold "projection_head"."""
    raise NotImplementedError

  def layers(self, backbone, make_backbone):
    if make_backbone is None:
      raise ValueError(f"--method={self.name} keeps a target copy of the "
                       "backbone: build the model with make_backbone.")
    out = self.online_layers(backbone)
    out["target_backbone"] = make_backbone()
    out["target_projection_head"] = self.projector("target_projection_head")
    return out

  def targets(self, model):
    return [(model.backbone, model.target_backbone),
            (model.projection_head, model.target_projection_head)]

  def target_projection(self, model, images):
    """The target's projection of `images`, training mode, no gradient."""
    features = model.target_backbone(images, training=True)["features"]
    out = model.target_projection_head(features, training=True)["projection"]
    return tf.stop_gradient(out)

  def build_extra(self, model, images):
    features = model.target_backbone(images, training=False)["features"]
    model.target_projection_head(features, training=False)
    ema.freeze([model.target_backbone, model.target_projection_head])

  def momentum(self, step):
    """The EMA momentum at `step` (float32 tensor)."""
    if self.cosine:
      return ema.cosine_momentum(step, self.total_steps, self.base_momentum)
    return tf.constant(self.base_momentum, tf.float32)

  def before_step(self, model, step):
    m = tf.where(tf.equal(step, 0), 0.0, self.momentum(step))
    online, target = [], []
    for o_layer, t_layer in self.targets(model):
      o, t = ema.paired_variables([o_layer], [t_layer])
      online += o
      target += t
    ema.update(online, target, m)

  def schedules(self):
    return {f"{self.name}_momentum": lambda step: float(self.momentum(step))}


@dataclasses.dataclass(frozen=True)
class HeadSpec:
  """The shape of a method's projector (the --proj_* flags).

  kind None means the method's own (`Method.default_head`); hidden_dim None
  the input width.
  """
  hidden_dim: int = None
  output_dim: int = 128
  num_layers: int = 2
  kind: str = None
  sync_bn: bool = False

  def build(self, default_kind, name="projection_head", last_bn=True,
            **overrides):
    """A ProjectionHead of this shape (fields replaced by `overrides`)."""
    from tf_ssl.models.heads import ProjectionHead  # pylint: disable=g-import-not-at-top
    spec = dataclasses.replace(self, **overrides)
    return ProjectionHead(hidden_dim=spec.hidden_dim, output_dim=spec.output_dim,
                          num_layers=spec.num_layers,
                          kind=spec.kind or default_kind, sync_bn=spec.sync_bn,
                          last_bn=last_bn, name=name)
