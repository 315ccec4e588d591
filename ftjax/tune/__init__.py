"""Hyperparameter tuning: search spaces (`space`), Optuna sweeps (`study`, `sweep`, `report`), populations
of trials trained in one vmapped step (`population`) and the LR range test (`lr_find`).

    python -m ftjax.main --mode=sweep --config=configs/X.py --sweep=configs/sweeps/Y.py --workdir=DIR
"""
