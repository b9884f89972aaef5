"""Joint many-task model: tasks stacked by depth, shortcut connections to the input
representation, label embeddings, and successive regularisation."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.nn import Parameter

from mtlgrad.nn._base import MultiTaskModule, check_same_tasks, check_task_names

__all__ = ["JointManyTaskModel"]


class JointManyTaskModel(MultiTaskModule):
    """Joint many-task model (Hashimoto, Xiong, Tsuruoka & Socher, `A joint many-task model:
    growing a neural network for multiple NLP tasks <https://arxiv.org/abs/1611.01587>`_, EMNLP
    2017).

    The tasks are stacked by depth, in the order of ``layers`` (POS tagging, then chunking, then
    dependency parsing, ... in the paper): task k has a layer of its own whose output ``h_k``
    feeds its head and the layer above. Layer k reads the concatenation (last dimension) of the
    layer below's output, the shortcut to the input representation ``e = embedding(x)``, and the
    label embedding of the task below when it has one::

        h_1 = layer_1(e),   h_k = layer_k([h_{k-1}, e, y_{k-1}])
        y_k = label_embedding_k(softmax(head_k(h_k)))       (the paper's Σ_j p(j | h_k) ℓ(j))
        output_k = head_k(h_k)

    (``shortcuts=False`` drops ``e`` from the layers above the first.) The paper's layers are
    bi-LSTMs; any module from ``(..., d_in)`` to ``(..., d_k)`` fits (wrap an ``nn.LSTM`` to
    return its output tensor).

    Successive regularisation: the paper trains the tasks one after the other in each epoch,
    penalising task k's update for moving the layers below it away from where the task below
    left them, ``δ ||θ_below(k) - θ'_below(k)||²``. Here the tasks train jointly;
    :meth:`remember_parameters` records ``θ'`` (e.g. at the start of an epoch) and
    :meth:`successive_penalty` gives the term for one task, to add to that task's loss (so it is
    part of its row of the Jacobian that the aggregator combines). The paper's ``λ ||W_k||²`` is
    weight decay, the optimizer's.

    Partition, from what each output depends on: layer k serves tasks k..T; head k serves task k
    and, through its label embedding, the tasks above; label embedding k serves tasks k+1..T. A
    module that serves two tasks or more is shared (the embedding, every layer but the last, the
    heads with a label embedding); one serving a single task is that task's (the last layer and
    head, a head without label embedding, the label embedding just below the last task). A
    shared module may serve some of the tasks only: the lower tasks' gradients are zero on the
    layers above them.

    Args:
        embedding: the input representation ``e`` (shared by every task).
        layers: one module per task, keyed by task name, lowest first (the task order).
        heads: one module per task, keyed by task name.
        label_embeddings: ``{task: module}`` for the tasks whose predicted label distribution
            feeds the layer above (not the last task), e.g. ``nn.Linear(labels, d, bias=False)``.
        shortcuts: feed ``e`` to every layer (the paper's shortcut connections).
    """

    def __init__(
        self,
        embedding: nn.Module,
        layers: Mapping[str, nn.Module],
        heads: Mapping[str, nn.Module],
        label_embeddings: Mapping[str, nn.Module] | None = None,
        shortcuts: bool = True,
    ) -> None:
        owner = "JointManyTaskModel"
        if not isinstance(embedding, nn.Module):
            raise TypeError(f"{owner}: embedding must be an nn.Module")
        if not isinstance(layers, Mapping) or not isinstance(heads, Mapping):
            raise TypeError(f"{owner}: layers and heads must be dicts {{task name: module}}")
        super().__init__(check_task_names(layers.keys(), owner))
        check_same_tasks(heads.keys(), self.task_names, "heads", owner)
        label_embeddings = dict(label_embeddings or {})
        for name in label_embeddings:
            self.check_task(name)
            if name == self.task_names[-1]:
                raise ValueError(
                    f"{owner}: task {name!r} is the last one; no layer reads its label embedding"
                )
        if not isinstance(shortcuts, bool):
            raise TypeError(f"{owner}: shortcuts must be a bool, got {shortcuts!r}")
        self.embedding = embedding
        self.layers = nn.ModuleDict({name: layers[name] for name in self.task_names})
        self.heads = nn.ModuleDict({name: heads[name] for name in self.task_names})
        self.label_embeddings = nn.ModuleDict(
            {n: label_embeddings[n] for n in self.task_names if n in label_embeddings}
        )
        self.shortcuts = shortcuts
        self._anchor: dict[str, Tensor] | None = None
        self.check_partition()

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        e = self.embedding(x)
        outputs: dict[str, Tensor] = {}
        h: Tensor | None = None
        label: Tensor | None = None
        for name in self.task_names:
            if h is None:
                inputs = e
            else:
                parts = (
                    [h] + ([e] if self.shortcuts else []) + ([label] if label is not None else [])
                )
                inputs = torch.cat(parts, dim=-1)
            h = self.layers[name](inputs)
            outputs[name] = self.heads[name](h)
            label = None
            if name in self.label_embeddings:
                label = self.label_embeddings[name](torch.softmax(outputs[name], dim=-1))
        return outputs

    def _served(self) -> list[tuple[nn.Module, list[str]]]:
        """Every module with the tasks whose outputs depend on it."""
        names = self.task_names
        served: list[tuple[nn.Module, list[str]]] = [(self.embedding, list(names))]
        for k, name in enumerate(names):
            served.append((self.layers[name], names[k:]))
            head_tasks = names[k:] if name in self.label_embeddings else [name]
            served.append((self.heads[name], head_tasks))
            if name in self.label_embeddings:
                served.append((self.label_embeddings[name], names[k + 1 :]))
        return served

    def _below(self, name: str) -> list[Parameter]:
        """``θ_below``: the parameters of task ``name``'s output that lower tasks' outputs
        depend on too (everything it reads but its own layer and head)."""
        own = {id(p) for m in (self.layers[name], self.heads[name]) for p in m.parameters()}
        result = []
        for module, tasks in self._served():
            if name in tasks:
                result += [p for p in module.parameters() if id(p) not in own]
        return result

    @torch.no_grad()
    def remember_parameters(self) -> None:
        """Records the current parameters as ``θ'`` for :meth:`successive_penalty` (not part
        of ``state_dict``)."""
        self._anchor = {n: p.detach().clone() for n, p in self.named_parameters()}

    def successive_penalty(self, name: str, delta: float = 1e-2) -> Tensor:
        """``δ Σ ||θ - θ'||²`` over the parameters below task ``name`` (the embedding, the lower
        layers, and the lower heads and label embeddings that feed it), ``θ'`` from the last
        :meth:`remember_parameters`; zero for the first task when nothing is below it."""
        self.check_task(name)
        if self._anchor is None:
            raise RuntimeError(
                "JointManyTaskModel: call remember_parameters() before successive_penalty()"
            )
        if not delta >= 0:
            raise ValueError(f"JointManyTaskModel: delta must be >= 0, got {delta!r}")
        names = {id(p): n for n, p in self.named_parameters()}
        below = self._below(name)
        if not below:
            return torch.zeros(())
        drift = [(p - self._anchor[names[id(p)]]).pow(2).sum() for p in below]
        return delta * torch.stack(drift).sum()

    def extra_repr(self) -> str:
        return (
            f"task_names={self.task_names}, label_embeddings={list(self.label_embeddings)}, "
            f"shortcuts={self.shortcuts}"
        )

    def _shared_parameter_list(self) -> list[Parameter]:
        return [p for m, tasks in self._served() if len(tasks) > 1 for p in m.parameters()]

    def _task_parameter_list(self, name: str) -> list[Parameter]:
        return [p for m, tasks in self._served() if tasks == [name] for p in m.parameters()]
