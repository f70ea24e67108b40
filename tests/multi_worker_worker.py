"""One worker of tests/test_multi_worker.py, and the model and data both share.

Run as `python multi_worker_worker.py OUT.json --initial_weights=W.npz` with
TF_CONFIG set: it joins a MultiWorkerMirroredStrategy cluster through
tf_ssl.distribute.get_strategy("multi_worker"), trains a few steps of
ContrastiveModel.fit on its shard of each fixed global batch, and writes the
per-step losses and how far each weight moved to OUT.json. With --linger it then
keeps training until it is killed or a peer fails, so the test can kill a
worker in the middle of training. Each worker is a fresh interpreter, so the
4-device CPU split of conftest.py does not apply: one replica per worker.
"""

import argparse
import json
import sys
import time

import keras
import numpy as np
import tensorflow as tf

from tf_ssl import distribute
from tf_ssl import optim
from tf_ssl.models import build_backbone
from tf_ssl.models.contrastive import ContrastiveModel
from tf_ssl.models.heads import ProjectionHead

GLOBAL_BATCH = 8
IMAGE = 16
NUM_CLASSES = 3
STEPS = 3


def global_batches(steps=STEPS):
  """`steps` fixed global batches: two views per image, labels with some -1."""
  rng = np.random.default_rng(0)
  n = steps * GLOBAL_BATCH
  views = rng.uniform(size=(n, 2, IMAGE, IMAGE, 3)).astype("float32")
  labels = rng.integers(-1, NUM_CLASSES, size=n).astype("int64")
  return {"views": views, "label": labels}


def dataset_fn(data, ctx, repeat=False):
  """Pipeline i of n reads slice i of every global batch.

  Global batch s is rows [s*G, (s+1)*G). Batching by the per-replica size b
  and keeping every n-th batch gives pipeline i rows [s*G + i*b, s*G +
  (i+1)*b); replica i is worker i, so the replicas together hold the
  single-process batch in the same row order (cross_replica_concat keeps it).
  """
  per_replica = ctx.get_per_replica_batch_size(GLOBAL_BATCH)
  ds = tf.data.Dataset.from_tensor_slices(data)
  if repeat:
    ds = ds.repeat()
  ds = ds.batch(per_replica, drop_remainder=True)
  return ds.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)


def build_model():
  """The SimCLR model at toy size, compiled with LARS as the trainer does.

  The BN ResNet and head use synchronized BN, as SimCLR pretrains: the batch
  statistics are the global batch's only if the cross-worker reduction works.
  The learning rate is small enough that training is not chaotic: at 0.1 a
  1e-7 change of the weights grows about tenfold per step (3e-5 in the loss
  after 4 steps, up to 1e-3 for some initial weights), which would hide
  what is compared here; at 0.02 it stays below 1e-6.
  """
  backbone = build_backbone("resnet18", small_image_stem=True, sync_bn=True)
  head = ProjectionHead(hidden_dim=32, output_dim=16, num_layers=2,
                        sync_bn=True)
  model = ContrastiveModel(backbone, head, num_classes=NUM_CLASSES,
                           method="simclr", temperature=0.2)
  model(tf.zeros((1, IMAGE, IMAGE, 3)))
  model.compile(optimizer=optim.LARS(0.02, momentum=0.9, weight_decay=1e-4))
  return model


def checksum(weights):
  return float(sum(np.sum(np.abs(w.astype(np.float64))) for w in weights))


def update_norms(initial, final):
  """The norm of each weight's change: trained and BN moving statistics."""
  return [float(np.linalg.norm(b.astype(np.float64) - a)) for a, b in zip(initial, final)]


class Progress(keras.callbacks.Callback):
  """Prints "<label> step <k> done" after each step, for the test to wait on."""

  def __init__(self, label):
    super().__init__()
    self.label = label
    self.steps = 0

  def on_train_batch_end(self, batch, logs=None):
    self.steps += 1
    print(f"{self.label} step {self.steps} done at {time.time():.3f} "
          f"(cpu {time.process_time():.1f} s)", flush=True)


def train(model, strategy, data, steps=STEPS):
  """`steps` fit steps, one per epoch; returns each step's metrics.

  One step per epoch because Keras resets the metrics at each epoch, so the
  history holds every step's own loss rather than a running mean.
  """
  batches = strategy.distribute_datasets_from_function(
      lambda ctx: dataset_fn(data, ctx))
  history = model.fit(batches, steps_per_epoch=1, epochs=steps, verbose=0,
                      callbacks=[Progress("train")])
  return {k: [float(x) for x in v] for k, v in history.history.items()}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("out")
  parser.add_argument("--initial_weights", required=True,
                      help=".npz of model.get_weights() (keys 0, 1, ...)")
  parser.add_argument("--linger", action="store_true",
                      help="keep training after writing OUT until killed")
  args = parser.parse_args()

  strategy = distribute.get_strategy("multi_worker")
  print(f"joined: {strategy.num_replicas_in_sync} replicas", flush=True)
  with strategy.scope():
    model = build_model()
  # Initial weights come from the test: the same seed gives other initial
  # values under MultiWorkerMirroredStrategy than without it.
  with np.load(args.initial_weights) as f:
    initial = [f[str(i)] for i in range(len(f.files))]
  model.set_weights(initial)
  initial_checksum = checksum(model.get_weights())
  data = global_batches()
  history = train(model, strategy, data)
  with open(args.out, "w") as f:
    json.dump({"replicas": strategy.num_replicas_in_sync, "history": history,
               "initial_checksum": initial_checksum,
               "update_norms": update_norms(initial, model.get_weights())}, f)
  print("finished", flush=True)
  if args.linger:
    batches = strategy.distribute_datasets_from_function(
        lambda ctx: dataset_fn(data, ctx, repeat=True))
    model.fit(batches, steps_per_epoch=100_000, epochs=1, verbose=0,
              callbacks=[Progress("linger")])
  sys.stdout.flush()


if __name__ == "__main__":
  main()
