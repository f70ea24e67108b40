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
