"""Language-model data: packing with segment ids, the shifted causal-LM loss, prompt masking, the recipes."""

from __future__ import annotations

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import tasks as tasks_lib
from ftjax import trainer
from ftjax.config import default_config
from ftjax.data import document_packing as packing
from ftjax.tasks import causal_lm as causal_lm_task

CORPUS = [
    "the cat sat on the mat and looked at the dog",
    "a dog ran in the park with a red ball",
    "hello world, how are you today? fine thanks",
    "the quick brown fox jumps over the lazy dog",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer():
    """A byte-level BPE trained on the fly (GPT-2 style), with eos/pad tokens and a chat template."""
    import transformers
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        CORPUS * 3,
        vocab_size=300,
        min_frequency=1,
        special_tokens=["<|endoftext|>", "<pad>"],
        show_progress=False,
    )
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<pad>",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_llama(path: str, seed: int = 0, **overrides) -> str:
    """A random 2-layer Llama (GQA) saved by transformers, with the tiny tokenizer, as an HF folder."""
    import torch
    import transformers

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    kwargs = dict(  # noqa: C408
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    return tiny_llama(str(tmp_path_factory.mktemp("llama")))


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _doc(ids, labels=None) -> packing.Document:
    ids = np.asarray(ids, np.int32)
    return packing.Document(ids, ids.copy() if labels is None else np.asarray(labels, np.int32))


def test_pack_text_fills_rows_and_restarts_positions_per_document():
    docs = [_doc(range(10, 15)), _doc(range(20, 27)), _doc(range(30, 34))]
    p = packing.pack(docs, 8, split_long=True, pad_id=0)
    # 16 tokens in rows of 8: doc 2 is split across rows 0 and 1 (a new segment there).
    assert p.input_ids.tolist() == [[10, 11, 12, 13, 14, 20, 21, 22], [23, 24, 25, 26, 30, 31, 32, 33]]
    assert p.segment_ids.tolist() == [[1, 1, 1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 2, 2, 2, 2]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1, 2, 3]]
    assert p.truncated == 1 and (p.labels == p.input_ids).all()


def test_pack_instruct_keeps_examples_whole_and_drops_unlearnable_ones():
    ignore = packing.IGNORE
    docs = [
        _doc([1, 2, 3, 4], [ignore, ignore, 3, 4]),
        _doc([5, 6, 7], [ignore, 6, 7]),
        _doc([8, 9, 10], [ignore, ignore, ignore]),  # no completion token: dropped
        _doc(list(range(40, 52)), [ignore] * 2 + list(range(42, 52))),  # longer than 6: cut to 6
    ]
    p = packing.pack(docs, 6, split_long=False, pad_id=99)
    assert p.input_ids.tolist() == [[1, 2, 3, 4, 99, 99], [5, 6, 7, 99, 99, 99], [40, 41, 42, 43, 44, 45]]
    assert p.segment_ids.tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0], [1] * 6]
    assert p.labels[0].tolist() == [ignore, ignore, 3, 4, ignore, ignore]
    assert (p.dropped, p.truncated, p.documents) == (1, 1, 3)


def test_packed_row_gives_each_document_the_logits_it_gets_alone(llama_dir):
    from ftjax import models

    model = models.from_pretrained(llama_dir, task="causal_lm")
    rng = np.random.default_rng(0)
    docs = [_doc(rng.integers(2, 300, n)) for n in (5, 7, 4)]
    p = packing.pack(docs, 20, split_long=False, pad_id=1)
    assert p.segment_ids[0].max() == 3
    batch = packing.PackedBatcher(p, 1, slice(0, 1))(np.array([0]))
    packed = model(**tasks_lib.model_inputs(batch))["logits"][0]
    start = 0
    for doc in docs:
        alone = model(input_ids=jnp.asarray(doc.ids)[None])["logits"][0]
        np.testing.assert_allclose(packed[start : start + len(doc.ids)], alone, atol=2e-5, rtol=1e-5)
        start += len(doc.ids)

    # The loss of the packed row is the sum of the documents' own (shifted) losses: none across boundaries.
    loss_sum, tokens = causal_lm_task.causal_lm_loss_sum(packed[None], batch["labels"], batch["segment_ids"])
    want, count = 0.0, 0
    start = 0
    for doc in docs:
        alone = model(input_ids=jnp.asarray(doc.ids)[None])["logits"]
        s, n = causal_lm_task.causal_lm_loss_sum(alone, jnp.asarray(doc.labels)[None])
        want, count, start = want + float(s[0]), count + int(n[0]), start + len(doc.ids)
    assert float(tokens[0]) == count == sum(len(d.ids) - 1 for d in docs)
    np.testing.assert_allclose(float(loss_sum[0]), want, rtol=1e-5)


def test_causal_lm_loss_matches_transformers_shift(llama_dir):
    import torch
    import transformers

    from ftjax import models

    model = models.from_pretrained(llama_dir, task="causal_lm")
    ids = np.random.default_rng(1).integers(2, 300, (1, 9))
    logits = model(input_ids=jnp.asarray(ids))["logits"]
    loss_sum, tokens = causal_lm_task.causal_lm_loss_sum(logits, jnp.asarray(ids))
    hf = transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    with torch.no_grad():
        want = float(hf(input_ids=torch.tensor(ids), labels=torch.tensor(ids)).loss)
    np.testing.assert_allclose(float(loss_sum[0] / tokens[0]), want, rtol=1e-4)


def _cfg(source: str, **data) -> object:
    c = default_config()
    c.model.name_or_path = "unused"
    c.model.task = "causal_lm"
    c.data.source = source
    c.data.max_len = 32
    for key, value in data.items():
        c.data.lm[key] = value
    c.train.batch_size = 4
    return c


def _labelled_segments(batches) -> list[list[int]]:
    """Labelled token ids of each (row, segment) of all batches; checks labels are ids or -100."""
    out = []
    for b in batches:
        keep = b["labels"] != packing.IGNORE
        assert (b["labels"][keep] == b["input_ids"][keep]).all()
        assert not keep[b["segment_ids"] == 0].any(), "padding takes loss"
        for r in np.flatnonzero(b["weights"]):
            for s in range(1, b["segment_ids"][r].max() + 1):
                sel = (b["segment_ids"][r] == s) & keep[r]
                out.append(b["input_ids"][r][sel].tolist())
    return out


def test_prompt_completion_jsonl_takes_loss_on_completions_only(tmp_path, tok):
    from ftjax import tasks

    rows = [{"prompt": f"question {i}: the cat", "completion": f" sat on the mat {i}"} for i in range(12)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bundle = tasks.build_data(_cfg(f"files:{path}"), tok)
    assert bundle.stats["format"] == "prompt_completion"
    it = bundle.train_iterator()
    batches = list(bundle.eval_batches("validation")) + [next(it) for _ in range(bundle.steps_per_epoch)]
    segs = _labelled_segments(batches)
    texts = sorted(tok.decode(s) for s in segs)
    assert texts == sorted(r["completion"] + tok.eos_token for r in rows)
    assert set(bundle.sample_prompts) <= {r["prompt"] for r in rows} and bundle.sample_prompts


def test_chat_messages_take_loss_on_assistant_replies_only(tmp_path, tok):
    from ftjax import tasks

    convs = [
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": f"hello {i}"},
                {"role": "assistant", "content": f"the cat {i}"},
                {"role": "user", "content": "and?"},
                {"role": "assistant", "content": "the dog"},
            ]
        }
        for i in range(6)
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in convs))
    cfg = _cfg(f"files:{path}")
    cfg.data.max_len = 128
    bundle = tasks.build_data(cfg, tok)
    assert bundle.stats["format"] == "chat"
    batches = list(bundle.eval_batches("validation")) + [next(bundle.train_iterator())]
    texts = [tok.decode(s) for s in _labelled_segments(batches)]
    assert texts and all(t.startswith("the cat ") and t.endswith("\nthe dog\n") for t in texts)
    assert bundle.sample_prompts[0].endswith("<|user|>and?\n<|assistant|>")


def test_text_files_pack_every_token_with_segment_ids(tmp_path, tok):
    from ftjax import tasks

    paragraphs = [f"{CORPUS[i % 4]} number {i}" for i in range(20)]
    (tmp_path / "corpus.txt").write_text("\n\n".join(paragraphs) + "\n")
    bundle = tasks.build_data(_cfg(f"files:{tmp_path / 'corpus.txt'}", documents="paragraph"), tok)
    assert bundle.stats["documents"]["train"] + bundle.stats["documents"]["validation"] == 20
    want = sum(len(tok(p)["input_ids"]) + 1 for p in paragraphs)  # + eos
    assert sum(bundle.stats["tokens"].values()) == want
    b = next(bundle.train_iterator())
    assert set(b) == {"input_ids", "attention_mask", "position_ids", "segment_ids", "labels", "weights"}
    assert b["input_ids"].shape == (4, 32) and (b["attention_mask"] == (b["segment_ids"] > 0)).all()



def test_documents_are_held_out_with_the_example_rows_and_sample_prompts_come_from_them(tmp_path, tok):
    from ftjax import tasks
    from ftjax.data import batching

    rows = [{"prompt": f"question {i}:", "completion": f" the cat {i}"} for i in range(20)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg(f"files:{path}", num_samples=3)
    cfg.train.seed, cfg.data.validation_fraction = 5, 0.25
    bundle = tasks.build_data(cfg, tok)
    held, _ = batching.holdout_indices(20, 0.25, 5)  # the same rows ftjax.data holds out of example data
    assert bundle.sample_prompts == [rows[i]["prompt"] for i in held[:3]]


def test_causal_lm_batch_must_split_evenly_over_processes(tmp_path, tok):
    from ftjax import tasks
    from ftjax.config import ConfigError

    (tmp_path / "corpus.txt").write_text("\n".join(CORPUS * 3))
    cfg = _cfg(f"files:{tmp_path / 'corpus.txt'}", documents="line")
    cfg.train.batch_size = 3
    with pytest.raises(ConfigError, match="train.batch_size"):
        tasks.build_data(cfg, tok, process_index=0, process_count=2)


RECIPES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")


def _recipe(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(RECIPES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("recipe", ["causal_lm_text", "instruct_jsonl"])
def test_recipe_trains_two_steps_and_writes_samples(recipe, tmp_path, llama_dir):
    if recipe == "causal_lm_text":
        data_path = tmp_path / "corpus.txt"
        data_path.write_text("\n\n".join(CORPUS * 10))  # 40 paragraphs: 2 held out
    else:
        data_path = tmp_path / "train.jsonl"
        data_path.write_text(
            "".join(
                json.dumps({"prompt": f"say {i}:", "completion": f" {CORPUS[i % 4]}"}) + "\n"
                for i in range(16)
            )
        )
    module = _recipe(recipe)
    assert f"--config=configs/{recipe}.py:model=" in module.__doc__
    cfg = module.get_config(f"model={llama_dir},data={data_path},steps=2,batch=2,max_len=32")
    cfg.train.compilation_cache = ""
    cfg.train.progress = False
    cfg.train.checkpoint.async_save = False
    cfg.data.lm.num_samples = 2
    cfg.data.lm.sample_max_new_tokens = 4
    summary = trainer.train(cfg, str(tmp_path / "work"), devices=jax.devices()[:1])
    assert summary["steps"] == 2 and np.isfinite(summary["val"]["loss"])
    assert summary["val"]["perplexity"] == pytest.approx(np.exp(summary["val"]["loss"]), rel=1e-5)
    samples = os.listdir(tmp_path / "work" / "samples")
    assert samples, "no sample generations written"
    with open(tmp_path / "work" / "samples" / max(samples)) as f:
        lines = [json.loads(x) for x in f]
    assert len(lines) == 2 and all("generation" in x for x in lines)
