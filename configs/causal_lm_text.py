"""Causal-LM fine-tuning on plain text files (LoRA by default): documents packed into max_len rows.

    python -m ftjax.main --config=configs/causal_lm_text.py:model=/path/to/hf_llama,data=/path/to/corpus.txt \
        --workdir=/tmp/ftjax_clm_text

arg (comma-separated): model=HF folder of a decoder (llama, mistral, qwen2/3, gpt2) with its tokenizer;
data=a .txt file, glob or folder of .txt files (blank-line separated paragraphs are the documents);
lora=R adapter rank (default 8; lora=0 fine-tunes all params); steps=N; batch=B; max_len=L.
Eval reports loss and perplexity, and writes a few generations to WORKDIR/samples/. Export after training:
--mode=export (merged HF folder); the PEFT adapter: ftjax.lora.export_peft.
"""

from ftjax.config import default_config, parse_recipe_arg


def get_config(arg: str | None = None):
    args = parse_recipe_arg(arg)
    for key in ("model", "data"):
        if key not in args:
            raise ValueError(f"configs/causal_lm_text.py needs {key}=PATH in its arg, e.g. "
                             "--config=configs/causal_lm_text.py:model=/path/to/llama,data=/path/to/corpus.txt")
    c = default_config()
    c.model.name_or_path = args["model"]
    c.model.task = "causal_lm"
    c.data.source = f"files:{args['data']}"
    c.data.lm.format = "text"
    c.data.lm.documents = "paragraph"
    c.data.validation_fraction = 0.05
    c.data.max_len = int(args.get("max_len", 512))
    c.optim.lora.rank = int(args.get("lora", 8))
    c.optim.lora.alpha = 16.0
    c.optim.lora.dropout = 0.05
    c.optim.lora.targets = r".*/(q_proj|k_proj|v_proj|o_proj|c_attn)"
    c.optim.lr = 2e-4 if c.optim.lora.rank else 2e-5  # adapters take a ~10x larger LR than full fine-tuning
    c.optim.weight_decay = 0.0
    c.optim.schedule.type = "warmup_cosine"
    c.optim.schedule.warmup = 0.03
    c.train.batch_size = int(args.get("batch", 8))
    c.train.epochs = 1.0
    c.train.steps = int(args.get("steps", 0))
    c.train.early_stop.metric = "loss"
    return c
