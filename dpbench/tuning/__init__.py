"""``dpbench tune``: equal-budget hyperparameter search on validation splits (Optuna, SQLite).

``recipes_file`` (reading and writing tuned recipes) needs no Optuna; ``space``, ``study`` and
``runner`` do, and are imported only by ``dpbench tune``.
"""
