"""Hyperparameters that change shapes or the program (batch size, freezing, dropout, epochs) of the MiniLM
recipe, one trial at a time; TPE with Hyperband pruning at each eval.

    python -m ftjax.main --mode=sweep --config=configs/minilm_food_reviews.py \
        --sweep=configs/sweeps/minilm_sequential.py --workdir=/tmp/ftjax_sweep_seq

Several machines share one sweep with arg "storage=postgresql://USER:PW@HOST/DB" (same command on each).
"""

from ftjax.config import parse_recipe_arg
from ftjax.tune import space


def get_sweep(arg=None):
    args = parse_recipe_arg(arg)
    return dict(  # noqa: C408 - reads like the other recipes' keyword style
        space={
            "optim.lr": space.loguniform(1e-5, 3e-4),
            "train.batch_size": space.choice(16, 32, 64),
            "optim.freeze_layers": space.choice("", "embeddings", "embeddings,0-1", "embeddings,0-3"),
            "model.dropout.hidden": space.uniform(0.0, 0.2),
            "train.epochs": space.int_range(1, 4),
            "optim.weight_decay": space.uniform(0.0, 0.1),
        },
        metric="accuracy",
        mode="max",
        sampler="tpe",
        pruner="hyperband",
        n_trials=int(args.get("n", 20)),
        storage=args.get("storage", ""),
    )
