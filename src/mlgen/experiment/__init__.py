"""``mlgen experiment``: the paper's comparisons (arms) on one real test set, paired by seed."""

from mlgen.experiment.arms import ARMS, select_arms
from mlgen.experiment.runner import run_experiment

__all__ = ["ARMS", "run_experiment", "select_arms"]
