"""Multi-task models: the classic architectures, each with one output per task and an exact
partition of its parameters into shared and task-specific ones.

.. code-block:: python

    model = MultiTaskModel(trunk, {"seg": seg_head, "depth": depth_head})
    outputs = model(x)  # {"seg": ..., "depth": ...}
    mtlgrad.backward(losses, shared_params=model.shared_parameters(), aggregator=UPGrad())
"""

from mtlgrad.nn._base import MultiTaskModule
from mtlgrad.nn._cgc import CGC
from mtlgrad.nn._cross_stitch import CrossStitch, CrossStitchUnit
from mtlgrad.nn._dselect_k import DSelectK, smooth_step
from mtlgrad.nn._fully_adaptive import FullyAdaptiveNetwork
from mtlgrad.nn._joint_many_task import JointManyTaskModel
from mtlgrad.nn._ltb import LTB
from mtlgrad.nn._mmoe import MMoE
from mtlgrad.nn._mtan import MTAN, attention_module
from mtlgrad.nn._multi_task_model import MultiTaskModel
from mtlgrad.nn._ple import PLE
from mtlgrad.nn._relationship import DeepRelationshipNetwork
from mtlgrad.nn._sluice import Sluice
from mtlgrad.nn._soft_sharing import SoftSharing
from mtlgrad.nn._task_batchnorm import (
    TaskBatchNorm,
    TaskBatchNormModel,
    convert_task_batchnorm,
    task_batchnorm_parameters,
    use_task,
)
from mtlgrad.nn._tensor_factorised import TensorFactorisedNetwork

__all__ = [
    "CGC",
    "CrossStitch",
    "CrossStitchUnit",
    "DSelectK",
    "DeepRelationshipNetwork",
    "FullyAdaptiveNetwork",
    "JointManyTaskModel",
    "LTB",
    "MMoE",
    "MTAN",
    "MultiTaskModel",
    "MultiTaskModule",
    "PLE",
    "Sluice",
    "SoftSharing",
    "TaskBatchNorm",
    "TaskBatchNormModel",
    "TensorFactorisedNetwork",
    "attention_module",
    "convert_task_batchnorm",
    "smooth_step",
    "task_batchnorm_parameters",
    "use_task",
]
