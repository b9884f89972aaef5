"""Gradient-combination methods, one module per method.

Every aggregator is callable on a T x P matrix (``agg(J) -> d``) and combines task-major gradient
lists with :meth:`~mtlgrad.aggregators.Aggregator.aggregate`. Gram-based aggregators also expose
``agg.weights(G)``.
"""

from mtlgrad.aggregators._aligned_mtl import AlignedMTL
from mtlgrad.aggregators._base import Aggregation, Aggregator, GramAggregator
from mtlgrad.aggregators._cagrad import CAGrad
from mtlgrad.aggregators._config import ConFIG
from mtlgrad.aggregators._fairgrad import FairGrad
from mtlgrad.aggregators._gradvac import GradVac
from mtlgrad.aggregators._mean import Mean
from mtlgrad.aggregators._pcgrad import PCGrad
from mtlgrad.aggregators._sum import Sum

__all__ = [
    "Aggregation",
    "Aggregator",
    "AlignedMTL",
    "CAGrad",
    "ConFIG",
    "FairGrad",
    "GradVac",
    "GramAggregator",
    "Mean",
    "PCGrad",
    "Sum",
]
