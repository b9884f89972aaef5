"""Test metrics of the demo and the multi-task summary Δm%."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mtlgrad.demo._problem import DemoModel, DemoProblem, task_loss

__all__ = ["delta_m", "evaluate"]


def delta_m(
    metrics: Sequence[float], baseline: Sequence[float], lower_is_better: Sequence[bool]
) -> float:
    """The average relative performance drop of a method against a baseline, in percent.

    ``Δm% = 100/T · Σ_t (−1)^{h_t} (M_{m,t} − M_{b,t}) / M_{b,t}``, with ``h_t = 1`` when a
    higher value of metric ``t`` is better (accuracy) and ``0`` when lower is better (error).
    This is the measure of Maninis, Radosavovic & Kokkinos (CVPR 2019, `Attentive
    Single-Tasking of Multiple Tasks <https://arxiv.org/abs/1904.08918>`_) and Vandenhende et al.
    (TPAMI 2021, `Multi-Task Learning for Dense Prediction Tasks: A Survey
    <https://arxiv.org/abs/2004.13379>`_), with the sign used by the gradient-combination papers
    (CAGrad, Liu et al. 2021; Nash-MTL, Navon et al. 2022; FAMO, Liu et al. 2023): it is a *drop*,
    so **lower is better** and a negative value means the method beats the baseline on average.
    (The survey writes the same quantity with the opposite sign, as a gain.)

    Args:
        metrics: the method's metric per task.
        baseline: the baseline's metric per task (nonzero).
        lower_is_better: per task, whether a lower value of its metric is better.
    """
    metrics, baseline, lower_is_better = list(metrics), list(baseline), list(lower_is_better)
    if not metrics or not len(metrics) == len(baseline) == len(lower_is_better):
        raise ValueError(
            "delta_m needs one metric, one baseline value and one direction per task; got "
            f"{len(metrics)}, {len(baseline)} and {len(lower_is_better)}"
        )
    total = 0.0
    for t, (m, b, lower) in enumerate(zip(metrics, baseline, lower_is_better)):
        if b == 0:
            raise ValueError(f"delta_m: the baseline's metric of task {t} is 0 (it divides)")
        relative = (m - b) / abs(b)
        total += relative if lower else -relative
    return 100.0 * total / len(metrics)


@torch.no_grad()
def evaluate(model: DemoModel, problem: DemoProblem) -> tuple[list[float], list[float]]:
    """Test losses and test metrics per task.

    Regression: the MSE and the normalised MSE (MSE divided by the variance of the test targets,
    i.e. ``1 − R²``: comparable across tasks of any scale). Classification: the cross-entropy and
    the accuracy in percent.
    """
    was_training = model.training
    model.eval()
    predictions = model(problem.test_inputs)
    model.train(was_training)
    losses, metrics = [], []
    for task, prediction, target in zip(problem.tasks, predictions, problem.test_targets):
        loss = float(task_loss(task, prediction, target))
        losses.append(loss)
        if task.kind == "regression":
            metrics.append(loss / float(target.var(dim=0, unbiased=False).mean()))
        else:
            metrics.append(100.0 * float((prediction.argmax(dim=1) == target).float().mean()))
    return losses, metrics
