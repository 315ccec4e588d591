"""The first minute of a new user: each mistake made before training starts (while absl parses the flags,
ml_collections loads the recipe and applies overrides) ends with one `ftjax: error:` line naming the flag and
the fix, exit status 2, no traceback, printed once."""

from __future__ import annotations

import pytest

from tests.test_main import _cli

MINILM = "--config=configs/minilm_food_reviews.py"


@pytest.mark.parametrize("args, says", [
    (["--config=configs/nope.py", "--workdir=w"], ["no recipe file 'configs/nope.py'", "configs/causal_lm_text.py"]),
    (["--config=configs/causal_lm_text.py", "--workdir=w"], ["--config=configs/causal_lm_text.py:",
                                                              "needs model=PATH in its arg"]),
    (["--config=configs/causal_lm_text.py:model=/m,data=/d,lora=abc", "--workdir=w"], ["lora=abc", "'abc'"]),
    ([MINILM, "--config.optim.lrr=1e-4", "--workdir=w"], ["--config.optim.lrr", "did you mean optim.lr"]),
    ([MINILM, "--config.optim.lr=abc", "--workdir=w"], ["--config.optim.lr=abc", "could not convert"]),
    ([MINILM, "--mode=trian", "--workdir=w"], ["--mode=trian", "train|eval"]),
    ([MINILM, "--mdoe=train", "--workdir=w"], ["'mdoe'", "Did you mean: mode"]),
    ([MINILM], ["--workdir is required"]),
    (["--workdir=w"], ["--mode=train needs --config=configs/RECIPE.py", "configs/minilm_food_reviews.py"]),
    ([MINILM, "--workdir=w", "stray"], ["unexpected arguments: ['stray']"]),
    ([MINILM, "--workdir=w", "--topology=v5e-4"], ["goes with --mode=dry_run"]),
])
def test_a_mistake_before_training_is_one_line(args, says, tmp_path):
    args = [a.replace("--workdir=w", f"--workdir={tmp_path / 'w'}") for a in args]
    proc = _cli(*args, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("ftjax: error:"), proc.stderr[-3000:]
    for part in says:
        assert part in errors[0], errors[0]


def test_a_hub_id_while_offline_is_one_line(tmp_path):
    proc = _cli(MINILM, f"--workdir={tmp_path / 'w'}", "--config.model.name_or_path=bert-base-uncased",
                check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ftjax: error:") and "bert-base-uncased" in last and "local HF folder" in last
    assert proc.stderr.count("ftjax: error:") == 1 and "E0000" not in last


def test_help_lists_the_modes_and_the_recipes():
    proc = _cli("--help", check=False)
    text = proc.stdout + proc.stderr
    assert "modes: train" in text and "configs/minilm_food_reviews.py" in text and "configs/translation.py" in text
