"""Entry points with the call shapes of other multi-task libraries, backed by mtlgrad.

One module per library; each is imported on its own (``import mtlgrad`` imports none of them,
and none imports the other library unless given one of its objects):

- :mod:`mtlgrad.compat.pcgrad`: ``PCGrad(optimizer, reduction="mean")`` with ``pc_backward``,
  as `Pytorch-PCGrad <https://github.com/WeiChengTseng/Pytorch-PCGrad>`_.
- :mod:`mtlgrad.compat.torchjd`: ``mtl_backward``, ``backward`` and ``jac_to_grad``, as
  `TorchJD <https://github.com/SimplexLab/TorchJD>`_ 0.18's ``torchjd.autojac``, taking
  mtlgrad aggregators or TorchJD's (mapped by :func:`~mtlgrad.compat.torchjd.from_torchjd`).
- :mod:`mtlgrad.compat.libmtl`: ``weighting(name, **kwargs)``, LibMTL's weighting names and
  keyword arguments mapped to mtlgrad's aggregators and loss weightings
  (`LibMTL <https://github.com/median-research-group/LibMTL>`_).

Each entry point's docstring says where it matches the other library exactly and where it
differs.
"""

__all__: list[str] = []
