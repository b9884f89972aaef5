"""Gradient-combination methods, one module per method.

Every aggregator is callable on a T x P matrix (``agg(J) -> d``) and combines task-major gradient
lists with :meth:`~mtlgrad.aggregators.Aggregator.aggregate`. Gram-based aggregators also expose
``agg.weights(G)``.
"""

from mtlgrad.aggregators._aligned_mtl import AlignedMTL
from mtlgrad.aggregators._base import Aggregation, Aggregator, GramAggregator
from mtlgrad.aggregators._cagrad import CAGrad
from mtlgrad.aggregators._config import ConFIG
from mtlgrad.aggregators._constant import Constant
from mtlgrad.aggregators._cosine_gating import CosineGating
from mtlgrad.aggregators._cr_mogm import CRMOGM
from mtlgrad.aggregators._db_mtl import DBMTL
from mtlgrad.aggregators._dualproj import DualProj
from mtlgrad.aggregators._excess_mtl import ExcessMTL
from mtlgrad.aggregators._fairgrad import FairGrad
from mtlgrad.aggregators._graddrop import GradDrop
from mtlgrad.aggregators._gradient_matching import GradientMatching
from mtlgrad.aggregators._gradvac import GradVac
from mtlgrad.aggregators._hydalearn import HydaLearn
from mtlgrad.aggregators._imtlg import IMTLG
from mtlgrad.aggregators._krum import Krum
from mtlgrad.aggregators._mean import Mean
from mtlgrad.aggregators._mgda import MGDA
from mtlgrad.aggregators._moco import MoCo
from mtlgrad.aggregators._modo import MoDo
from mtlgrad.aggregators._nash_mtl import NashMTL
from mtlgrad.aggregators._pcd import PCD
from mtlgrad.aggregators._pcgrad import PCGrad
from mtlgrad.aggregators._rlw import RLW
from mtlgrad.aggregators._sdmgrad import SDMGrad
from mtlgrad.aggregators._sum import Sum
from mtlgrad.aggregators._trimmed_mean import TrimmedMean
from mtlgrad.aggregators._upgrad import UPGrad

__all__ = [
    "Aggregation",
    "Aggregator",
    "AlignedMTL",
    "CAGrad",
    "ConFIG",
    "Constant",
    "CosineGating",
    "CRMOGM",
    "DBMTL",
    "DualProj",
    "ExcessMTL",
    "FairGrad",
    "GradDrop",
    "GradientMatching",
    "GradVac",
    "GramAggregator",
    "HydaLearn",
    "IMTLG",
    "Krum",
    "Mean",
    "MGDA",
    "MoCo",
    "MoDo",
    "NashMTL",
    "PCD",
    "PCGrad",
    "RLW",
    "SDMGrad",
    "Sum",
    "TrimmedMean",
    "UPGrad",
]
