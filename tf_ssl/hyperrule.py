"""BiT-HyperRule: the fine-tuning hyper-parameters of Big Transfer as tables.

Kolesnikov et al. 2020, "Big Transfer (BiT): General Visual Representation
Learning", section 3.3, with the numbers of the released code (docs/recipes.md
"BiT-HyperRule"). Everything is a pure function of the image size or of the
number of training examples, so a trainer, a tool and a notebook all get the
same answer:

  * SGD with momentum 0.9, no weight decay, zero-initialised head;
  * base learning rate 0.003 at batch 512, scaled linearly with the batch;
  * images below 96x96 pixels of area: resize 160, random crop 128; larger:
    resize 512, crop 480 (the paper's text says 448/384, the released code
    uses 512/480); at test time resize to the crop size;
  * step schedule [warmup, decay1, decay2, decay3, total] by dataset size,
    linear warmup, learning rate divided by 10 at each decay boundary;
  * MixUp alpha 0.1 from 20k examples on, none below;
  * few-shot: the dataset size is examples per class x classes.
"""

import bisect

import keras
import tensorflow as tf

BASE_LR = 0.003        # At BASE_BATCH_SIZE (docs/recipes.md).
BASE_BATCH_SIZE = 512
MOMENTUM = 0.9
MIXUP_ALPHA = 0.1

# (dataset sizes below this, schedule) in increasing order; the last row
# covers everything larger. Schedules are [warmup, d1, d2, d3, total] steps.
SMALL, MEDIUM = 20_000, 500_000
SCHEDULES = (
    (SMALL, (100, 200, 300, 400, 500)),
    (MEDIUM, (500, 3000, 6000, 9000, 10000)),
    (None, (500, 6000, 12000, 18000, 20000)),
)
# Below this many pixels of area the small resolution is used.
SMALL_AREA = 96 * 96
SMALL_RESOLUTION = (160, 128)   # (resize, crop)
LARGE_RESOLUTION = (512, 480)


def dataset_size(num_examples=None, examples_per_class=None, num_classes=None):
  """The dataset size the HyperRule tables are indexed by.

  Args:
    num_examples: the number of training examples of a full (or fractional)
      training set. Give either this or both of the next two.
    examples_per_class: few-shot examples per class.
    num_classes: number of classes (with examples_per_class).

  Returns:
    An int: num_examples, or examples_per_class * num_classes (BiT few-shot).
  """
  few_shot = examples_per_class is not None or num_classes is not None
  if few_shot and num_examples is None and (examples_per_class is None or
                                            num_classes is None):
    raise ValueError("hyperrule.dataset_size: few-shot needs both "
                     "examples_per_class and num_classes.")
  if (num_examples is not None) == few_shot:
    raise ValueError(
        "hyperrule.dataset_size: give either num_examples or both "
        "examples_per_class and num_classes (few-shot), not "
        f"num_examples={num_examples}, examples_per_class={examples_per_class},"
        f" num_classes={num_classes}.")
  if few_shot:
    size = int(examples_per_class) * int(num_classes)
  else:
    size = int(num_examples)
  if size <= 0:
    raise ValueError(f"hyperrule.dataset_size: {size} examples; the training "
                     "set is empty.")
  return size


def get_resolution(original_resolution):
  """(resize, crop) for images of original_resolution = (height, width).

  Train: resize to `resize` and random-crop `crop`; test: resize to `crop`.
  """
  h, w = original_resolution
  if h * w < SMALL_AREA:
    return SMALL_RESOLUTION
  return LARGE_RESOLUTION


def get_schedule(dataset_size):  # pylint: disable=redefined-outer-name
  """[warmup, decay1, decay2, decay3, total] steps for a dataset size."""
  if dataset_size <= 0:
    raise ValueError(f"hyperrule.get_schedule: dataset size {dataset_size}; "
                     "it must be positive.")
  for limit, schedule in SCHEDULES:
    if limit is None or dataset_size < limit:
      return list(schedule)
  raise AssertionError("unreachable: the last SCHEDULES row has no limit")


def get_mixup(dataset_size):  # pylint: disable=redefined-outer-name
  """MixUp alpha: 0.0 (no MixUp) below 20k examples, else 0.1."""
  return 0.0 if dataset_size < SMALL else MIXUP_ALPHA


def scale_lr(global_batch_size, base_lr=BASE_LR, base_batch_size=BASE_BATCH_SIZE):
  """The HyperRule base learning rate at another batch: linear scaling.

  0.003 at 512 gives 0.00075 at 128 (the published small-batch variant, run
  with the unchanged step schedule, uses 0.001).
  """
  if global_batch_size <= 0:
    raise ValueError(f"hyperrule.scale_lr: batch size {global_batch_size}; it "
                     "must be positive.")
  return base_lr * global_batch_size / base_batch_size


def get_lr(step, dataset_size, base_lr=BASE_LR):  # pylint: disable=redefined-outer-name
  """Learning rate of update `step` (0-based), or None once training is over.

  As the released bit_hyperrule.get_lr: base_lr * step / warmup during warmup
  (so update 0 has lr 0), then base_lr divided by 10 for every decay boundary
  strictly below `step` (the update at step == d1 still uses the undecayed
  rate, the one at d1 + 1 the first decayed one), and None from `total` on.
  """
  schedule = get_schedule(dataset_size)
  warmup, total = schedule[0], schedule[-1]
  if step < 0:
    raise ValueError(f"hyperrule.get_lr: step {step} is negative.")
  if step >= total:
    return None
  if step < warmup:
    return base_lr * step / warmup
  return base_lr * 0.1 ** bisect.bisect_left(schedule[1:4], step)


@keras.saving.register_keras_serializable(package="tf_ssl")
class HyperRuleSchedule(keras.optimizers.schedules.LearningRateSchedule):
  """`get_lr` as a Keras learning-rate schedule (TF ops, for optimizers).

  Beyond the last step it keeps the last rate (base_lr / 1000) instead of
  returning None, so an optimizer never sees a missing value.

  Args:
    base_lr: the (batch-scaled) base learning rate.
    schedule: [warmup, d1, d2, d3, total], e.g. from `get_schedule`.
  """

  def __init__(self, base_lr, schedule):
    super().__init__()
    if len(schedule) != 5 or list(schedule) != sorted(schedule):
      raise ValueError("HyperRuleSchedule: schedule must be 5 increasing step "
                       f"counts [warmup, d1, d2, d3, total], not {schedule}.")
    self.base_lr = float(base_lr)
    self.schedule = [int(s) for s in schedule]

  def __call__(self, step):
    step = tf.cast(step, tf.float32)
    warmup = float(self.schedule[0])
    decays = tf.constant(self.schedule[1:4], tf.float32)
    # step may be a vector (for plots and tests): compare on a new last axis.
    n_decays = tf.reduce_sum(tf.cast(decays < step[..., None], tf.float32), -1)
    warm = self.base_lr * step / warmup if warmup > 0 else self.base_lr
    decayed = self.base_lr * tf.pow(0.1, n_decays)
    return tf.where(step < warmup, warm, decayed)

  def get_config(self):
    return {"base_lr": self.base_lr, "schedule": self.schedule}
