"""SavedModel export for TF Hub and for Keras' TFSMLayer, fine-tunable.

The exported object follows TF Hub's reusable SavedModel convention
(https://www.tensorflow.org/hub/reusable_saved_models): `__call__(images,
training=False)` traced for both values of `training`, and the attributes
`variables`, `trainable_variables` and `regularization_losses`. It also has
a `serving_default` signature and two plain tf.functions, `call_endpoint`
and `call_training_endpoint`, for
`keras.layers.TFSMLayer(path, call_endpoint="call_endpoint",
call_training_endpoint="call_training_endpoint")`, which finds the variables
to train by listing those the endpoint functions capture.

Every function returns the model's named endpoints as a dict ("stem",
"block1".."block4", "features", and for a ContrastiveModel its "proj_<i>",
"projection" and "probe_logits"), so users pick features by name, never by
graph tensor names (what made the SimCLR reference exports hard to reuse).
Functions capture the Keras variables' underlying tf.Variables, so gradients
reach every weight after loading: the export can be fine-tuned.
"""

import keras
import tensorflow as tf

# Images are float32 in [0, 1], any batch, any (square) size the model takes;
# the backbone maps them to its own input range. Functions called from Python
# bind inputs to IMAGE_SPEC, so a wrong channel count fails with an error that
# shows this spec. A signature does not check shapes, so the serving signature
# takes any channel count and checks it inside (`_endpoints`), failing with a
# message rather than deep inside a convolution.
IMAGE_SPEC = tf.TensorSpec([None, None, None, 3], tf.float32, name="images")
_SERVING_SPEC = tf.TensorSpec([None, None, None, None], tf.float32,
                              name="images")


def _endpoints(model, images, training):
  """The model's endpoints for checked images, every float one as float32."""
  check = tf.debugging.assert_equal(
      tf.shape(images)[-1], 3, message=(
          "images must be float32 RGB of shape [batch, height, width, 3] with "
          "values in [0, 1]; tile grayscale images to 3 channels"))
  # No static reshape here: shape inference of the loaded graph would then
  # fail on a wrong channel count before this check could run.
  with tf.control_dependencies([check]):
    images = tf.identity(images)
  endpoints = model(images, training=training)
  # Under a mixed_bfloat16 policy the endpoints are bfloat16; a consumer of
  # the SavedModel should not have to know the training precision.
  return {name: tf.cast(value, tf.float32) if value.dtype.is_floating else value
          for name, value in endpoints.items()}


def _endpoint_fn(model, training, spec=IMAGE_SPEC):
  """A tf.function of images -> endpoint dict with `training` fixed."""
  @tf.function(input_signature=[spec])
  def call(images):
    return _endpoints(model, images, training)
  return call


def _regularization_losses(model):
  """Zero-argument tf.functions, one per regularisation loss of the model."""
  if not model.losses:
    return []
  # Keras 3 computes weight-regulariser losses when `losses` is read, so a
  # function that reads it recomputes them from the current variables.
  @tf.function(input_signature=[])
  def loss():
    return tf.add_n([tf.cast(l, tf.float32) for l in model.losses])
  return [loss]


def build_export_module(model):
  """The trackable object export_saved_model writes (no I/O).

  Args:
    model: a built backbone (call returns a dict of endpoints) or a
      ContrastiveModel.

  Returns:
    A trackable with `__call__`, `call_endpoint`, `call_training_endpoint`,
    `variables`, `trainable_variables`, `non_trainable_variables` and
    `regularization_losses`.

  Raises:
    ValueError: if the model is unbuilt or does not return a dict.
  """
  if not model.built or not model.variables:
    raise ValueError(f"export: {model.name} is not built; call it once on a "
                     "batch of images before exporting.")
  probe = model(tf.zeros([1, 32, 32, 3]), training=False)
  if not isinstance(probe, dict):
    raise ValueError(
        f"export: {model.name} returns {type(probe).__name__}, not a dict of "
        "named endpoints; export a tf_ssl backbone or ContrastiveModel.")
  # AutoTrackable (as keras.export.ExportArchive uses) rather than tf.Module:
  # tf.Module's read-only `variables` property would clash with the TF Hub
  # attribute of that name. The Keras model itself is not tracked: only its
  # tf.Variables and the traced functions go into the SavedModel.
  root = tf.__internal__.tracking.AutoTrackable()
  root.variables = [v.value for v in model.variables]
  root.trainable_variables = [v.value for v in model.trainable_variables]
  root.non_trainable_variables = [v.value for v in model.non_trainable_variables]
  root.regularization_losses = _regularization_losses(model)
  root.call_endpoint = _endpoint_fn(model, training=False)
  root.call_training_endpoint = _endpoint_fn(model, training=True)

  @tf.function
  def call(images, training=False):
    return _endpoints(model, images, training)

  # Both traces are saved; the loaded __call__ dispatches on the Python bool.
  for training in (False, True):
    call.get_concrete_function(IMAGE_SPEC, training=training)
  root.__call__ = call
  return root


def export_saved_model(model, path):
  """Writes `model` as a reusable, fine-tunable SavedModel at `path`.

  Args:
    model: a built tf_ssl backbone or ContrastiveModel.
    path: the SavedModel directory (local or gs://; written through
      tf.saved_model, i.e. tf.io.gfile).

  Returns:
    `path`.

  Example:
    >>> export_saved_model(model, "/tmp/simclr_r50")
    >>> hub_model = tf.saved_model.load("/tmp/simclr_r50")
    >>> features = hub_model(images)["features"]          # images in [0, 1]
    >>> layer = keras.layers.TFSMLayer(
    ...     "/tmp/simclr_r50", call_endpoint="call_endpoint",
    ...     call_training_endpoint="call_training_endpoint")
  """
  root = build_export_module(model)
  serving = _endpoint_fn(model, training=False, spec=_SERVING_SPEC)
  tf.saved_model.save(root, path, signatures={
      "serving_default": serving.get_concrete_function()})
  return path


class _TFSMLayer(keras.layers.TFSMLayer):
  """TFSMLayer whose weights are named without the ":0" of TF variable names.

  Keras names optimizer slots after the variable, and "kernel:0_momentum" is
  not a valid scope name, so stock TFSMLayer weights cannot be trained with
  SGD momentum or Adam. The weights stay the loaded variables themselves.
  """

  def _add_existing_weight(self, weight):
    self._track_variable(keras.Variable(
        initializer=weight, trainable=weight.trainable, dtype=weight.dtype,
        shape=weight.shape,
        name=weight.name.split(":")[0].replace("/", "_")))


def tfsm_layer(path, **kwargs):
  """keras.layers.TFSMLayer on an exported model, training endpoint included.

  Args:
    path: a directory written by export_saved_model.
    **kwargs: forwarded to keras.layers.TFSMLayer (trainable, name, ...).

  Returns:
    A Keras layer mapping images in [0, 1] to the dict of endpoints, using
    the training-mode function (BN batch statistics) when called with
    training=True, e.g. inside model.fit.
  """
  return _TFSMLayer(path, call_endpoint="call_endpoint",
                    call_training_endpoint="call_training_endpoint", **kwargs)
