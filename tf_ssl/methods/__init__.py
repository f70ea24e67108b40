"""Every pretraining method, by its --method name.

Each method is one module (its heads, target, state, views, loss and hooks;
tf_ssl/methods/base.py says what a method is). Its options are the fields
of its `Config`, set by flags named with the method's prefix
(`--byol_momentum`); `temperature` is one flag shared by the methods that
have one.

    >>> method = tf_ssl.methods.create("byol", {"momentum": 0.99},
    ...                                total_steps=1000)
    >>> model = SSLModel(backbone, method, num_classes=10,
    ...                  make_backbone=lambda: build_backbone("resnet18"))
"""

import dataclasses

from tf_ssl.methods import barlow_twins
from tf_ssl.methods import byol
from tf_ssl.methods import dino
from tf_ssl.methods import jigsaw
from tf_ssl.methods import moco_v2
from tf_ssl.methods import moco_v3
from tf_ssl.methods import pirl
from tf_ssl.methods import rotation
from tf_ssl.methods import simclr
from tf_ssl.methods import supcon
from tf_ssl.methods import swav
from tf_ssl.methods import vicreg
from tf_ssl.methods.base import HeadSpec, Method, StepOutput

REGISTRY = {
    "simclr": simclr.SimCLR,
    "supcon": supcon.SupCon,
    "byol": byol.BYOL,
    "moco_v2": moco_v2.MoCoV2,
    "moco_v3": moco_v3.MoCoV3,
    "swav": swav.SwAV,
    "dino": dino.DINO,
    "barlow_twins": barlow_twins.BarlowTwins,
    "vicreg": vicreg.VICReg,
    "rotation": rotation.Rotation,
    "jigsaw": jigsaw.Jigsaw,
    "pirl": pirl.PIRL,
}
NAMES = tuple(REGISTRY)
# The flag prefix of each method's options; a family shares one.
FLAG_PREFIX = {"simclr": "simclr_", "supcon": "supcon_", "byol": "byol_",
               "moco_v2": "moco_", "moco_v3": "moco_", "swav": "swav_",
               "dino": "dino_", "barlow_twins": "barlow_", "vicreg": "vicreg_",
               "rotation": "rotation_", "jigsaw": "jigsaw_", "pirl": "pirl_"}
# Options every method that has them reads from one un-prefixed flag.
SHARED_OPTIONS = ("temperature",)


def get(name):
  """The Method class of --method=`name`."""
  if name not in REGISTRY:
    raise ValueError(f"--method={name!r} is not one of {', '.join(NAMES)}.")
  return REGISTRY[name]


def flag_name(method, option):
  """The flag that sets `option` of `method` (e.g. byol, momentum ->
  byol_momentum; moco_v2, temperature -> temperature)."""
  return option if option in SHARED_OPTIONS else FLAG_PREFIX[method] + option


def flag_owners():
  """{flag name: [methods that read it]} for every method option."""
  owners = {}
  for name, cls in REGISTRY.items():
    for field in dataclasses.fields(cls.Config):
      owners.setdefault(flag_name(name, field.name), []).append(name)
  return owners


def create(name, options=None, **kwargs):
  """A Method from its name and options ({Config field: value}); kwargs go
  to the Method (head, total_steps, global_batch_size, steps_per_epoch,
  num_examples, seed)."""
  cls = get(name)
  return cls(cls.Config(**(options or {})), **kwargs)


__all__ = ["HeadSpec", "Method", "StepOutput", "REGISTRY", "NAMES", "create",
           "flag_name", "flag_owners", "get"]
