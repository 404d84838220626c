"""Evaluating a backbone, kept apart from pretraining: kNN, the linear probe and its search,
fine-tuning, and the online evaluator a pretraining method carries."""

from selfsup.evaluation.features import Features
from selfsup.evaluation.finetune import FineTune
from selfsup.evaluation.knn_stage import KNNEvaluation
from selfsup.evaluation.linear import LinearProbe
from selfsup.evaluation.online import OnlineSpec
from selfsup.evaluation.probe_search import ProbeSearch

#: Evaluation stages by the names the pipeline's ``evaluations`` use in the shipped configs.
EVALUATIONS = {"linear": LinearProbe, "knn": KNNEvaluation, "finetune": FineTune}

__all__ = ["EVALUATIONS", "Features", "FineTune", "KNNEvaluation", "LinearProbe", "OnlineSpec", "ProbeSearch"]
