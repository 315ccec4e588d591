"""model.task="token_classification": CoNLL files and JSONL rows become sub-word rows labelled on each word's first
sub-word (-100 elsewhere, HF run_ner's convention), the entity spans the eval step counts on device equal seqeval's
(ill-formed sequences included), and a tiny BERT learns a synthetic NER task (entity F1 rises) and exports what
transformers loads as a token classifier with equal logits."""

from __future__ import annotations

import json
import random
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

from ftjax import main, metrics, models, tasks, trainer
from ftjax.config import default_config, with_overrides
from ftjax.data import DataError
from tests import tiny

seqeval = pytest.importorskip("seqeval.metrics")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CONLL_TRAIN = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
snowboarding NN I-NP O
Johannesburg NNP B-NP B-LOC
. . O O

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER
"""
CONLL_DEV = """Unaffable JJ B-NP O
Peter NNP B-NP B-PER

-DOCSTART- -X- -X- O

Blackburn NNP B-NP B-PER
visits VBZ B-VP O
EU NNP B-NP B-ORG
"""


@pytest.fixture(scope="module")
def tokenizer():
    return models.load_tokenizer(tiny.MINILM)


def _config(source: str, **overrides):
    c = default_config()
    c.model.name_or_path = tiny.MINILM
    c.model.task = "token_classification"
    c.data.source = source
    c.train.batch_size = 2
    return with_overrides(c, overrides)


def _expected_row(tokenizer, words: list[str], tag_ids: list[int], max_len: int = 128) -> tuple[list, list]:
    """(input ids, labels) built word by word: [CLS], each word's sub-words with its tag on the first, [SEP]."""
    ids, labels = [tokenizer.cls_token_id], [-100]
    for word, tag in zip(words, tag_ids):
        pieces = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(word))
        ids += pieces
        labels += [tag] + [-100] * (len(pieces) - 1)
    ids, labels = ids[: max_len - 1], labels[: max_len - 1]
    return ids + [tokenizer.sep_token_id], labels + [-100]


def _rows(bundle, split: str) -> dict[int, tuple[list, list]]:
    """{example index: (input ids, labels)} of a split's eval batches, padding stripped."""
    order, out = iter(bundle.eval_order(split)), {}
    for batch in bundle.eval_batches(split):
        for ids, mask, labels, w in zip(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                        batch["weights"]):
            if w:
                n = int(mask.sum())
                assert (labels[n:] == -100).all()
                out[int(next(order))] = (ids[:n].tolist(), labels[:n].tolist())
    return out


def test_conll_files_are_labelled_on_each_words_first_subword(tmp_path, tokenizer):
    (tmp_path / "train.conll").write_text(CONLL_TRAIN)
    (tmp_path / "dev.txt").write_text(CONLL_DEV)  # .txt files are CoNLL too
    bundle = tasks.build_data(_config(f"files:{tmp_path}", **{"data.eval_split": "dev"}), tokenizer)
    names = ["B-LOC", "B-ORG", "B-PER", "I-PER", "O"]  # train's tags, sorted
    assert bundle.label_names == names
    t = {n: i for i, n in enumerate(names)}
    train = [(["EU", "rejects", "snowboarding", "Johannesburg", "."], ["B-ORG", "O", "O", "B-LOC", "O"]),
             (["Peter", "Blackburn"], ["B-PER", "I-PER"])]
    dev = [(["Unaffable", "Peter"], ["O", "B-PER"]), (["Blackburn", "visits", "EU"], ["B-PER", "O", "B-ORG"])]
    assert any(len(tokenizer.tokenize(w)) > 1 for w in ("snowboarding", "Johannesburg", "Unaffable"))
    for split, sentences in (("train", train), ("validation", dev)):
        if split == "train":  # the train batches, in their seeded order
            batch = next(bundle.train_iterator())
            got = {}
            for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
                n = int(mask.sum())
                got[len(got)] = (ids[:n].tolist(), labels[:n].tolist())
            got = sorted(got.values())
            want = sorted(_expected_row(tokenizer, w, [t[x] for x in tags]) for w, tags in sentences)
            assert got == want
        else:
            rows = _rows(bundle, split)
            for i, (words, tags) in enumerate(sentences):
                assert rows[i] == _expected_row(tokenizer, words, [t[x] for x in tags])
    assert bundle.stats["examples"] == {"train": 2, "validation": 2}
    assert bundle.stats["tag_counts"]["validation"] == {"B-LOC": 0, "B-ORG": 1, "B-PER": 2, "I-PER": 0, "O": 2}


def test_jsonl_rows_with_id_or_string_tags_and_truncation_counted(tmp_path, tokenizer):
    rows = [{"tokens": ["Peter", "Blackburn", "rejects", "snowboarding", "in", "Johannesburg", "again", "today"],
             "tags": [1, 2, 0, 0, 0, 3, 0, 0]},
            {"tokens": ["EU", "visits"], "tags": [1, 0]},
            {"tokens": ["Unaffable"], "tags": [0]}]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    max_len = 8
    cfg = _config(f"files:{path}", **{"data.max_len": max_len, "data.buckets": (8,), "data.validation_fraction": 0.4})
    bundle = tasks.build_data(cfg, tokenizer)
    assert bundle.label_names == ["0", "1", "2", "3"]  # ids, sorted as numbers
    got = {**_rows(bundle, "validation")}
    batch = next(bundle.train_iterator())
    train_rows = [(ids[: int(m.sum())].tolist(), lab[: int(m.sum())].tolist())
                  for ids, m, lab, w in zip(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                            batch["weights"]) if w]
    want = [_expected_row(tokenizer, r["tokens"], r["tags"], max_len) for r in rows]
    assert sorted(train_rows + list(got.values())) == sorted(want)
    # The long sentence keeps max_len - 2 sub-words: the words whose first sub-word starts past them are lost.
    starts = np.cumsum([0] + [len(tokenizer.tokenize(w)) for w in rows[0]["tokens"]])[:-1]
    lost = int((starts >= max_len - 2).sum())
    assert lost >= 2
    stats = bundle.stats
    assert sum(stats["truncated"].values()) == 1 and sum(stats["truncated_words"].values()) == lost
    # String tags read the same; a row whose lists differ in length is named.
    rows[1]["tags"] = ["B-ORG", "O"]
    rows[0]["tags"], rows[2]["tags"] = ["O"] * 8, ["O", "O"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match="row 2 of .*1 words but 2 tags"):
        tasks.build_data(cfg, tokenizer)


NAMES = ["O", "B-PER", "I-PER", "E-PER", "S-PER", "B-LOC", "I-LOC", "B-MISC-X", "I-MISC-X", "B", "I"]


def _seqeval_counts(gold: list[list[str]], pred: list[list[str]]) -> dict[str, int]:
    from seqeval.metrics.sequence_labeling import get_entities

    g, p = set(get_entities(gold)), set(get_entities(pred))  # spans over the corpus (sentences joined by "O")
    return {"entities_pred": len(p), "entities_gold": len(g), "entities_correct": len(g & p)}


def _ids(tags: list[str]) -> jnp.ndarray:
    return jnp.asarray([[NAMES.index(x) for x in tags]])


def test_entity_counts_on_device_equal_seqeval_on_random_ill_formed_sequences():
    table = metrics.entity_tag_table(NAMES)
    rng = np.random.default_rng(0)
    rows, length = 48, 20
    for trial in range(12):
        gold = rng.integers(0, len(NAMES), (rows, length))
        pred = rng.integers(0, len(NAMES), (rows, length))
        if trial % 2:  # mostly right: many spans match
            pred = np.where(rng.random((rows, length)) < 0.8, gold, pred)
        labelled = rng.random((rows, length)) < 0.7  # the other positions: later sub-words, specials, padding
        weights = (rng.random(rows) < 0.9).astype(np.float32)  # weight-0 rows: padding examples
        got = metrics.entity_counts(jnp.asarray(pred), jnp.asarray(gold), jnp.asarray(labelled), jnp.asarray(weights),
                                    table)
        words = [(g[m], p[m]) for g, p, m, w in zip(gold, pred, labelled, weights) if w]
        y_true = [[NAMES[i] for i in g] for g, _ in words]
        y_pred = [[NAMES[i] for i in p] for _, p in words]
        want = _seqeval_counts(y_true, y_pred)
        assert {k: float(v) for k, v in got.items()} == want
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # seqeval warns about the tags "B" and "I" without a type
            reference = (seqeval.precision_score(y_true, y_pred), seqeval.recall_score(y_true, y_pred),
                         seqeval.f1_score(y_true, y_pred))
        m = metrics.entity_metrics(*(want[k] for k in ("entities_pred", "entities_gold", "entities_correct")))
        np.testing.assert_allclose((m["entity_precision"], m["entity_recall"], m["entity_f1"]), reference, rtol=1e-12)
    # The rules that differ between schemes, one by one (I- after O or after another type begins a span).
    for gold, pred in ((["O", "I-PER", "I-PER"], ["B-PER", "I-PER", "I-PER"]),
                       (["B-PER", "I-LOC", "I-LOC"], ["B-PER", "B-LOC", "I-LOC"]),
                       (["B-PER", "E-PER", "I-PER"], ["S-PER", "B-PER", "E-PER"])):
        got = metrics.entity_counts(_ids(pred), _ids(gold), jnp.ones((1, 3), bool), jnp.ones(1), table)
        assert {k: float(v) for k, v in got.items()} == _seqeval_counts([gold], [pred]), (gold, pred)


def test_the_task_reports_token_accuracy_and_entity_metrics_only_for_entity_tags():
    task = tasks.get("token_classification")
    labels = np.asarray([[-100, 1, 2, -100, 0, -100], [-100, 0, 1, -100, -100, -100]])
    pred = np.asarray([[0, 1, 2, 0, 1, 0], [0, 0, 1, 2, 0, 0]])
    batch = {"labels": jnp.asarray(labels), "weights": jnp.asarray([1.0, 1.0])}
    out = {"logits": jax_one_hot(pred, 3)}
    ner = task.with_labels(["O", "B-PER", "I-PER"])
    sums = {k: float(v) for k, v in ner.eval_sums(out, batch).items()}
    result = ner.metrics(1.0, 5.0, sums)  # 5 labelled words, 4 right
    assert result["token_accuracy"] == pytest.approx(4 / 5)
    # gold spans: PER (row 0, words 1-2), PER (row 1, word 2); predicted: those two and PER (row 0, word 3)
    assert (result["entity_precision"], result["entity_recall"]) == (pytest.approx(2 / 3), 1.0)
    assert result["entity_f1"] == pytest.approx(0.8)
    pos = task.with_labels(["DET", "NOUN", "VERB"])  # not entity tags: token accuracy only
    assert pos.entity_tags is None
    assert set(pos.metrics(1.0, 5.0, {k: float(v) for k, v in pos.eval_sums(out, batch).items()})) == {
        "loss", "token_accuracy"}


def jax_one_hot(ids: np.ndarray, classes: int) -> jnp.ndarray:
    return jnp.asarray(np.eye(classes, dtype=np.float32)[ids])


FIRST = ["alice", "peter", "maria", "john", "anna", "paul", "laura", "david"]
LAST = ["smith", "jones", "brown", "miller", "wilson", "taylor"]
CITIES = ["paris", "london", "berlin", "madrid", "rome", "vienna"]
FILLER = ["the", "met", "in", "today", "and", "went", "to", "with", "a", "friend", "from", "visited", "saw", "then"]


def ner_jsonl(path, n: int, seed: int) -> str:
    """Sentences of filler words with people (first name, sometimes a surname: B-PER I-PER) and cities (B-LOC)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            words, tags = [], []
            for _ in range(rng.randint(3, 8)):
                r = rng.random()
                if r < 0.2:
                    name = [rng.choice(FIRST)] + ([rng.choice(LAST)] if rng.random() < 0.5 else [])
                    words += name
                    tags += ["B-PER"] + ["I-PER"] * (len(name) - 1)
                elif r < 0.3:
                    words.append(rng.choice(CITIES))
                    tags.append("B-LOC")
                else:
                    words.append(rng.choice(FILLER))
                    tags.append("O")
            f.write(json.dumps({"tokens": words, "tags": tags}) + "\n")
    return str(path)


def test_a_tiny_bert_learns_entities_and_exports_a_token_classifier(tmp_path):
    from configs.ner import get_config

    model_dir = tiny.tiny_bert(str(tmp_path / "bert"))
    data = tmp_path / "data"
    data.mkdir()
    ner_jsonl(data / "train.jsonl", 192, 0)
    ner_jsonl(data / "valid.jsonl", 48, 1)
    ner_jsonl(data / "test.jsonl", 32, 2)
    cfg = get_config(f"model={model_dir},data={data},batch=16,max_len=32,lr=2e-3,epochs=3")
    cfg.data.buckets = (16, 32)
    cfg.train.eval_every, cfg.train.progress, cfg.train.precompile = 6, False, False
    cfg.train.compilation_cache, cfg.train.checkpoint.async_save = "", False
    cfg.forgetting.monitors = ()
    summary = trainer.train(cfg, str(tmp_path / "run"))
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    evals = [x for x in map(json.loads, lines) if x["split"] == "val"]
    assert evals[-1]["entity_f1"] > 0.9 and evals[0]["entity_f1"] < 0.5, [e["entity_f1"] for e in evals]
    assert evals[-1]["token_accuracy"] > 0.95
    assert summary["test"]["entity_f1"] > 0.9 and {"entity_precision", "entity_recall"} <= set(summary["test"])
    # --mode=export writes what transformers loads as a token classifier, with the tags as its labels.
    flags.FLAGS(["ftjax", f"--export_dir={tmp_path / 'export'}"])
    try:
        main._export(cfg, str(tmp_path / "run"))
    finally:
        flags.FLAGS.unparse_flags()
    out = str(tmp_path / "export")
    hf = transformers.AutoModelForTokenClassification.from_pretrained(out).eval()
    assert hf.config.id2label == {0: "B-LOC", 1: "B-PER", 2: "I-PER", 3: "O"}
    model = models.from_pretrained(out, task="token_classification")
    tok = models.load_tokenizer(out)
    enc = tok([["peter", "smith", "went", "to", "rome"], ["the", "friend"]], is_split_into_words=True,
              padding=True, return_tensors="np")
    with torch.no_grad():
        want = hf(**{k: torch.tensor(v) for k, v in enc.items()}).logits.numpy()
    got = np.asarray(model(**dict(enc))["logits"])
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert got[0, 1:6].argmax(-1).tolist() == [1, 2, 3, 3, 0]  # B-PER I-PER O O B-LOC
