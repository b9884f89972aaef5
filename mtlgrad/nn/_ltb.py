"""LTB: a tree of blocks whose branching is learned with Gumbel-softmax over parent choices."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn import Parameter

from mtlgrad.nn._base import MultiTaskModule, check_same_tasks, check_task_names
from mtlgrad.nn._experts import check_modules

__all__ = ["LTB"]


class LTB(MultiTaskModule):
    """Learning to Branch (Guo, Lee & Ulbricht, `Learning to branch for multi-task learning
    <https://arxiv.org/abs/2006.01895>`_, ICML 2020).

    A layered super-graph of blocks: layer 0's ``B_0`` blocks read the input, each of layer l's
    ``B_l`` blocks reads one parent among layer l-1's blocks, and each task's head reads one block
    of the last layer. Child c of layer l holds logits ``α_c`` over its parents; during training
    its input is the Gumbel-softmax relaxation of the choice::

        u_c = softmax((α_c + G) / τ),   G_p = -log(-log U_p),  U_p ~ Uniform(0, 1)
        input_c = Σ_p u_c,p output_p

    so the branching (which tasks share which blocks) is learned with the blocks, by gradient.
    ``hard=True`` uses the straight-through estimator (the one-hot ``argmax`` of ``u_c`` forward,
    the gradient of ``u_c`` backward; LibMTL's ``LTB`` does so). ``noise=False`` drops ``G``
    (deterministic ``softmax(α_c / τ)``, e.g. for a warm-up). In eval mode every child reads the
    parent of largest ``α_c``: the tree the search settles on, given by :meth:`branching`.

    The temperature ``τ`` is an attribute, annealed by the training loop (the paper anneals it
    towards 0); :meth:`temperature_schedule` gives LibMTL's ``τ = epochs / 20 / sqrt(epoch + 1)``.
    A child with a single possible parent has no logits. Logits start at 0 (every parent equally
    likely; LibMTL starts them all at 1, the same distribution).

    Partition: every block and the logits of the blocks' choices are shared (each task's output
    depends on them through the relaxed choices); task t's head and the logits of its head's
    choice are its own.

    Args:
        blocks: ``blocks[l]``, the candidate blocks of layer l (at least one per layer). The
            blocks of one layer must give outputs of one shape (a child mixes them).
        heads: one module per task, keyed by task name (the task order); each reads the last
            layer's output.
        temperature: the initial ``τ`` (positive).
        hard: straight-through one-hot choices during training.
        noise: add Gumbel noise during training.
        generator: draws the Gumbel noise, on the logits' device (the global generator when
            None).
    """

    def __init__(
        self,
        blocks: Sequence[Sequence[nn.Module]],
        heads: Mapping[str, nn.Module],
        *,
        temperature: float = 1.0,
        hard: bool = False,
        noise: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        owner = "LTB"
        if not isinstance(heads, Mapping):
            raise TypeError(f"{owner}: heads must be a dict {{task name: module}}")
        super().__init__(check_task_names(heads.keys(), owner))
        check_same_tasks(heads.keys(), self.task_names, "heads", owner)
        layers = list(blocks)
        if not layers:
            raise ValueError(f"{owner}: blocks must list at least one layer")
        checked = [check_modules(layer, f"blocks[{i}]", owner) for i, layer in enumerate(layers)]
        for name, flag in (("hard", hard), ("noise", noise)):
            if not isinstance(flag, bool):
                raise TypeError(f"{owner}: {name} must be a bool, got {flag!r}")
        self.blocks = nn.ModuleList(nn.ModuleList(layer) for layer in checked)
        self.widths = [len(layer) for layer in checked]
        # Logits of layer l's choices, (B_l, B_{l-1}), only where there is a choice.
        self.branch_logits = nn.ParameterDict(
            {
                str(i): Parameter(torch.zeros(self.widths[i], self.widths[i - 1]))
                for i in range(1, len(layers))
                if self.widths[i - 1] > 1
            }
        )
        self.head_logits = nn.ParameterDict(
            {name: Parameter(torch.zeros(self.widths[-1])) for name in self.task_names}
            if self.widths[-1] > 1
            else {}
        )
        self.heads = nn.ModuleDict({name: heads[name] for name in self.task_names})
        self.temperature = temperature
        self.hard = hard
        self.noise = noise
        self.generator = generator
        self.check_partition()

    @property
    def temperature(self) -> float:
        """τ, the Gumbel-softmax temperature (positive)."""
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"LTB: temperature must be a positive number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"LTB: temperature must be finite, got {value!r}")
        self._temperature = float(value)

    @staticmethod
    def temperature_schedule(epoch: int, epochs: int) -> float:
        """LibMTL's annealing, ``τ = epochs / 20 / sqrt(epoch + 1)`` (epochs counted from 0)."""
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"LTB: epochs must be a positive int, got {epochs!r}")
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"LTB: epoch must be a non-negative int, got {epoch!r}")
        return epochs / 20 / math.sqrt(epoch + 1)

    def choice_weights(self, logits: Tensor) -> Tensor:
        """The weights of the parents for logits ``α`` (last dimension: the parents): the
        relaxed, optionally noisy and hard choice in training mode, the argmax one-hot in eval
        mode."""
        if not self.training:
            index = logits.argmax(dim=-1, keepdim=True)
            return torch.zeros_like(logits).scatter_(-1, index, 1.0)
        scores = logits
        if self.noise:
            u = torch.rand(
                logits.shape, generator=self.generator, dtype=logits.dtype, device=logits.device
            )
            tiny = torch.finfo(logits.dtype).tiny
            gumbel = -torch.log((-torch.log(u.clamp_min(tiny))).clamp_min(tiny))
            scores = logits + gumbel
        soft = torch.softmax(scores / self.temperature, dim=-1)
        if not self.hard:
            return soft
        index = soft.argmax(dim=-1, keepdim=True)
        one_hot = torch.zeros_like(soft).scatter_(-1, index, 1.0)
        return one_hot - soft.detach() + soft

    def branching(self) -> dict[str, list[int]]:
        """The tree the logits settle on: ``{"layer l": parent of each block of layer l}`` for
        l >= 1, and ``{task: block of the last layer its head reads}``."""
        tree: dict[str, list[int]] = {}
        for i in range(1, len(self.widths)):
            logits = self.branch_logits.get(str(i))
            tree[f"layer {i}"] = (
                [0] * self.widths[i] if logits is None else logits.argmax(-1).tolist()
            )
        for name in self.task_names:
            tree[name] = [int(self.head_logits[name].argmax()) if self.head_logits else 0]
        return tree

    def _mix(
        self, outputs: list[Tensor], logits: Tensor | None, children: int, where: str
    ) -> list[Tensor]:
        """One input per child: ``Σ_p weights[c, p] outputs[p]`` (the single parent when there is
        no choice)."""
        if logits is None:
            return [outputs[0]] * children
        shapes = [list(o.shape) for o in outputs]
        if any(s != shapes[0] for s in shapes):
            raise ValueError(f"LTB: the blocks that {where} chooses among give shapes {shapes}")
        stacked = torch.stack(outputs, dim=-1)  # (..., parents)
        weights = self.choice_weights(logits).to(stacked.dtype)
        return [(stacked * w).sum(dim=-1) for w in weights.reshape(-1, len(outputs))]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        outputs = [block(x) for block in self.blocks[0]]
        for i in range(1, len(self.widths)):
            logits = self.branch_logits.get(str(i))
            inputs = self._mix(outputs, logits, self.widths[i], f"layer {i}")
            outputs = [block(h) for block, h in zip(self.blocks[i], inputs)]
        result = {}
        for name in self.task_names:
            logits = self.head_logits[name] if self.head_logits else None
            (h,) = self._mix(outputs, logits, 1, f"task {name!r}'s head")
            result[name] = self.heads[name](h)
        return result

    def extra_repr(self) -> str:
        return (
            f"task_names={self.task_names}, widths={self.widths}, "
            f"temperature={self.temperature}, hard={self.hard}, noise={self.noise}"
        )

    def _shared_parameter_list(self) -> list[Parameter]:
        return [*self.blocks.parameters(), *self.branch_logits.parameters()]

    def _task_parameter_list(self, name: str) -> list[Parameter]:
        own = [self.head_logits[name]] if self.head_logits else []
        return [*own, *self.heads[name].parameters()]
