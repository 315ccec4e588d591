"""Named-entity recognition (model.task="token_classification") on an encoder (BERT, RoBERTa, DistilBERT,
DeBERTa-v2/v3, ModernBERT): a tag per word, the loss on each word's first sub-word, entity-level F1 (seqeval's)
at each eval; exported as an HF AutoModelForTokenClassification with the tags as id2label.

    python -m ftjax.main --config=configs/ner.py:model=/path/to/hf_model,data=/path/to/conll_folder \
        --workdir=/tmp/ftjax_ner

arg (comma-separated): model=HF folder with its fast tokenizer; data=a CoNLL file or folder (train.txt,
valid.txt / dev.conll, test.txt: a word per line, the tag in the last column, blank lines between sentences) or
JSONL rows {"tokens": [...], "tags": [...]}; eval=the validation split's file stem (a folder's default "valid";
"" holds 10% of train out, a single file's default); test=the test split's stem (a folder's default "test"; "" =
none); epochs=E; batch=B (sentences); max_len=L; lr=LR. HF's run_ner defaults: lr 5e-5, 3 epochs, linear decay. Training keeps the checkpoint with the
best validation entity F1.
"""

import os

from ftjax.config import default_config, parse_recipe_arg


def get_config(arg: str | None = None):
    args = parse_recipe_arg(arg)
    for key in ("model", "data"):
        if key not in args:
            raise ValueError(f"configs/ner.py needs {key}=PATH in its arg, e.g. "
                             "--config=configs/ner.py:model=/path/to/model,data=/path/to/conll_folder")
    c = default_config()
    c.model.name_or_path = args["model"]
    c.model.task = "token_classification"
    c.data.source = f"files:{args['data']}"
    folder = os.path.isdir(os.path.expanduser(args["data"]))  # a single file: hold out validation, no test
    c.data.eval_split = args.get("eval", "valid" if folder else "")
    c.data.test_split = args.get("test", "test" if folder else "")
    c.data.validation_fraction = 0.1
    c.data.max_len = int(args.get("max_len", 128))
    c.optim.lr = float(args.get("lr", 5e-5))
    c.optim.schedule.type = "warmup_linear"
    c.optim.schedule.warmup = 0.0
    c.train.batch_size = int(args.get("batch", 16))
    c.train.epochs = float(args.get("epochs", 3))
    c.train.early_stop.metric = "entity_f1"
    c.train.early_stop.mode = "max"
    return c
