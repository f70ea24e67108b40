"""Input pipeline: sources -> augmentations -> per-replica batches.

  sources.make_source / from_arrays / subsets.label_subset  (what to read)
  augment.SimCLRAugment / BiTAugment / eval_view / mixup     (the recipes)
  pipeline.pretrain_dataset / eval_dataset / finetune_dataset (tf.distribute)
"""

from tf_ssl.data.sources import Source, from_arrays, make_source
from tf_ssl.data.subsets import label_subset
