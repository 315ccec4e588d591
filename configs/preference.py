"""Preference tuning of a decoder (DPO by default, LoRA; the reference is the base with the adapters off).

    python -m ftjax.main --config=configs/preference.py:model=/path/to/hf_decoder,data=/path/to/pairs.jsonl \
        --workdir=/tmp/ftjax_dpo

arg (comma-separated): model=HF folder of a decoder with its tokenizer; data=a .jsonl file (or a folder of
train/validation/test files) of rows {"prompt", "chosen", "rejected"}, strings or chat message lists;
loss=dpo|ipo|hinge|orpo|simpo; beta=B; lora=R (default 16; lora=0 only with orpo / simpo); steps=N; batch=B
(pairs); max_len=L; forgetting=weight_drift+pretrain (the default: "+"-separated forgetting monitors, 0 = off).
Eval reports the loss, reward_accuracy, reward_margin and the chosen / rejected log-probs; training keeps the
checkpoint with the best validation reward_accuracy. The forgetting monitors log what the alignment costs at
step 0 and each eval: the weight drift (LoRA: of the merged weights) and the perplexity of the reference text
(`lm_perplexity`, through the run's own causal-LM forward; `forgetting.reference` picks the text).
"""

from ftjax.config import default_config, parse_recipe_arg


def get_config(arg: str | None = None):
    args = parse_recipe_arg(arg)
    for key in ("model", "data"):
        if key not in args:
            raise ValueError(f"configs/preference.py needs {key}=PATH in its arg, e.g. "
                             "--config=configs/preference.py:model=/path/to/decoder,data=/path/to/pairs.jsonl")
    c = default_config()
    c.model.name_or_path = args["model"]
    c.model.task = "preference"
    c.data.source = f"files:{args['data']}"
    c.data.validation_fraction = 0.1
    c.data.max_len = int(args.get("max_len", 512))
    c.preference.loss = args.get("loss", "dpo")
    c.preference.beta = float(args.get("beta", 2.0 if c.preference.loss == "simpo" else 0.1))
    c.optim.lora.rank = int(args.get("lora", 16))
    c.optim.lora.alpha = 2.0 * c.optim.lora.rank
    c.optim.lora.targets = "all-linear"
    c.optim.lr = 5e-5 if c.optim.lora.rank else 5e-7
    c.optim.weight_decay = 0.0
    c.optim.schedule.type = "warmup_cosine"
    c.optim.schedule.warmup = 0.1
    c.train.batch_size = int(args.get("batch", 8))
    c.train.epochs = 1.0
    c.train.steps = int(args.get("steps", 0))
    c.train.early_stop.metric = "reward_accuracy"
    c.train.early_stop.mode = "max"
    monitors = args.get("forgetting", "weight_drift+pretrain")
    c.forgetting.monitors = () if monitors in ("0", "off", "") else tuple(monitors.split("+"))
    return c
