"""Multi-task regularisers on stacked task parameters.

- :func:`block_sparse_norm` and its proximal operator :func:`prox_block_sparse` (every
  ``q >= 1``): l1/lq (l2,1) joint feature selection across tasks (Argyriou et al. 2008; Liu, Ji
  & Ye 2009; Liu & Ye 2010).
- :func:`trace_norm` and :func:`l2_coupling`: soft parameter sharing between task networks
  (Yang & Hospedales 2017; Duong et al. 2015), used by :class:`mtlgrad.nn.SoftSharing`.
- :func:`tensor_normal_penalty` and :func:`tensor_normal_covariances`: the tensor-normal prior
  of deep relationship networks (Long et al. 2015/2017) with its task and feature covariances,
  used by :class:`mtlgrad.nn.DeepRelationshipNetwork`.
- :func:`stack_task_weights`: one tensor per task into the d x T matrix the norms act on.
"""

from mtlgrad.regularizers._block_sparse import block_sparse_norm, prox_block_sparse
from mtlgrad.regularizers._coupling import l2_coupling, trace_norm
from mtlgrad.regularizers._stack import stack_task_weights
from mtlgrad.regularizers._tensor_normal import tensor_normal_covariances, tensor_normal_penalty

__all__ = [
    "block_sparse_norm",
    "l2_coupling",
    "prox_block_sparse",
    "stack_task_weights",
    "tensor_normal_covariances",
    "tensor_normal_penalty",
    "trace_norm",
]
