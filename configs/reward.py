"""A reward model: a scalar head on a decoder (its last real token) or an encoder, trained on preference pairs with
the Bradley-Terry loss; exported as an HF AutoModelForSequenceClassification with num_labels=1.

    python -m ftjax.main --config=configs/reward.py:model=/path/to/hf_model,data=/path/to/pairs.jsonl \
        --workdir=/tmp/ftjax_reward

arg (comma-separated): model=HF folder with its tokenizer (a decoder needs pad_token_id in its config.json);
data=a .jsonl file (or a folder of train/validation/test files) of rows {"prompt", "chosen", "rejected"},
strings or chat message lists; lora=R (default 0: full fine-tuning; R > 0: LoRA, the head trains in full);
steps=N; batch=B (pairs); max_len=L; lr=LR. Eval reports the loss, the pairwise accuracy and the mean margin;
training keeps the checkpoint with the best validation accuracy.
"""

from ftjax.config import default_config, parse_recipe_arg


def get_config(arg: str | None = None):
    args = parse_recipe_arg(arg)
    for key in ("model", "data"):
        if key not in args:
            raise ValueError(f"configs/reward.py needs {key}=PATH in its arg, e.g. "
                             "--config=configs/reward.py:model=/path/to/model,data=/path/to/pairs.jsonl")
    c = default_config()
    c.model.name_or_path = args["model"]
    c.model.task = "reward"
    c.data.source = f"files:{args['data']}"
    c.data.validation_fraction = 0.1
    c.data.max_len = int(args.get("max_len", 512))
    c.optim.lora.rank = int(args.get("lora", 0))
    if c.optim.lora.rank:
        c.optim.lora.alpha = 2.0 * c.optim.lora.rank
        c.optim.lora.targets = "all-linear"
    c.optim.lr = float(args.get("lr", 1e-4 if c.optim.lora.rank else 1e-5))
    c.optim.schedule.type = "warmup_cosine"
    c.optim.schedule.warmup = 0.1
    c.train.batch_size = int(args.get("batch", 8))
    c.train.epochs = 1.0
    c.train.steps = int(args.get("steps", 0))
    c.train.early_stop.metric = "accuracy"
    c.train.early_stop.mode = "max"
    c.forgetting.monitors = ()
    return c
