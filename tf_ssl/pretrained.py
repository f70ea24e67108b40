"""Starting points for fine-tuning: tf_ssl checkpoints, BiT .npz, SavedModels.

`load_init(backbone, init)` fills a freshly built backbone (and, from a
checkpoint, the leading layers of a projection head) from whichever `init`
names; `init_kind(init)` says which it is. Every load is all-or-nothing:
each target variable must find a value of its shape and each source value
of the selected part a target, otherwise nothing is assigned and one
ValueError lists what differs (another depth or width, a missing head, a
file that is not a tf_ssl export). `pretraining_flags(init)` reads the
architecture and data flags of the run that wrote `init` from its flags.txt.
"""

import os
import re

import tensorflow as tf

from tf_ssl import checkpoints
from tf_ssl.models import bit

KINDS = ("none", "checkpoint", "bit_npz", "saved_model")


def init_kind(init):
  """("none" | "checkpoint" | "bit_npz" | "saved_model", resolved path).

  Accepted: None, "" or "none"; a .npz file (released BiT weights); a
  SavedModel directory (tf_ssl.export); a checkpoint prefix (".../ckpt-500"),
  a directory of checkpoints, or a pretraining workdir (its checkpoints/).

  Raises:
    ValueError: naming `init` when it is none of these.
  """
  if init in (None, "", "none"):
    return "none", None
  gfile = tf.io.gfile
  if init.endswith(".npz"):
    if not gfile.exists(init):
      raise ValueError(f"--init={init!r}: file not found.")
    return "bit_npz", init
  if gfile.isdir(init):
    if gfile.exists(os.path.join(init, "saved_model.pb")):
      return "saved_model", init
    for directory in (init, os.path.join(init, "checkpoints")):
      if gfile.isdir(directory):
        latest = _latest_checkpoint(directory)
        if latest:
          return "checkpoint", latest
  elif gfile.exists(init + ".index"):
    return "checkpoint", init
  raise ValueError(
      f"--init={init!r} is not a BiT .npz file, a SavedModel directory "
      "(with saved_model.pb), a checkpoint prefix (.../ckpt-N), a directory "
      "of checkpoints or a pretraining workdir; pass --init=none for a "
      "random initialisation.")


# Pretraining flags that describe the model and data, read from a workdir's
# flags.txt by the tools that evaluate it (label_efficiency, layer_probe).
INHERITED_FLAGS = ("backbone", "small_image_stem", "image_size", "dataset", "data_dir")


def pretraining_flags(init):
  """Model and data flags of the pretraining run that wrote `init`.

  Looks for flags.txt in the checkpoint's directory and its parent (a
  workdir holds checkpoints/ and flags.txt), or in and above a SavedModel.

  Returns:
    {flag: value} for the INHERITED_FLAGS found ({} without a flags.txt).
  """
  kind, path = init_kind(init)
  if kind == "none":
    return {}
  start = os.path.dirname(path) if kind == "checkpoint" else path
  for directory in (start, os.path.dirname(start.rstrip("/"))):
    flagfile = os.path.join(directory, "flags.txt")
    if tf.io.gfile.exists(flagfile):
      with tf.io.gfile.GFile(flagfile) as f:
        return _parse_flagfile(f.read())
  return {}


def _parse_flagfile(text):
  values = {}
  for line in text.splitlines():
    line = line.strip()
    if not line.startswith("--"):
      continue
    name, has_value, value = line[2:].partition("=")
    if has_value:
      values[name] = value
    elif name.startswith("no") and name[2:] in INHERITED_FLAGS:
      values[name[2:]] = "false"
    else:
      values[name] = "true"
  found = {}
  for name in INHERITED_FLAGS:
    if name in values:
      found[name] = values[name]
  if "image_size" in found:
    found["image_size"] = int(found["image_size"])
  if "small_image_stem" in found:
    found["small_image_stem"] = found["small_image_stem"].lower() in ("true", "1")
  return found


def _latest_checkpoint(directory):
  """The newest checkpoint in `directory`: from its "checkpoint" file (as
  CheckpointManager writes), else the highest-numbered <name>-<N>.index."""
  latest = tf.train.latest_checkpoint(directory)
  if latest:
    return latest
  prefixes = [p[:-len(".index")] for p in
              tf.io.gfile.glob(os.path.join(directory, "*.index"))]
  numbered = [p for p in prefixes if re.search(r"-\d+$", p)]
  if numbered:
    return max(numbered, key=lambda p: int(p.rsplit("-", 1)[1]))
  return prefixes[0] if len(prefixes) == 1 else None


def _copy_matching(targets, saved, source, part, skip=lambda name: False):
  """Assigns saved[prefix + name] to targets[name] for one common prefix.

  The prefix (e.g. "resnet/" for a backbone exported alone or inside a
  ContrastiveModel) is the one under which most target names are found.
  Saved names under that prefix that the target lacks count as differences,
  unless skip(name) (e.g. a classifier head the new model replaces).
  """
  hits = {}
  for name in targets:
    for saved_name in saved:
      if saved_name == name or saved_name.endswith("/" + name):
        prefix = saved_name[:len(saved_name) - len(name)]
        hits[prefix] = hits.get(prefix, 0) + 1
  prefix = max(sorted(hits, key=len), key=hits.get) if hits else ""
  problems = []
  for name, variable in targets.items():
    value = saved.get(prefix + name)
    if value is None:
      problems.append(f"{part}/{name}: target shape {tuple(variable.shape)}, "
                      "missing from the SavedModel")
    elif tuple(value.shape) != tuple(variable.shape):
      problems.append(f"{part}/{name}: SavedModel shape {tuple(value.shape)} "
                      f"!= target shape {tuple(variable.shape)}")
  for saved_name in sorted(saved):
    name = saved_name[len(prefix):]
    if (prefix and saved_name.startswith(prefix) and name not in targets and
        not skip(name)):
      problems.append(f"{part}/{name}: SavedModel shape "
                      f"{tuple(saved[saved_name].shape)}, missing from the target")
  if problems:
    shown = "\n  ".join(problems[:16])
    more = f"\n  ... and {len(problems) - 16} more" if len(problems) > 16 else ""
    raise ValueError(
        f"restore {part} from the SavedModel {source}, nothing restored: "
        f"{len(problems)} difference(s); is the architecture (depth, width, "
        f"stem) the one that was exported?\n  {shown}{more}")
  return [(variable, saved[prefix + name]) for name, variable in targets.items()]


def restore_from_saved_model(backbone, path):
  """Copies an exported tf_ssl model's backbone variables into `backbone`.

  Variables are matched by name (the Keras path, e.g.
  "resnet/block1/unit01/conv_1/conv2d/kernel", which a backbone keeps
  wherever it is nested) and shape. Projection-head layers are not taken
  from SavedModels: their saved names do not say which layer they belong to
  (a head built inside another model files them as "<model>/kernel"); take
  them from a checkpoint.

  Args:
    backbone: a built backbone of the exported architecture.
    path: a directory written by tf_ssl.export.export_saved_model (from a
      backbone, a ContrastiveModel) or by finetune.export_classifier.

  Returns:
    The number of variables copied.

  Raises:
    ValueError: when the SavedModel lacks the serving signature, the
      "features" endpoint or the `variables` attribute of a tf_ssl export,
      or when any variable differs (nothing is assigned then).
  """
  loaded = tf.saved_model.load(path)
  signatures = sorted(loaded.signatures.keys())
  if "serving_default" not in signatures:
    raise ValueError(
        f"the SavedModel has no serving_default signature (signatures: "
        f"{signatures}); export with tf_ssl.export.export_saved_model.")
  outputs = sorted(loaded.signatures["serving_default"].structured_outputs)
  # A backbone or ContrastiveModel export serves "features"; a fine-tuned
  # classifier serves logits but keeps every endpoint in call_endpoint.
  if "features" not in outputs and not hasattr(loaded, "call_endpoint"):
    raise ValueError(
        f"its serving_default signature returns {outputs}, no 'features' "
        "endpoint, and it has no call_endpoint; it is not a tf_ssl export.")
  variables = list(getattr(loaded, "variables", None) or [])
  if not variables:
    raise ValueError("the SavedModel has no `variables` attribute to copy "
                     "from; export with tf_ssl.export.")
  saved, seen = {}, set()
  for v in variables:
    name = v.name.rsplit(":", 1)[0]
    if name in seen:
      saved.pop(name, None)  # Ambiguous: reported as missing if needed.
    else:
      saved[name] = v
    seen.add(name)
  skip = lambda name: any(re.search(p, name) for p in checkpoints.BACKBONE_SKIP)
  targets = {n: v for n, v in checkpoints.variables_by_name(backbone).items()
             if not skip(n)}
  assignments = _copy_matching(targets, saved, path, "backbone", skip)
  for variable, value in assignments:
    variable.assign(value)
  return len(assignments)


def load_init(backbone, init, projection_head=None, proj_layers=0,
              backbone_name=None):
  """Initialises `backbone` (and projection layers) from `init`, all or none.

  Args:
    backbone: a freshly built tf_ssl backbone.
    init: see `init_kind`.
    projection_head: a built ProjectionHead shaped like the pretrained one,
      when proj_layers > 0.
    proj_layers: how many leading projection layers to take from `init`
      (a checkpoint only).
    backbone_name: the flag value the backbone was built from, for messages.

  Returns:
    {"kind": ..., "path": ..., "restored": number of variables}.

  Raises:
    ValueError: naming what differs; nothing is assigned then.
  """
  kind, path = init_kind(init)
  what = f"--backbone={backbone_name}" if backbone_name else backbone.name
  if proj_layers and kind in ("bit_npz", "saved_model"):
    raise ValueError(
        f"--init={init!r}: projection-head layers (--finetune_proj_layers="
        f"{proj_layers}) come only from a tf_ssl checkpoint, not from a "
        f"{'BiT .npz' if kind == 'bit_npz' else 'SavedModel'}; pass the "
        "pretraining checkpoints or --finetune_proj_layers=0.")
  restored = 0
  try:
    if kind == "checkpoint":
      restored = len(checkpoints.restore_backbone(backbone, path))
      if proj_layers:
        restored += len(checkpoints.restore_projection_layers(
            projection_head, path, proj_layers))
    elif kind == "bit_npz":
      if not isinstance(backbone, bit.ResNetV2):
        raise ValueError(f"a BiT .npz initialises a BiT ResNet-v2; {what} is "
                         "not one (use e.g. --backbone=bit_r50x1).")
      restored = len(bit.load_bit_npz(backbone, path, head="drop"))
    elif kind == "saved_model":
      restored = restore_from_saved_model(backbone, path)
  except ValueError as e:
    raise ValueError(f"--init={init!r} does not fit {what}: {e}") from e
  return {"kind": kind, "path": path, "restored": restored}
