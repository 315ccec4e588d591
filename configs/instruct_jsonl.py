"""Instruction tuning (LoRA by default) on JSONL: {"prompt", "completion"} rows or chat {"messages": [...]}
rendered with the tokenizer's chat template; the loss is on completions / assistant replies only.

    python -m ftjax.main --config=configs/instruct_jsonl.py:model=/path/to/hf_llama,data=/path/to/train.jsonl \
        --workdir=/tmp/ftjax_instruct

arg (comma-separated): model=HF folder of a decoder with its tokenizer; data=a .jsonl file (or a folder with
train.jsonl [+ validation.jsonl]); lora=R adapter rank (default 16; lora=0 = full fine-tuning); steps=N;
batch=B; max_len=L. Examples are packed (segment ids keep them apart); eval: loss, perplexity, samples.
"""

import os

from ftjax.config import default_config, parse_recipe_arg


def get_config(arg: str | None = None):
    args = parse_recipe_arg(arg)
    for key in ("model", "data"):
        if key not in args:
            raise ValueError(f"configs/instruct_jsonl.py needs {key}=PATH in its arg, e.g. "
                             "--config=configs/instruct_jsonl.py:model=/path/to/llama,data=/path/to/train.jsonl")
    c = default_config()
    c.model.name_or_path = args["model"]
    c.model.task = "causal_lm"
    c.data.source = f"files:{args['data']}"
    folder = os.path.expanduser(args["data"])
    if os.path.isdir(folder) and os.path.exists(os.path.join(folder, "validation.jsonl")):
        c.data.eval_split = "validation"
    c.data.lm.format = "instruct"
    c.data.max_len = int(args.get("max_len", 1024))
    c.optim.lora.rank = int(args.get("lora", 16))
    c.optim.lora.alpha = 32.0
    c.optim.lora.dropout = 0.05
    c.optim.lora.targets = r".*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|c_attn|c_proj|c_fc)"
    c.optim.lr = 2e-4 if c.optim.lora.rank else 2e-5
    c.optim.weight_decay = 0.0
    c.optim.schedule.type = "warmup_cosine"
    c.optim.schedule.warmup = 0.03
    c.train.batch_size = int(args.get("batch", 8))
    c.train.epochs = 3.0
    c.train.steps = int(args.get("steps", 0))
    return c
