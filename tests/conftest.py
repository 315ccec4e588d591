"""Test setup: CPU backend with 8 host devices (for sharding tests), offline HF, small shared fixtures."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# libtpu (AOT compiles for TPU topologies) takes a machine-wide lock; a test's subprocess (the CLI) and the
# test process may both load it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


import pytest  # after the environment above: nothing may import jax before it is set

from tests.gcs_emulator import gcs_bucket, gcs_emulator  # noqa: F401  (fixtures: a GCS emulator)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A random 2-layer BERT with the MiniLM tokenizer, saved by transformers (tests/tiny.py)."""
    from tests import tiny

    return tiny.tiny_bert(str(tmp_path_factory.mktemp("tiny_bert")))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """train.csv / test.csv of short reviews labelled pos / neg (tests/tiny.py)."""
    from tests import tiny

    return tiny.sentiment_csvs(str(tmp_path_factory.mktemp("reviews")))
