"""Splits the CPU into 4 logical devices before TensorFlow initialises, so
MirroredStrategy over 1, 2 and 4 replicas can be tested without accelerators."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest
import tensorflow as tf

NUM_LOGICAL_CPUS = 4

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration()] * NUM_LOGICAL_CPUS)
CPU_DEVICES = [d.name for d in tf.config.list_logical_devices("CPU")]


def mirrored(n):
  """A MirroredStrategy over the first n logical CPUs."""
  return tf.distribute.MirroredStrategy(
      CPU_DEVICES[:n], cross_device_ops=tf.distribute.ReductionToOneDevice())


@pytest.fixture
def strategy_1():
  return mirrored(1)


@pytest.fixture
def strategy_2():
  return mirrored(2)


@pytest.fixture
def strategy_4():
  return mirrored(4)


@pytest.fixture(params=[1, 2, 4], ids=lambda n: f"{n}replica")
def strategy(request):
  """Each test using it runs on 1, 2 and 4 replicas."""
  return mirrored(request.param)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
  """32 16-px PNGs in two class folders, each class with one saturated
  channel as its signal: the trainer's end-to-end tests read it."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  for label in range(2):
    os.makedirs(root / f"class{label}")
    for i in range(16):
      pixels = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
      pixels[..., label] = 255
      Image.fromarray(pixels).save(root / f"class{label}" / f"{i}.png")
  return str(root)
