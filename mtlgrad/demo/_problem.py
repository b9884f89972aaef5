"""The built-in multi-task problem of ``mtlgrad demo``: generated on the fly, seeded, no download.

Regression tasks follow the synthetic set-up of GradNorm (Chen, Badrinarayanan, Lee & Rabinovich,
ICML 2018, `GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep Multitask
Networks <https://arxiv.org/abs/1711.02257>`_, Sec. 4): task ``i`` maps an input ``x`` to

    y_i = σ_i tanh((B + ε_i) x) + noise_i,

with one matrix ``B`` common to all tasks, a task-specific perturbation ``ε_i`` and a scale
``σ_i``. The paper draws the entries of ``B`` and ``ε_i`` from ``N(0, 10)`` and ``N(0, 3.5)``;
here their variances keep that 10 : 3.5 ratio but are divided by ``13.5 · d_in`` so that the
pre-activations have unit variance and ``tanh`` is not saturated. The scales ``σ_i`` span orders
of magnitude (so the losses do too, as ``σ_i²``), and each task has its own observation noise
(a fraction of ``σ_i``), which the paper does not have: it makes the tasks differ in how much of
their loss is irreducible, which is what uncertainty weighting models.

A classification task is added: its label is the argmax over classes of a random projection
``A tanh((B + ε_c) x)`` of a feature of the same family, with a few labels replaced at random.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["DemoModel", "DemoProblem", "Task", "make_problem", "task_loss"]


@dataclass(frozen=True)
class Task:
    """One task of the demo problem.

    Attributes:
        name: short name, used in tables and figures.
        kind: ``"regression"`` (MSE loss, normalised MSE metric, lower is better) or
            ``"classification"`` (cross-entropy loss, accuracy metric, higher is better).
        scale: ``σ_i`` of a regression task (1 for classification).
        noise: observation noise of a regression task as a fraction of ``σ_i``, or the fraction
            of labels replaced at random for classification.
        outputs: output width (the regression dimension, or the number of classes).
    """

    name: str
    kind: str
    scale: float
    noise: float
    outputs: int

    @property
    def metric(self) -> str:
        return "NMSE" if self.kind == "regression" else "accuracy"

    @property
    def lower_is_better(self) -> bool:
        return self.kind == "regression"


@dataclass
class DemoProblem:
    """Train and test splits of the demo problem: ``targets[t]`` is task ``t``'s targets."""

    tasks: list[Task]
    train_inputs: Tensor
    train_targets: list[Tensor]
    test_inputs: Tensor
    test_targets: list[Tensor]

    @property
    def input_dim(self) -> int:
        return self.train_inputs.shape[1]


# (name, σ_i, noise as a fraction of σ_i): four orders of magnitude of scale, different noise.
REGRESSION_TASKS = (
    ("reg-0.1", 0.1, 0.05),
    ("reg-1", 1.0, 0.5),
    ("reg-10", 10.0, 0.1),
    ("reg-100", 100.0, 0.25),
)
CLASSES = 4
LABEL_NOISE = 0.05


def make_problem(
    seed: int = 0,
    train_size: int = 2048,
    test_size: int = 1024,
    input_dim: int = 32,
    output_dim: int = 8,
) -> DemoProblem:
    """Draws the demo problem; the same ``seed`` gives the same tensors on every machine.

    Inputs are ``N(0, I)``; regression targets are ``output_dim``-dimensional.
    """
    gen = torch.Generator().manual_seed(seed)
    size = train_size + test_size
    x = torch.randn(size, input_dim, generator=gen)
    # The paper's variances 10 and 3.5, normalised so that (B + ε_i) x has unit variance.
    b_std = math.sqrt(10.0 / 13.5 / input_dim)
    eps_std = math.sqrt(3.5 / 13.5 / input_dim)
    B = b_std * torch.randn(output_dim, input_dim, generator=gen)

    tasks: list[Task] = []
    targets: list[Tensor] = []
    for name, sigma, noise in REGRESSION_TASKS:
        eps = eps_std * torch.randn(output_dim, input_dim, generator=gen)
        clean = sigma * torch.tanh(x @ (B + eps).T)
        targets.append(clean + noise * sigma * torch.randn(clean.shape, generator=gen))
        tasks.append(Task(name, "regression", sigma, noise, output_dim))

    eps = eps_std * torch.randn(output_dim, input_dim, generator=gen)
    A = torch.randn(CLASSES, output_dim, generator=gen)
    labels = (torch.tanh(x @ (B + eps).T) @ A.T).argmax(dim=1)
    flip = torch.rand(size, generator=gen) < LABEL_NOISE
    labels = torch.where(flip, torch.randint(CLASSES, (size,), generator=gen), labels)
    targets.append(labels)
    tasks.append(Task("class", "classification", 1.0, LABEL_NOISE, CLASSES))

    return DemoProblem(
        tasks=tasks,
        train_inputs=x[:train_size],
        train_targets=[y[:train_size] for y in targets],
        test_inputs=x[train_size:],
        test_targets=[y[train_size:] for y in targets],
    )


class DemoModel(nn.Module):
    """A shared trunk (two hidden ReLU layers) and one linear head per task."""

    def __init__(self, problem: DemoProblem, hidden: int = 64) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(problem.input_dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
        )
        self.heads = nn.ModuleList(nn.Linear(hidden, task.outputs) for task in problem.tasks)

    @property
    def last_shared_layer(self) -> nn.Linear:
        """The trunk's last linear layer (GradNorm's ``W``)."""
        return self.trunk[2]

    def forward(self, x: Tensor) -> list[Tensor]:
        z = self.trunk(x)
        return [head(z) for head in self.heads]


def task_loss(task: Task, prediction: Tensor, target: Tensor) -> Tensor:
    """MSE for a regression task, cross-entropy for classification."""
    if task.kind == "regression":
        return nn.functional.mse_loss(prediction, target)
    return nn.functional.cross_entropy(prediction, target)
