"""The contrastive model of SimCLR and SupCon: an SSLModel built from a
backbone, a projection head and a method name.

Kept as the short way to build those two (README, colabs); every method,
these included, runs on tf_ssl.models.ssl_model.SSLModel.
"""

from tf_ssl import methods
from tf_ssl.models.ssl_model import SSLModel

METHODS = ("simclr", "supcon")


class ContrastiveModel(SSLModel):
  """A backbone, a projection head and an online linear probe (SimCLR,
  SupCon).

  Args:
    backbone: a model mapping images in [0, 1] to a dict of endpoints with a
      "features" entry.
    projection_head: a layer mapping features to a dict with a "projection"
      entry (and its hidden layers).
    num_classes: classes of the online probe; 0 for none.
    method: "simclr" (NT-Xent, labels unused) or "supcon" (labels required).
    temperature: softmax temperature of the contrastive loss.
    supcon_options: extra keyword arguments of `tf_ssl.losses.supcon`
      (base_temperature, contrast_mode, summation, denominator).

  The model needs no call or build before `fit`: Keras builds it from the
  first batch.

  Example:
    >>> model = ContrastiveModel(backbone, ProjectionHead(), num_classes=10)
    >>> model.compile(optimizer=tf_ssl.optim.LARS(0.3))
    >>> model.fit(pretrain_batches, steps_per_epoch=100)
  """

  def __init__(self, backbone, projection_head, num_classes=0, method="simclr",
               temperature=0.1, supcon_options=None, **kwargs):
    if method not in METHODS:
      raise ValueError(f"method={method!r} is not one of {METHODS}; other "
                       "methods build an SSLModel from tf_ssl.methods.create.")
    if method == "simclr" and supcon_options:
      raise ValueError("supcon_options are only used with method='supcon'.")
    options = dict(supcon_options or {}, temperature=temperature)
    super().__init__(backbone, methods.create(method, options, head=projection_head),
                     num_classes=num_classes, **kwargs)

  def _contrastive_loss(self, projection, labels, num_views):
    return self.method.contrastive_loss(projection, labels, num_views)
