"""tf_ssl: contrastive pretraining and BiT fine-tuning for TensorFlow 2 / Keras 3."""

__version__ = "0.1.0"
