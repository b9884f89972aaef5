"""MTAN: a shared trunk with per-task soft-attention modules at every block."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn import Parameter

from mtlgrad.nn._base import MultiTaskModule, check_task_names

__all__ = ["MTAN", "attention_module"]


def attention_module(in_channels: int, mid_channels: int, out_channels: int) -> nn.Sequential:
    """The paper's task attention module: ``[1x1 conv, BN, ReLU]`` (g) then
    ``[1x1 conv, BN, sigmoid]`` (h), giving a mask in (0, 1)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, mid_channels, kernel_size=1),
        nn.BatchNorm2d(mid_channels),
        nn.ReLU(),
        nn.Conv2d(mid_channels, out_channels, kernel_size=1),
        nn.BatchNorm2d(out_channels),
        nn.Sigmoid(),
    )


def _resize(x: Tensor, size: torch.Size) -> Tensor:
    """To the spatial size of the next block: max-pooling when shrinking (the paper's 2x2
    max-pool for halved maps), bilinear interpolation when growing (its decoder)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if all(a >= b for a, b in zip(x.shape[-2:], size)):
        return F.adaptive_max_pool2d(x, tuple(size))
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


class MTAN(MultiTaskModule):
    """Multi-Task Attention Network (Liu, Johns & Davison, `End-to-end multi-task learning with
    attention <https://arxiv.org/abs/1803.10704>`_, CVPR 2019), generic over the shared trunk's
    blocks of 2-D feature maps ``(N, C, H, W)``.

    Block j of the shared trunk gives two feature maps: ``u_j`` (after its first layer) and
    ``p_j`` (its output, the next block's input). Each task t has an attention module per block,
    and its attended features are (the paper's task-specific attention module)::

        â_t^(j) = a_t^(j) ⊙ p_j,    a_t^(j) = h_t^(j)(g_t^(j)([u_j ; f^(j)(â_t^(j-1))]))

    with g = 1x1 conv-BN-ReLU and h = 1x1 conv-BN-sigmoid (:func:`attention_module`; the first
    block's input is ``u_1`` alone), and f^(j) the shared 3x3 conv-BN-ReLU feature extractor that
    maps the previous attended features to ``u_j``'s channels, pooled to its resolution (shared
    by the tasks, as in the official code). Head t reads ``â_t`` of the last block.

    Partition: the trunk blocks and the f's are shared; task t's attention modules and head are
    its own.

    Args:
        blocks: the shared trunk, one entry per block: a module (then ``u_j = p_j`` is its
            output) or a pair ``(first, rest)`` with ``u_j = first(input)``, ``p_j = rest(u_j)``.
            Downsampling between blocks belongs at the start of the next block.
        heads: one module per task, keyed by task name.
        channels: per block, the channels of its feature maps: an int (``u_j`` and ``p_j``
            alike) or a pair ``(channels of u_j, channels of p_j)``.
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module | tuple[nn.Module, nn.Module]],
        heads: Mapping[str, nn.Module],
        channels: Sequence[int | tuple[int, int]],
    ) -> None:
        owner = "MTAN"
        if not isinstance(heads, Mapping):
            raise TypeError(f"{owner}: heads must be a dict {{task name: module}}")
        super().__init__(check_task_names(heads.keys(), owner))
        blocks = list(blocks)
        channels = list(channels)
        if not blocks:
            raise ValueError(f"{owner}: no blocks")
        if len(channels) != len(blocks):
            raise ValueError(
                f"{owner}: channels has {len(channels)} entries for {len(blocks)} blocks"
            )
        firsts, rests, sizes = [], [], []
        for j, (block, c) in enumerate(zip(blocks, channels)):
            if isinstance(block, nn.Module):
                first, rest = block, nn.Identity()
            elif isinstance(block, (tuple, list)) and len(block) == 2:
                first, rest = block
            else:
                raise TypeError(
                    f"{owner}: blocks[{j}] must be a module or a pair (first, rest) of modules"
                )
            pair = (c, c) if isinstance(c, int) else tuple(c)
            if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
                raise ValueError(
                    f"{owner}: channels[{j}] must be a positive int or a pair of them, got {c!r}"
                )
            firsts.append(first)
            rests.append(rest)
            sizes.append(pair)
        self.firsts = nn.ModuleList(firsts)
        self.rests = nn.ModuleList(rests)
        self.channels = sizes
        # f^(j): from block j-1's attended features (C_p of j-1) to u_j's channels.
        self.extractors = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(sizes[j - 1][1], sizes[j][0], kernel_size=3, padding=1),
                nn.BatchNorm2d(sizes[j][0]),
                nn.ReLU(),
            )
            for j in range(1, len(blocks))
        )
        self.attention = nn.ModuleDict(
            {
                name: nn.ModuleList(
                    attention_module(u if j == 0 else 2 * u, u, p) for j, (u, p) in enumerate(sizes)
                )
                for name in self.task_names
            }
        )
        self.heads = nn.ModuleDict({name: heads[name] for name in self.task_names})
        self.check_partition()

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        us, ps = [], []
        h = x
        for j, (first, rest) in enumerate(zip(self.firsts, self.rests)):
            u = first(h)
            p = rest(u)
            expected = self.channels[j]
            if u.dim() != 4 or p.dim() != 4 or (u.shape[1], p.shape[1]) != expected:
                raise ValueError(
                    f"MTAN: block {j} gives u of shape {list(u.shape)} and p of shape "
                    f"{list(p.shape)}; expected (N, C, H, W) maps with channels {expected}"
                )
            if u.shape[-2:] != p.shape[-2:]:
                raise ValueError(
                    f"MTAN: block {j} changes the resolution between u {list(u.shape)} and p "
                    f"{list(p.shape)}; the mask from u multiplies p (put pooling in the next block)"
                )
            us.append(u)
            ps.append(p)
            h = p
        outputs = {}
        for name in self.task_names:
            attended = None
            for j, (u, p) in enumerate(zip(us, ps)):
                if attended is None:
                    inputs = u
                else:
                    previous = _resize(self.extractors[j - 1](attended), u.shape[-2:])
                    inputs = torch.cat([u, previous], dim=1)
                attended = self.attention[name][j](inputs) * p
            outputs[name] = self.heads[name](attended)
        return outputs

    def _shared_parameter_list(self) -> list[Parameter]:
        return [
            *self.firsts.parameters(),
            *self.rests.parameters(),
            *self.extractors.parameters(),
        ]

    def _task_parameter_list(self, name: str) -> list[Parameter]:
        return [*self.attention[name].parameters(), *self.heads[name].parameters()]
