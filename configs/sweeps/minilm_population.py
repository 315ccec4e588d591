"""Shape-free hyperparameters of the MiniLM recipe, trained 8 at a time in one vmapped step (TPE, median pruning).

    python -m ftjax.main --mode=sweep --config=configs/minilm_food_reviews.py \
        --sweep=configs/sweeps/minilm_population.py --workdir=/tmp/ftjax_sweep_pop

arg: "k=N" population size (default 8), "n=N" trials (default 32).
"""

from ftjax.config import parse_recipe_arg
from ftjax.tune import space


def get_sweep(arg=None):
    args = parse_recipe_arg(arg)
    return dict(  # noqa: C408 - reads like the other recipes' keyword style
        space={
            "optim.lr": space.loguniform(1e-5, 3e-4),
            "optim.weight_decay": space.uniform(0.0, 0.1),
            "optim.schedule.type": space.choice("warmup_linear", "warmup_cosine"),
            "optim.schedule.warmup": space.uniform(0.0, 0.2),
            "optim.layer_lr_decay": space.uniform(0.7, 1.0),
            "train.label_smoothing": space.choice(0.0, 0.1),
        },
        metric="accuracy",
        mode="max",
        sampler="tpe",
        pruner="median",
        n_trials=int(args.get("n", 32)),
        population=int(args.get("k", 8)),
    )
