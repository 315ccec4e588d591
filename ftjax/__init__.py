"""ftjax: fine-tune Hugging Face models in JAX/Flax NNX with the hyperparameters of fine-tuning first-class."""

__version__ = "0.1.0"

