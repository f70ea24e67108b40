"""Backbones and heads, and one factory that turns a flag string into a model.

Every backbone is a built keras.Model whose `call(images, training=...)` takes
float images in [0, 1] and returns a dict of endpoints ("stem",
"block1".."block4", "features", and "logits" when num_classes > 0), and has a
`feature_dim` attribute.
"""

import re

from tf_ssl.models import bit
from tf_ssl.models import resnet
from tf_ssl.models.heads import LinearHead, ProjectionHead

BACKBONE_NAMES = (
    "resnet{18,34,50,101,152,200}[x{width}]  BN ResNet v1.5 (SimCLR, SupCon); "
    "e.g. resnet18, resnet50, resnet50x2",
    "bit_r{18,26,34,50,101,152}x{width}  BiT ResNet-v2 GN+WS; e.g. bit_r50x1, "
    "bit_r26x1, bit_r152x4",
)
_RESNET = re.compile(r"resnet(\d+)(?:x(\d+(?:\.\d+)?))?")
_BIT = re.compile(r"bit_r(\d+)x(\d+(?:\.\d+)?)")


def build_backbone(name, num_classes=0, small_image_stem=False, **kwargs):
  """Builds the backbone a flag string names.

  Args:
    name: "resnet<depth>[x<width>]" for the BN ResNet v1.5 (depth 18, 34, 50,
      101, 152, 200; width multiplier 1 by default), or
      "bit_r<depth>x<width>" for BiT ResNet-v2 (depth 18, 26, 34, 50, 101,
      152; width 1-4, or 0.5 for tiny models).
    num_classes: 0 for no classifier, else the size of a zero-init "head".
    small_image_stem: 3x3 stride-1 stem without max-pool, for images <= 32px
      (the BN ResNet's cifar_stem).
    **kwargs: family-specific options, e.g. sync_bn=True and bn_momentum for
      the BN ResNet.

  Returns:
    A built backbone keras.Model.

  Raises:
    ValueError: naming the bad value when `name` matches neither pattern.
  """
  try:
    match = _RESNET.fullmatch(name)
    if match:
      width = float(match.group(2) or 1)
      return resnet.resnet(int(match.group(1)),
                           width_multiplier=int(width) if width.is_integer() else width,
                           num_classes=num_classes,
                           cifar_stem=small_image_stem, **kwargs)
    match = _BIT.fullmatch(name)
    if match:
      width = float(match.group(2))
      return bit.resnet_v2(int(match.group(1)),
                           int(width) if width.is_integer() else width,
                           num_classes=num_classes,
                           small_image_stem=small_image_stem, **kwargs)
  except ValueError as e:  # a bad depth or width: name the flag value too.
    raise ValueError(f"backbone {name!r}: {e}") from e
  raise ValueError(f"backbone {name!r} is not a known name; accepted: "
                   + "; ".join(BACKBONE_NAMES))


__all__ = ["build_backbone", "BACKBONE_NAMES", "LinearHead", "ProjectionHead",
           "bit", "resnet"]
