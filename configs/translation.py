"""Translation or summarisation: fine-tune an encoder-decoder (T5, BART, Marian) on (source, target) pairs,
scored at each eval by generating (beam search) for validation sources: sacreBLEU + chrF, or ROUGE-1/2/L.

    python -m ftjax.main --config=configs/translation.py:model=/path/to/opus-mt-en-de,data=/path/to/pairs.jsonl \
        --workdir=/tmp/ftjax_translation

Offline in a few minutes on a CPU, a tiny random T5 learning to copy word sequences (BLEU climbs from ~0):

    python -m tests.test_seq2seq_train /tmp/ftjax_s2s     # writes /tmp/ftjax_s2s/{model,data}
    python -m ftjax.main --config=configs/translation.py:model=/tmp/ftjax_s2s/model,data=/tmp/ftjax_s2s/data,\
eval=validation,steps=600,lr=3e-3,batch=32,max_len=16,max_target_len=16,beams=1 --workdir=/tmp/ftjax_s2s/workdir

arg (comma-separated): model=HF folder of t5 / bart / marian with its tokenizer (needs pip install
'ftjax[seq2seq]' for the scores); data=JSONL/CSV/TSV/Parquet file, glob or folder with `source` and `target`
columns (or prompt / completion); eval=split file stem (default: hold out 5% of train); steps=N (default: 3
epochs); batch=B (32); lr (1e-4; T5 often takes 3e-4, BART / Marian 3e-5); max_len=L (source tokens, 128);
max_target_len=T (128); beams=K (4; 1 = greedy); prefix="translate English to German: " (T5 task prefix);
metrics=bleu (sacreBLEU + chrF, early stopping on bleu) or rouge (ROUGE-1/2/L, early stopping on rougeL);
eval_examples=N (200 sources generated per eval). Generations: WORKDIR/samples/step_N.jsonl.
"""

from ftjax.config import default_config, parse_recipe_arg

METRICS = {"bleu": (("bleu", "chrf"), "bleu"), "rouge": (("rouge1", "rouge2", "rougeL"), "rougeL")}


def get_config(arg: str | None = None):
    args = parse_recipe_arg(arg)
    for key in ("model", "data"):
        if key not in args:
            raise ValueError(f"configs/translation.py needs {key}=PATH in its arg, e.g. "
                             "--config=configs/translation.py:model=/path/to/t5,data=/path/to/pairs.jsonl")
    if args.get("metrics", "bleu") not in METRICS:
        raise ValueError(f"configs/translation.py: metrics={args['metrics']!r} is invalid: bleu or rouge")
    metrics, early_metric = METRICS[args.get("metrics", "bleu")]
    c = default_config()
    c.model.name_or_path = args["model"]
    c.model.task = "seq2seq"
    c.data.source = f"files:{args['data']}"
    c.data.eval_split = args.get("eval", "")
    c.data.validation_fraction = 0.05
    c.data.max_len = int(args.get("max_len", 128))
    s = c.data.seq2seq
    s.max_target_len = int(args.get("max_target_len", 128))
    s.source_prefix = args.get("prefix", "")
    s.num_beams = int(args.get("beams", 4))
    s.eval_examples = int(args.get("eval_examples", 200))
    s.metrics = metrics
    c.optim.lr = float(args.get("lr", 1e-4))
    c.optim.weight_decay = 0.01
    c.optim.schedule.type = "warmup_linear"
    c.optim.schedule.warmup = 0.05
    c.train.batch_size = int(args.get("batch", 32))
    c.train.epochs = 3.0
    c.train.steps = int(args.get("steps", 0))
    c.train.label_smoothing = 0.1
    c.train.early_stop.metric = early_metric
    c.train.early_stop.mode = "max"
    # Run.batch_structs compiles one program per bucket length of one sequence axis; seq2seq batches have
    # (source, target) pairs, which compile on first use instead.
    c.train.precompile = False
    return c
