"""Every input pipeline is graph-only: no op calls back into Python, so it
can run where there is no Python client (tf.data service, the hosts of a
multi-host slice)."""

import numpy as np
import pytest
import tensorflow as tf

from tf_ssl.data import augment, from_arrays, make_source, pipeline, subsets

PYTHON_OPS = {"PyFunc", "PyFuncStateless", "EagerPyFunc"}


def graph_ops(ds):
  """Every op in the serialized graph of `ds`, functions included (the
  pipeline's map/scan/filter bodies live there)."""
  graph = tf.compat.v1.GraphDef()
  graph.ParseFromString(ds._as_serialized_graph().numpy())  # pylint: disable=protected-access
  ops = {n.op for n in graph.node}
  for f in graph.library.function:
    ops |= {n.op for n in f.node_def}
  assert "ParallelMapDatasetV2" in ops  # walked something
  return ops


def python_ops(ds):
  return sorted(graph_ops(ds) & PYTHON_OPS)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("graph_images")
  rng = np.random.default_rng(0)
  for i in range(4):
    (root / f"c{i % 2}").mkdir(exist_ok=True)
    (root / f"c{i % 2}" / f"{i}.png").write_bytes(
        tf.io.encode_png(rng.integers(0, 256, (8, 8, 3), np.uint8)).numpy())
  return make_source(f"folder:{root}")


def _arrays():
  return from_arrays(np.zeros([8, 8, 8, 3], np.uint8), np.arange(8) % 2)


CTX = tf.distribute.InputContext(2, 1, 2)


@pytest.mark.parametrize("ctx", [None, CTX], ids=["1pipeline", "2pipelines"])
@pytest.mark.parametrize("seed", [0, None], ids=["seeded", "unseeded"])
def test_pretrain_graphs(folder, ctx, seed):
  aug = augment.SimCLRAugment(8)
  assert python_ops(pipeline.build_pretrain(folder, 2, aug, ctx, seed)) == []
  assert python_ops(pipeline.build_pretrain(_arrays(), 2, aug, ctx, seed)) == []
  per_example = augment.SimCLRAugment(8, batch_level=False)
  assert python_ops(pipeline.build_pretrain(folder, 2, per_example, ctx, seed)) == []


def test_finetune_and_eval_graphs(folder):
  bit = augment.BiTAugment(8, 10)
  for src in (folder, _arrays()):
    assert python_ops(pipeline.build_finetune(src, 2, bit, CTX, 0, mixup_alpha=0.2)) == []
    assert python_ops(pipeline.build_eval(src, 2, 8, CTX)) == []
    assert python_ops(pipeline.build_eval(src, 2, 8, view_fn=bit.eval)) == []
  subset = subsets.IndexedSubset(folder, [1, 3])
  assert python_ops(pipeline.build_finetune(subset, 2, bit, CTX, 0)) == []


def test_skips_reported_by_a_graph_op(folder):
  ds = pipeline.build_pretrain(folder, 2, augment.SimCLRAugment(8), seed=0)
  assert "PrintV2" in graph_ops(ds)


def test_tfds_graphs(tmp_path):
  from test_data_sources import TinyImages  # pylint: disable=g-import-not-at-top
  TinyImages(data_dir=str(tmp_path)).download_and_prepare()
  src = make_source("tfds:tiny_images", "train", data_dir=str(tmp_path))
  for ctx in (None, CTX):
    assert python_ops(pipeline.build_pretrain(
        src, 2, augment.SimCLRAugment(8), ctx, 0, cache=False)) == []
    assert python_ops(pipeline.build_eval(src, 2, 8, ctx, cache=False)) == []
