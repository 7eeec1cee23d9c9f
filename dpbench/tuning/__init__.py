"""``dpbench tune``: equal-budget hyperparameter search on validation splits (Optuna, SQLite).

``recipes_file`` (reading and writing tuned recipes) needs no Optuna; ``space``, ``runner``, ``plots``
and ``summary`` import it, and only ``dpbench tune`` and reports of tuned rows import them.
"""
