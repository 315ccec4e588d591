"""Exports lose and clobber nothing: atomic HF and PEFT folders, non-empty and base folders refused, and a LoRA
classification adapter (with its trained head as modules_to_save) that PEFT loads with ftjax's logits."""

from __future__ import annotations

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from ftjax import hf, lora, models
from ftjax import params as params_lib

IDS = np.array([[5, 17, 42, 61, 3, 25, 7, 8], [9, 4, 33, 2, 0, 0, 0, 0]], np.int64)
MASK = (np.arange(8)[None] < np.array([[8], [4]])).astype(np.int64)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    """A random 2-layer BERT (no task head) saved by transformers: the base model of the exports."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32)
    path = str(tmp_path_factory.mktemp("base") / "bert")
    transformers.BertModel(cfg).save_pretrained(path)
    return path


def _folder_bytes(folder) -> dict[str, bytes]:
    return {name: pathlib.Path(folder, name).read_bytes() for name in sorted(os.listdir(folder))}


def _siblings(folder) -> list[str]:
    return sorted(os.listdir(os.path.dirname(folder)))


def test_export_into_a_non_empty_folder_is_refused_unless_overwrite(base, tmp_path):
    model = models.from_pretrained(base, task="classification", num_labels=3)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(models.ExportExistsError, match=rf"{out} is not empty; pass --overwrite.*--export_dir"):
        models.save_pretrained(model, str(out))
    assert (out / "notes.txt").read_text() == "mine"
    models.save_pretrained(model, str(out), overwrite=True)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]  # replaced, not merged into
    assert _siblings(str(out)) == ["out"]  # no temp folder left beside it
    models.save_pretrained(model, str(tmp_path / "empty_is_fine"))
    assert isinstance(models.ExportExistsError("x"), FileExistsError)


def test_export_into_the_base_model_folder_is_refused_even_with_overwrite(base, tmp_path):
    before = _folder_bytes(base)
    model = models.from_pretrained(base, task="classification", num_labels=3)
    for target in (base, os.path.dirname(base), os.path.join(base, "sub")):
        with pytest.raises(models.ExportIntoBaseError, match="base model's folder"):
            models.save_pretrained(model, target, overwrite=True)
    os.symlink(base, tmp_path / "link")  # the same folder by another name
    with pytest.raises(models.ExportIntoBaseError):
        models.save_pretrained(model, str(tmp_path / "link"), overwrite=True)
    lora.apply_lora(model, {"rank": 2, "targets": r".*(query|value)"})
    with pytest.raises(models.ExportIntoBaseError):
        lora.export_peft(model, base, overwrite=True)
    assert _folder_bytes(base) == before


def test_a_failure_mid_export_keeps_the_previous_export_and_leaves_no_temp_folder(base, tmp_path, monkeypatch):
    model = models.from_pretrained(base, task="classification", num_labels=3)
    out = str(tmp_path / "export")
    models.save_pretrained(model, out)
    before = _folder_bytes(out)

    def killed(*args, **kwargs):
        raise RuntimeError("killed while writing model.safetensors")

    monkeypatch.setattr(hf, "save_file", killed)
    with pytest.raises(RuntimeError, match="killed"):
        models.save_pretrained(model, out, overwrite=True)
    lora.apply_lora(model, {"rank": 2, "targets": r".*(query|value)"})
    with pytest.raises(RuntimeError, match="killed"):
        lora.export_peft(model, str(tmp_path / "adapter"))
    assert _folder_bytes(out) == before
    assert _siblings(out) == ["export"]


def test_peft_export_refuses_a_non_empty_folder(base, tmp_path):
    model = lora.apply_lora(models.from_pretrained(base), {"rank": 2, "targets": r".*(query|value)"})
    out = tmp_path / "adapter"
    lora.export_peft(model, str(out))
    with pytest.raises(models.ExportExistsError, match="--overwrite"):
        lora.export_peft(model, str(out))
    lora.export_peft(model, str(out), overwrite=True)
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]


def test_lora_classification_adapter_with_its_head_loads_in_peft_with_equal_logits(base, tmp_path):
    peft = pytest.importorskip("peft")
    model = models.from_pretrained(base, task="classification", num_labels=2)
    lora.apply_lora(model, {"rank": 2, "alpha": 4.0, "targets": r".*(query|value)"})
    graphdef, params, rest = params_lib.split(model)
    key = jax.random.key(1)

    def trained(path, x):  # "trained" adapters and head: lora_b and the head differ from the base / init
        if path.endswith("lora_b") or path.startswith(("classifier/", "bert/pooler/")):
            return x + 0.2 * jax.random.normal(jax.random.fold_in(key, len(path)), x.shape)
        return x

    params = params_lib.map_with_path(trained, params)
    want = np.asarray(params_lib.merge(graphdef, params, rest)(input_ids=jnp.asarray(IDS),
                                                               attention_mask=jnp.asarray(MASK))["logits"])
    out = lora.export_peft(model, str(tmp_path / "adapter"), params=params, base_model_name_or_path=base)
    cfg = json.loads(pathlib.Path(out, "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["bert.pooler.dense", "classifier"]
    hf_base = transformers.AutoModelForSequenceClassification.from_pretrained(base)
    peft_model = peft.PeftModel.from_pretrained(hf_base, out).eval()
    with torch.no_grad():
        got = peft_model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
