"""ftjax: fine-tune Hugging Face models in JAX/Flax NNX with the hyperparameters of fine-tuning first-class."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """Lazy exports (importing ftjax stays cheap): ftjax.generate -> ftjax.generate.generate."""
    if name == "generate":
        import importlib

        return importlib.import_module("ftjax.generate").generate
    raise AttributeError(f"module 'ftjax' has no attribute {name!r}")
