"""``mlgen experiment``: the paper's comparisons (arms) on one real test set, paired by seed."""

from typing import Any

from mlgen.experiment.arms import ARMS, select_arms

__all__ = ["ARMS", "run_experiment", "select_arms"]


def __getattr__(name: str) -> Any:
    """``run_experiment`` is imported on first use: the arms' names (for ``--help``) need no torch."""
    if name == "run_experiment":
        from mlgen.experiment.runner import run_experiment

        return run_experiment
    raise AttributeError(name)
