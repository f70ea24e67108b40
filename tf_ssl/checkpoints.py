"""Checkpoints that hold every variable, and restores for fine-tuning.

Why not `tf.train.Checkpoint(model=model)`: under Keras 3, layers kept in a
Python list (the backbones' `blocks`, the projection head's `dense_layers`)
are not TensorFlow checkpoint dependencies, so such a checkpoint silently
leaves out nearly every block variable (the trainable ones survive only by
the optimizer's numbered list, the BN moving statistics not at all).
`make_checkpoint` therefore files each variable under its Keras
`variable.path`, relative to the part it belongs to:

    model/backbone/block1/unit01/conv_1/conv2d/kernel
    model/projection_head/dense_1/kernel
    model/probe_head/kernel

and the restore helpers match those names, with shapes, against a target of
another head or probe size. `tf.train.Checkpoint`'s own partial restore is
silent about what it did not match; here every selected target variable must
find a value of its shape and every selected checkpoint value a target, or
nothing is assigned and one ValueError lists each difference.
"""

import re

import tensorflow as tf
from tensorflow.core.protobuf import trackable_object_graph_pb2

# The parts of a model without `checkpoint_parts()`, in the order they are
# filed; variables in none of them go under "other".
PARTS = ("backbone", "projection_head", "probe_head")
# Backbone variables that restore_backbone leaves alone by default: the
# classifier of a fine-tuning backbone (build_backbone(num_classes=K) names it
# "head"), which starts from zeros as in BiT rather than from a checkpoint.
BACKBONE_SKIP = (r"^head/",)
_PROJECTION_LAYER = re.compile(r"^(?:dense|batch_norm)_(\d+)/")


def variables_by_name(layer):
  """Maps each variable of `layer` to its Keras path relative to the layer.

  Args:
    layer: a built Keras layer or model.

  Returns:
    {relative path: keras.Variable}, e.g. {"block1/unit01/conv_1/conv2d/kernel":
    ...} for a backbone, whatever the name of the model it sits in.

  Raises:
    ValueError: if two variables share a path (two layers of the same name),
      since the checkpoint could not tell them apart.
  """
  # A layer never called (a queue the model only reads) has no path yet.
  prefix = (layer.path or layer.name) + "/"
  named = {}
  for variable in layer.variables:
    name = variable.path
    name = name[len(prefix):] if name.startswith(prefix) else name
    if name in named:
      raise ValueError(
          f"{layer.path}: two variables share the path {variable.path!r}; give "
          "the layers that hold them distinct names.")
    named[name] = variable
  return named


def _parts(model):
  """{part name: {relative name: variable}} covering every model variable once.

  A model with `checkpoint_parts()` (tf_ssl's SSLModel: the backbone that is
  the representation, the method's heads, targets and state) names its own
  parts; otherwise PARTS, or a bare backbone whole.

  Raises:
    ValueError: when one variable would be filed twice (two parts sharing a
      layer) or two variables under one name (layers of the same name), so
      that a checkpoint never silently keeps one value for two variables.
  """
  if hasattr(model, "checkpoint_parts"):
    layers = dict(model.checkpoint_parts())
  else:
    layers = {p: getattr(model, p, None) for p in PARTS}
    layers = {p: layer for p, layer in layers.items() if layer is not None}
  if not layers:  # A bare backbone.
    layers = {"backbone": model}
  parts = {p: variables_by_name(layer) for p, layer in layers.items()}
  owner = {}
  for part, named in parts.items():
    for name, variable in named.items():
      if id(variable) in owner:
        raise ValueError(
            f"{variable.path} would be filed twice, as {owner[id(variable)]} "
            f"and as {part}/{name}: two checkpoint parts share a layer.")
      owner[id(variable)] = f"{part}/{name}"
  other = {}
  for variable in model.variables:
    if id(variable) in owner:
      continue
    if variable.path in other:
      raise ValueError(
          f"{model.name}: two variables outside the model's parts share the "
          f"path {variable.path!r}; give the layers that hold them distinct "
          "names.")
    other[variable.path] = variable
  if other:
    parts["other"] = other
  return parts


def make_checkpoint(model, optimizer=None, step=None):
  """A tf.train.Checkpoint of model, optimizer and step, for saving and resume.

  Use it with tf.train.CheckpointManager for preemption-safe training, and
  restore for resume with
  `checkpoint.read(path).assert_existing_objects_matched()`.

  Args:
    model: an SSLModel (each of its `checkpoint_parts()` is filed
      separately, so each can be restored on its own; "backbone" is the
      representation), or any built Keras model, filed whole as "backbone".
    optimizer: optional Keras optimizer (e.g. tf_ssl.optim.LARS); its slots
      are saved once it is built.
    step: optional integer tf.Variable (the global step).

  Returns:
    A tf.train.Checkpoint with children "model" (and "optimizer", "step").
  """
  model_node = tf.train.Checkpoint(**{
      part: tf.train.Checkpoint(**named)
      for part, named in _parts(model).items()})
  children = {"model": model_node}
  if optimizer is not None:
    children["optimizer"] = optimizer
  if step is not None:
    children["step"] = step
  return tf.train.Checkpoint(**children)


def _resolve(checkpoint_path):
  """A checkpoint prefix, or the latest checkpoint in a directory."""
  if tf.io.gfile.isdir(checkpoint_path):
    latest = tf.train.latest_checkpoint(checkpoint_path)
    if latest is None:
      raise ValueError(f"{checkpoint_path} is a directory without a checkpoint "
                       "file; pass a checkpoint prefix such as .../ckpt-1000.")
    return latest
  return checkpoint_path


def _saved_part(reader, checkpoint_path, part):
  """{relative name: checkpoint key} of one part, from the object graph.

  The object graph, not tf.train.list_variables, because a variable's key is
  its shortest path from the root, which may run through the optimizer.
  """
  graph = trackable_object_graph_pb2.TrackableObjectGraph()
  graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))

  def child(node_id, name):
    for ref in graph.nodes[node_id].children:
      if ref.local_name == name:
        return ref.node_id
    return None

  model_id = child(0, "model")
  part_id = None if model_id is None else child(model_id, part)
  if part_id is None:
    found = ([r.local_name for r in graph.nodes[model_id].children]
             if model_id is not None else [])
    raise ValueError(
        f"{checkpoint_path} has no model/{part} (model parts found: {found}); "
        "restore from a checkpoint written with tf_ssl.checkpoints."
        "make_checkpoint, and check that the saved model had this part.")
  saved = {}
  for ref in graph.nodes[part_id].children:
    for attribute in graph.nodes[ref.node_id].attributes:
      if attribute.name == "VARIABLE_VALUE":
        saved[ref.local_name] = attribute.checkpoint_key
  if not saved:
    raise ValueError(
        f"{checkpoint_path}: model/{part} holds no variables filed by name, "
        "so it was not written with tf_ssl.checkpoints.make_checkpoint (a "
        "plain tf.train.Checkpoint(model=...) misses the Keras 3 layers kept "
        "in lists); save with make_checkpoint.")
  return saved


def saved_shapes(checkpoint_path, part):
  """{relative name: shape} of one part of a make_checkpoint checkpoint.

  E.g. saved_shapes(path, "probe_head")["kernel"] is (feature width, classes
  of the online probe): a tool can tell the dataset a run was trained on
  from it without building the model.

  Raises:
    ValueError: as restore_variables, when the checkpoint lacks the part.
  """
  checkpoint_path = _resolve(checkpoint_path)
  reader = tf.train.load_checkpoint(checkpoint_path)
  shapes = reader.get_variable_to_shape_map()
  return {name: tuple(shapes[key]) for name, key in
          _saved_part(reader, checkpoint_path, part).items()}


def restore_variables(targets, checkpoint_path, part, select=None):
  """Assigns one part of a make_checkpoint checkpoint to `targets`, all or none.

  Args:
    targets: {relative name: variable}, e.g. from `variables_by_name`.
    checkpoint_path: a checkpoint prefix, or a directory (its latest
      checkpoint); gs:// paths work.
    part: "backbone", "projection_head", "probe_head" or "other".
    select: optional predicate on a relative name; names it rejects are
      ignored on both sides (left as they are in the target).

  Returns:
    The sorted list of restored names.

  Raises:
    ValueError: listing every selected name whose shapes differ, that the
      checkpoint lacks, or that the target lacks, with the shapes.
  """
  checkpoint_path = _resolve(checkpoint_path)
  reader = tf.train.load_checkpoint(checkpoint_path)
  shapes = reader.get_variable_to_shape_map()
  select = select or (lambda name: True)
  saved = {n: k for n, k in _saved_part(reader, checkpoint_path, part).items()
           if select(n)}
  targets = {n: v for n, v in targets.items() if select(n)}
  mismatched, missing, extra = [], [], []
  for name, variable in targets.items():  # Model order: stem first.
    target_shape = tuple(variable.shape)
    if name not in saved:
      missing.append(f"{part}/{name}: target shape {target_shape}, missing "
                     "from the checkpoint")
    elif tuple(shapes[saved[name]]) != target_shape:
      mismatched.append(f"{part}/{name}: checkpoint shape "
                        f"{tuple(shapes[saved[name]])} != target shape "
                        f"{target_shape}")
  for name in sorted(set(saved) - set(targets)):
    extra.append(f"{part}/{name}: checkpoint shape "
                 f"{tuple(shapes[saved[name]])}, missing from the target")
  if not targets:
    missing.append(f"{part}: nothing selected to restore")
  if mismatched or missing or extra:
    lines = []
    # A few of each kind: a depth change shows both missing and extra names.
    for kind in (mismatched, missing, extra):
      lines += kind[:8] + ([f"... and {len(kind) - 8} more like this"]
                           if len(kind) > 8 else [])
    shown = "\n  ".join(lines)
    raise ValueError(
        f"restore {part} from {checkpoint_path}, nothing restored: "
        f"{len(mismatched)} shape mismatch(es), {len(missing)} missing from "
        f"the checkpoint, {len(extra)} missing from the target; is the "
        f"architecture (depth, width, head size) the one that was saved?"
        f"\n  {shown}")
  for name, variable in targets.items():
    variable.assign(reader.get_tensor(saved[name]))
  return sorted(targets)


def restore_backbone(backbone, checkpoint_path, skip=BACKBONE_SKIP):
  """Restores a pretrained backbone into `backbone`, e.g. for fine-tuning.

  Args:
    backbone: a built backbone of the saved architecture (its classifier
      head, if any, may have any class count).
    checkpoint_path: a make_checkpoint prefix or directory.
    skip: regexes (re.search on names relative to the backbone) of variables
      to leave as initialised on both sides; by default the classifier "head".

  Returns:
    The sorted list of restored variable names.

  Raises:
    ValueError: naming each variable that is missing on either side or whose
      shapes differ (another depth or width), before anything is assigned.
  """
  return restore_variables(
      variables_by_name(backbone), checkpoint_path, "backbone",
      select=lambda name: not any(re.search(p, name) for p in skip))


def restore_projection_layers(projection_head, checkpoint_path,
                              num_layers=None):
  """Restores the first `num_layers` layers of a pretrained ProjectionHead.

  SimCLR v2 fine-tunes from inside the projection head (ft_proj_selector,
  docs/recipes.md "SimCLR models"): the layers up to the chosen one come from
  pretraining. Build the target head like the saved one and read its
  "proj_<num_layers>" endpoint; later layers keep their initial values.

  Args:
    projection_head: a built tf_ssl.models.ProjectionHead.
    checkpoint_path: a make_checkpoint prefix or directory.
    num_layers: how many leading layers (Dense and its BN) to restore; None
      restores the whole head.

  Returns:
    The sorted list of restored variable names.

  Raises:
    ValueError: as restore_variables, e.g. when the saved head has fewer
      layers or other widths.
  """
  def select(name):
    if num_layers is None:
      return True
    match = _PROJECTION_LAYER.match(name)
    return bool(match) and int(match.group(1)) <= num_layers

  return restore_variables(variables_by_name(projection_head), checkpoint_path,
                           "projection_head", select=select)
