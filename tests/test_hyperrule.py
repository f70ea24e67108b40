"""BiT-HyperRule by table: every number below is written from docs/recipes.md
("BiT-HyperRule"), not computed from tf_ssl.hyperrule."""

import numpy as np
import pytest

from tf_ssl import hyperrule

SMALL = [100, 200, 300, 400, 500]
MEDIUM = [500, 3000, 6000, 9000, 10000]
LARGE = [500, 6000, 12000, 18000, 20000]


@pytest.mark.parametrize("size,schedule", [
    (1, SMALL), (500, SMALL), (19_999, SMALL),
    (20_000, MEDIUM), (50_000, MEDIUM), (499_999, MEDIUM),
    (500_000, LARGE), (1_281_167, LARGE), (14_000_000, LARGE),
])
def test_schedule_table(size, schedule):
  assert hyperrule.get_schedule(size) == schedule


@pytest.mark.parametrize("size,alpha", [
    (1, 0.0), (19_999, 0.0), (20_000, 0.1), (499_999, 0.1), (500_000, 0.1),
    (1_281_167, 0.1)])
def test_mixup_table(size, alpha):
  assert hyperrule.get_mixup(size) == alpha


@pytest.mark.parametrize("hw,sizes", [
    ((28, 28), (160, 128)), ((32, 32), (160, 128)), ((95, 96), (160, 128)),
    ((96, 95), (160, 128)), ((1, 9215), (160, 128)),
    ((96, 96), (512, 480)), ((1, 9216), (512, 480)), ((224, 224), (512, 480)),
    ((375, 500), (512, 480))])
def test_resolution_table(hw, sizes):
  assert tuple(hyperrule.get_resolution(hw)) == sizes


def test_few_shot_dataset_size():
  # CIFAR-10 5-shot = 50 examples (small schedule, no MixUp); ImageNet
  # 25-shot = 25000 (medium schedule, MixUp).
  assert hyperrule.dataset_size(examples_per_class=5, num_classes=10) == 50
  assert hyperrule.dataset_size(examples_per_class=25, num_classes=1000) == 25000
  assert hyperrule.dataset_size(num_examples=50_000) == 50_000
  with pytest.raises(ValueError, match="either num_examples"):
    hyperrule.dataset_size(num_examples=10, examples_per_class=1, num_classes=2)
  with pytest.raises(ValueError, match="both"):
    hyperrule.dataset_size(examples_per_class=5)
  with pytest.raises(ValueError, match="empty"):
    hyperrule.dataset_size(examples_per_class=0, num_classes=10)


def test_scale_lr():
  assert hyperrule.scale_lr(512) == pytest.approx(0.003)
  assert hyperrule.scale_lr(128) == pytest.approx(0.00075)
  assert hyperrule.scale_lr(1024) == pytest.approx(0.006)
  assert hyperrule.scale_lr(64, base_lr=0.01, base_batch_size=256) == \
      pytest.approx(0.0025)
  with pytest.raises(ValueError, match="positive"):
    hyperrule.scale_lr(0)


# lr at the boundaries, for base_lr 0.003 (docs/recipes.md: linear warmup, /10 at
# each boundary; the released get_lr decays strictly after the boundary step
# and ends (None) at the total).
@pytest.mark.parametrize("size,table", [
    (50, [(0, 0.0), (1, 0.003 / 100), (50, 0.0015), (99, 0.003 * 99 / 100),
          (100, 0.003), (200, 0.003), (201, 0.0003), (300, 0.0003),
          (301, 0.00003), (400, 0.00003), (401, 0.000003), (499, 0.000003),
          (500, None), (10_000, None)]),
    (50_000, [(0, 0.0), (250, 0.0015), (499, 0.003 * 499 / 500),
              (500, 0.003), (3000, 0.003), (3001, 0.0003), (6000, 0.0003),
              (6001, 0.00003), (9000, 0.00003), (9001, 0.000003),
              (9999, 0.000003), (10000, None)]),
    (1_281_167, [(0, 0.0), (250, 0.0015), (500, 0.003), (6000, 0.003),
                 (6001, 0.0003), (12000, 0.0003), (12001, 0.00003),
                 (18000, 0.00003), (18001, 0.000003), (19999, 0.000003),
                 (20000, None)]),
])
def test_lr_at_boundaries(size, table):
  for step, lr in table:
    got = hyperrule.get_lr(step, size, 0.003)
    if lr is None:
      assert got is None, step
    else:
      assert got == pytest.approx(lr, rel=1e-12, abs=1e-15), step


def test_warmup_is_linear_and_decays_are_tenfold():
  size = 30_000
  lrs = [hyperrule.get_lr(s, size, 0.01) for s in range(10_000)]
  np.testing.assert_allclose(lrs[:500], 0.01 * np.arange(500) / 500)
  plateaus = [lrs[500], lrs[3001], lrs[6001], lrs[9001]]
  np.testing.assert_allclose(np.array(plateaus[:-1]) / plateaus[1:], 10.0)
  # Piecewise constant after warmup: exactly 4 distinct values.
  assert len(set(np.round(lrs[500:], 12))) == 4
  with pytest.raises(ValueError, match="negative"):
    hyperrule.get_lr(-1, size)


def test_default_base_lr_is_0003():
  assert hyperrule.get_lr(100, 100) == pytest.approx(0.003)
  assert hyperrule.MOMENTUM == 0.9


@pytest.mark.parametrize("size", [100, 50_000, 1_000_000])
def test_keras_schedule_equals_get_lr(size):
  schedule = hyperrule.get_schedule(size)
  keras_schedule = hyperrule.HyperRuleSchedule(0.003, schedule)
  steps = np.arange(schedule[-1])
  got = keras_schedule(steps).numpy()
  want = [hyperrule.get_lr(int(s), size, 0.003) for s in steps]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)
  # After the end it holds the last rate rather than failing.
  assert float(keras_schedule(schedule[-1] + 5)) == pytest.approx(3e-6, rel=1e-5)
  restored = hyperrule.HyperRuleSchedule.from_config(keras_schedule.get_config())
  assert restored.schedule == schedule and restored.base_lr == 0.003
  with pytest.raises(ValueError, match="increasing"):
    hyperrule.HyperRuleSchedule(0.003, [1, 2, 3])
