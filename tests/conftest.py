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
# Machine-wide memories (the CPU peak behind MFU) start empty for each test session.
os.environ.setdefault("FTJAX_CACHE_DIR", __import__("tempfile").mkdtemp(prefix="ftjax_cache_"))


import pytest  # after the environment above: nothing may import jax before it is set


def pytest_report_header(config):
    """The versions parity is measured against, at the top of every run (and in CI's log)."""
    import importlib.metadata as md

    versions = {name: md.version(name) for name in ("transformers", "torch", "jax", "flax", "libtpu")
                if _installed(name)}
    from ftjax.hf import TRANSFORMERS_TESTED

    return [f"ftjax parity references: {', '.join(f'{k} {v}' for k, v in versions.items())}; "
            f"transformers releases tested: {TRANSFORMERS_TESTED[0]} to {TRANSFORMERS_TESTED[1]}"]


def pytest_terminal_summary(terminalreporter):
    """The same line at the end, which `-q` (the README's command) keeps."""
    for line in pytest_report_header(None):
        terminalreporter.write_line(line)


def _installed(name: str) -> bool:
    import importlib.metadata as md

    try:
        md.version(name)
        return True
    except md.PackageNotFoundError:
        return False

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
