"""TorchJD's ``torchjd.autojac`` entry points, computed by mtlgrad.

`TorchJD <https://github.com/SimplexLab/TorchJD>`_ 0.18 trains a multi-task model in two steps
(its "Multi-Task Learning" example)::

    from torchjd.aggregation import UPGrad
    from torchjd.autojac import jac_to_grad, mtl_backward

    mtl_backward([loss1, loss2], features=features)             # shared params get .jac
    jac_to_grad(shared_module.parameters(), UPGrad())           # .jac aggregated into .grad
    optimizer.step()

Changing the import to ``from mtlgrad.compat.torchjd import jac_to_grad, mtl_backward`` keeps the
loop as it is: the ``.jac`` fields have TorchJD's layout (so either library's ``jac_to_grad`` reads
either's ``.jac``), and :func:`jac_to_grad` takes TorchJD aggregators (mapped to mtlgrad's by
:func:`from_torchjd`), their names, or mtlgrad aggregators; the aggregation runs on mtlgrad's
native ``gram`` and ``combine`` ops and solvers, without concatenating the Jacobians.

The one-call equivalent, without ``.jac`` fields, is
``mtlgrad.backward(losses, shared_params=..., aggregator=...)``.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from mtlgrad import aggregators as agg
from mtlgrad.step._differentiate import _leaf_reach, partition

__all__ = ["backward", "from_torchjd", "jac_to_grad", "mtl_backward"]

#: TorchJD's default ``reg_eps`` and ``norm_eps`` (its ``QuadprogProjector``).
TORCHJD_REG_EPS = 1e-4
TORCHJD_NORM_EPS = 1e-4


# ---- aggregators: TorchJD's, mapped to mtlgrad's ------------------------------------------------


class AlignedMTLMean(agg.AlignedMTL):
    """Aligned-MTL with the aligned gradients averaged, as TorchJD's ``AlignedMTL``: the weights
    of :class:`mtlgrad.aggregators.AlignedMTL` (which sums them, as the official code) divided
    by T."""

    def _weights(self, G: Tensor) -> Tensor:
        return super()._weights(G) / G.shape[0]


def _upgrad(reg_eps: float = TORCHJD_REG_EPS, norm_eps: float = TORCHJD_NORM_EPS) -> agg.UPGrad:
    return agg.UPGrad(reg_eps=reg_eps)


def _dualproj(reg_eps: float = TORCHJD_REG_EPS, norm_eps: float = TORCHJD_NORM_EPS) -> agg.DualProj:
    return agg.DualProj(reg_eps=reg_eps)


def _mgda(epsilon: float = 0.001, max_iters: int = 100) -> agg.MGDA:
    return agg.MGDA()


def _cagrad(c: float, norm_eps: float = 0.0001) -> agg.CAGrad:
    return agg.CAGrad(c=c, rescale=0)


def _nash_mtl(
    n_tasks: int | None = None,
    max_norm: float = 1.0,
    update_weights_every: int = 1,
    optim_niter: int = 20,
) -> agg.NashMTL:
    return agg.NashMTL(
        max_norm=max_norm, update_weights_every=update_weights_every, optim_niter=optim_niter
    )


def _graddrop(leak: Tensor | Sequence[float] | None = None) -> agg.GradDrop:
    return agg.GradDrop(leak=leak)


def _constant(weights: Tensor | Sequence[float]) -> agg.Constant:
    return agg.Constant(weights)


def _fairgrad(alpha: float, max_iters: int | None = None) -> agg.FairGrad:
    return agg.FairGrad(alpha)


def _gradvac(beta: float = 0.5, eps: float = 1e-8) -> agg.GradVac:
    return agg.GradVac(beta=beta)


def _aligned_mtl(scale_mode: str = "min") -> AlignedMTLMean:
    return AlignedMTLMean(scale_mode=scale_mode)


def _excess_mtl(robust_step_size: float = 1.0, n_warmup_steps: int = 0) -> agg.ExcessMTL:
    return agg.ExcessMTL(step_size=robust_step_size, warmup_steps=n_warmup_steps)


def _pcd(tau: float | Tensor = 0.02, beta: float = 0.999, eps: float = 1e-8) -> agg.PCD:
    return agg.PCD(tau=tau, beta=beta, eps=eps)


#: TorchJD 0.18 aggregator (and weighting) names -> a builder taking TorchJD's keyword arguments.
MAPPED: dict[str, Callable[..., agg.Aggregator]] = {
    "Mean": agg.Mean,
    "Sum": agg.Sum,
    "UPGrad": _upgrad,
    "DualProj": _dualproj,
    "MGDA": _mgda,
    "PCGrad": agg.PCGrad,
    "IMTLG": agg.IMTLG,
    "CAGrad": _cagrad,
    "NashMTL": _nash_mtl,
    "AlignedMTL": _aligned_mtl,
    "ConFIG": agg.ConFIG,
    "GradDrop": _graddrop,
    "Constant": _constant,
    "Random": agg.RLW,
    "FairGrad": _fairgrad,
    "GradVac": _gradvac,
    "Krum": agg.Krum,
    "TrimmedMean": agg.TrimmedMean,
    "PCD": _pcd,
    "ExcessMTL": _excess_mtl,
}

#: TorchJD methods not translated (their calling conventions differ), with what to use.
NOT_MAPPED: dict[str, str] = {
    "CRMOGM": "build mtlgrad.aggregators.CRMOGM(...) around the mtlgrad equivalent of the "
    "weighting it wraps",
    "MoDo": "use mtlgrad.aggregators.MoDo(num_tasks), called with the losses of 2 or 3 sub-batches",
    "SDMGrad": "use mtlgrad.aggregators.SDMGrad(num_tasks), called with the losses of 2 or 3 "
    "sub-batches",
}

#: Attributes of TorchJD objects read into the keyword arguments of :data:`MAPPED`'s builders.
_ATTRIBUTES = {
    "CAGrad": ("c", "norm_eps"),
    "NashMTL": ("n_tasks", "max_norm", "update_weights_every", "optim_niter"),
    "AlignedMTL": ("scale_mode",),
    "MGDA": ("epsilon", "max_iters"),
    "FairGrad": ("alpha", "max_iters"),
    "GradVac": ("beta", "eps"),
    "Krum": ("n_byzantine", "n_selected"),
    "TrimmedMean": ("trim_number",),
    "PCD": ("tau", "beta", "eps"),
    "ExcessMTL": ("robust_step_size", "n_warmup_steps"),
}


def from_torchjd(aggregator: Any, **kwargs: Any) -> agg.Aggregator:
    """mtlgrad's aggregator for a TorchJD aggregator or weighting, or for its name.

    ``aggregator`` is a ``torchjd.aggregation`` object (``UPGrad()``, ``UPGradWeighting()``, ...;
    its settings are read from it), a TorchJD class name with TorchJD's keyword arguments
    (``from_torchjd("CAGrad", c=0.5)``: TorchJD's defaults otherwise), or an mtlgrad
    :class:`~mtlgrad.aggregators.Aggregator` (returned as it is).

    TorchJD -> mtlgrad, and where the numbers differ:

    - ``Mean``, ``Sum``, ``Constant(w)``, ``ConFIG`` -> the same names: identical.
    - ``UPGrad``, ``DualProj`` -> the same with ``reg_eps=projector.reg_eps`` (TorchJD's default
      1e-4): ours solves the QP exactly (TorchJD: quadprog) and is scale-free, where TorchJD
      zeroes G when ``trace(G) < norm_eps`` (1e-4), which gives the plain mean.
    - ``MGDA`` -> ``MGDA()``: ours is the exact min-norm point; TorchJD's Frank-Wolfe stops at
      ``epsilon`` (exact for two tasks; 3.6% of the norm apart on a three-task example at the
      default ``epsilon=1e-3``).
    - ``PCGrad``, ``GradVac(beta)`` -> the same: visiting orders from a generator of their own
      (TorchJD: the global RNG); no ``eps`` in GradVac's denominators.
    - ``IMTLG`` -> ``IMTLG()``: the same for an invertible G and for parallel gradients; for
      dependent gradients in general position ours is 0, TorchJD's a least-squares compromise.
    - ``AlignedMTL(scale_mode)`` -> :class:`AlignedMTLMean`: averaged, as TorchJD's.
    - ``CAGrad(c)`` -> ``CAGrad(c, rescale=0)``: exact (TorchJD: CLARABEL); where
      ``||g_w|| < norm_eps`` TorchJD returns 0, ours the maximiser closest to the mean gradient.
    - ``NashMTL`` -> ``NashMTL(max_norm, update_weights_every, optim_niter)``: the same fixed
      point, iterated natively on a normalised G (TorchJD: cvxpy/ECOS).
    - ``GradDrop(leak)`` -> ``GradDrop(leak)`` (TorchJD's default ``f`` only); ``Random`` ->
      ``RLW()``: random draws from a generator of their own.
    - ``FairGrad(alpha)`` -> ``FairGrad(alpha)``: solved to rounding (TorchJD: scipy least
      squares, ``max_iters``).
    - ``Krum(n_byzantine, n_selected)`` -> the same: scores are sums of **squared** distances
      (the paper's; TorchJD sums the distances, which can select other tasks).
    - ``TrimmedMean(trim_number)``, ``PCD(tau, beta, eps)`` -> the same.
    - ``ExcessMTL(robust_step_size, n_warmup_steps)`` -> ``ExcessMTL(step_size,
      warmup_steps)``: the same with a warm-up; without one, each excess risk is divided by its
      first value (TorchJD: by the first value plus 1e-7).

    A preference vector other than the default, a custom ``projector`` or GradDrop ``f``, and
    the TorchJD methods not translated (CRMOGM, MoDo, SDMGrad: their calling conventions differ)
    raise a ``ValueError`` saying which mtlgrad aggregator to use.
    """
    if isinstance(aggregator, agg.Aggregator):
        if kwargs:
            raise TypeError(
                f"from_torchjd: keyword arguments go with a TorchJD name, not with the mtlgrad "
                f"aggregator {aggregator!r}"
            )
        return aggregator
    if isinstance(aggregator, str):
        return _build(aggregator, kwargs)
    module = type(aggregator).__module__
    if not module.startswith("torchjd."):
        raise TypeError(
            "from_torchjd: expected a torchjd.aggregation aggregator or weighting, a TorchJD "
            f"aggregator name or an mtlgrad Aggregator; got {type(aggregator).__name__}"
        )
    if kwargs:
        raise TypeError("from_torchjd: keyword arguments go with a name, not with an object")
    name = type(aggregator).__name__
    base = name.removesuffix("Weighting").lstrip("_")
    _check_default_preference(aggregator, base)
    found: dict[str, Any] = {}
    if base in ("UPGrad", "DualProj"):
        found.update(_projector_settings(aggregator, base))
    elif base == "Constant":
        weights = getattr(aggregator, "weights", None)
        found["weights"] = weights if weights is not None else aggregator._weights
    elif base == "GradDrop":
        from torchjd.aggregation._graddrop import _identity

        if aggregator.f is not _identity:
            raise ValueError(
                "from_torchjd: GradDrop with a custom f has no mtlgrad equivalent (mtlgrad's "
                "GradDrop uses the identity, TorchJD's default)"
            )
        found["leak"] = aggregator.leak
    else:
        for attribute in _ATTRIBUTES.get(base, ()):
            found[attribute] = getattr(aggregator, attribute)
    return _build(base, found)


def _build(name: str, kwargs: dict[str, Any]) -> agg.Aggregator:
    base = name.removesuffix("Weighting")
    if base in NOT_MAPPED:
        raise ValueError(f"from_torchjd: TorchJD's {base} is not translated: {NOT_MAPPED[base]}")
    builder = MAPPED.get(base)
    if builder is None:
        raise ValueError(
            f"from_torchjd: unknown TorchJD aggregator {name!r}; mapped: {', '.join(MAPPED)}"
        )
    try:
        inspect.signature(builder).bind(**kwargs)
    except TypeError as error:
        raise TypeError(f"from_torchjd({base!r}): {error}") from None
    return builder(**kwargs)


def _check_default_preference(aggregator: Any, name: str) -> None:
    if getattr(aggregator, "pref_vector", None) is not None:
        raise ValueError(
            f"from_torchjd: {name} with a pref_vector has no mtlgrad equivalent (mtlgrad's "
            f"{name} uses the default equal preference); for fixed weights use "
            "mtlgrad.aggregators.Constant"
        )


def _projector_settings(aggregator: Any, name: str) -> dict[str, float]:
    from torchjd.linalg import QuadprogProjector

    projector = aggregator.projector
    if type(projector) is not QuadprogProjector:
        raise ValueError(
            f"from_torchjd: {name} with the projector {type(projector).__name__} has no mtlgrad "
            "equivalent (mtlgrad solves the projection exactly; only TorchJD's "
            "QuadprogProjector settings are mapped)"
        )
    return {"reg_eps": projector.reg_eps, "norm_eps": projector.norm_eps}


#: TorchJD objects already mapped by :func:`jac_to_grad`: each keeps its mtlgrad aggregator (and
#: so that aggregator's state and generator) from one call to the next.
_MAPPED_OBJECTS: weakref.WeakKeyDictionary[Any, agg.Aggregator] = weakref.WeakKeyDictionary()


def _mapped_once(aggregator: Any) -> agg.Aggregator:
    if isinstance(aggregator, (str, agg.Aggregator)):
        return from_torchjd(aggregator)
    try:
        method = _MAPPED_OBJECTS.get(aggregator)
    except TypeError:  # not weakly referenceable
        return from_torchjd(aggregator)
    if method is None:
        method = _MAPPED_OBJECTS[aggregator] = from_torchjd(aggregator)
    return method


# ---- the differentiation: .jac fields ---------------------------------------------------------


def _as_tensor_list(tensors: Sequence[Tensor] | Tensor, what: str) -> list[Tensor]:
    values = [tensors] if isinstance(tensors, Tensor) else list(tensors)
    if len({id(t) for t in values}) != len(values):
        raise ValueError(f"`{what}` should contain unique elements")
    for k, t in enumerate(values):
        if not isinstance(t, Tensor):
            raise TypeError(f"`{what}[{k}]` is a {type(t).__name__}, not a tensor")
    return values


def _check_chunk_size(parallel_chunk_size: int | None) -> None:
    if parallel_chunk_size is not None and (
        not isinstance(parallel_chunk_size, int)
        or isinstance(parallel_chunk_size, bool)
        or parallel_chunk_size < 1
    ):
        raise ValueError(
            f"`parallel_chunk_size` should be None or a positive int, got {parallel_chunk_size!r}"
        )


def _check_expects_grad(tensor: Tensor, what: str, field: str) -> None:
    if not (tensor.requires_grad and (tensor.is_leaf or tensor.retains_grad)):
        raise ValueError(
            f"cannot populate the {field} field of {what}: it must require grad and be a leaf "
            "(or retain grad)"
        )


def _leaves(tensors: Sequence[Tensor], stop_at: Sequence[Tensor] = ()) -> list[Tensor]:
    """The leaves requiring grad that ``tensors`` depend on, not through ``stop_at``."""
    leaves, _, direct, _ = _leaf_reach(list(tensors), list(stop_at), below_stops=False)
    return [leaf for leaf, mask in zip(leaves, direct) if mask]


def _accumulate_jac(param: Tensor, jac: Tensor) -> None:
    if hasattr(param, "jac"):
        param.jac += jac  # type: ignore[attr-defined]
    else:
        param.jac = jac  # type: ignore[attr-defined]


def mtl_backward(
    tensors: Sequence[Tensor] | Tensor,
    /,
    features: Sequence[Tensor] | Tensor,
    *,
    grad_tensors: Sequence[Tensor] | None = None,
    tasks_params: Sequence[Iterable[Tensor]] | None = None,
    shared_params: Iterable[Tensor] | None = None,
    retain_graph: bool = False,
    parallel_chunk_size: int | None = None,
) -> None:
    """TorchJD's ``torchjd.autojac.mtl_backward``: the Jacobian of the task losses with respect
    to the shared parameters into their ``.jac`` fields, each task's gradient of its own
    parameters into their ``.grad`` (https://torchjd.org, 0.18).

    Same arguments and results as TorchJD's: ``p.jac`` has one row per task (added to a ``.jac``
    already there), a head's ``.grad`` receives its task's gradient (added, as autograd does; a
    parameter of several tasks gets the sum). ``shared_params`` defaults to the leaves that the
    ``features`` depend on, ``tasks_params`` to the leaves each task's tensor depends on other
    than through the features; non-scalar ``tensors`` need ``grad_tensors``.

    Computed with one ``torch.autograd.grad`` per task with respect to the shared parameters and
    that task's parameters (TorchJD backpropagates the features' Jacobian, vmapped): the same
    numbers, and memory for the T x P Jacobian plus one task's gradients.
    ``parallel_chunk_size`` is checked and otherwise unused (in TorchJD it only trades speed for
    memory).
    """
    _check_chunk_size(parallel_chunk_size)
    outputs = _as_tensor_list(tensors, "tensors")
    feature_list = _as_tensor_list(features, "features")
    if not feature_list:
        raise ValueError("`features` cannot be empty")
    if not outputs:
        raise ValueError("`tensors` cannot be empty")
    shared = _leaves(feature_list) if shared_params is None else list(shared_params)
    if tasks_params is None:
        heads = partition(outputs, shared=shared, features=feature_list).heads
    else:
        heads = [list(params) for params in tasks_params]
    if len(heads) != len(outputs):
        raise ValueError(
            f"`tensors` and `tasks_params` should have the same length (got {len(outputs)} and "
            f"{len(heads)})"
        )
    shared_ids = {id(p) for p in shared}
    for t, params in enumerate(heads):
        for p in params:
            if id(p) in shared_ids:
                raise ValueError(f"`tasks_params[{t}]` has a tensor in common with `shared_params`")
            _check_expects_grad(p, f"a parameter of task {t}", ".grad")
    for k, p in enumerate(shared):
        _check_expects_grad(p, f"shared_params[{k}]", ".jac")
    if grad_tensors is None:
        for t, output in enumerate(outputs):
            if output.numel() != 1:
                raise ValueError(
                    f"tensors[{t}] has shape {list(output.shape)}: non-scalar `tensors` need "
                    "`grad_tensors`"
                )
        seeds: list[Tensor | None] = [None] * len(outputs)
    else:
        seeds = list(grad_tensors)
        if len(seeds) != len(outputs):
            raise ValueError(
                f"`grad_tensors` should have the same length as `tensors` (got {len(seeds)} and "
                f"{len(outputs)})"
            )
        for t, (seed, output) in enumerate(zip(seeds, outputs)):
            if seed.shape != output.shape:
                raise ValueError(
                    f"grad_tensors[{t}] has shape {list(seed.shape)}, tensors[{t}] "
                    f"{list(output.shape)}"
                )
    T = len(outputs)
    jacs = [p.new_zeros((T, *p.shape)) for p in shared]
    head_grads: list[tuple[Tensor, Tensor]] = []
    for t, (output, seed) in enumerate(zip(outputs, seeds)):
        inputs = shared + heads[t]
        grads = torch.autograd.grad(
            output,
            inputs,
            grad_outputs=seed,
            retain_graph=retain_graph or t < T - 1,
            allow_unused=True,
        )
        for k, g in enumerate(grads[: len(shared)]):
            if g is not None:
                jacs[k][t].copy_(g)
        head_grads.extend((p, g) for p, g in zip(heads[t], grads[len(shared) :]) if g is not None)
    for p, jac in zip(shared, jacs):
        _accumulate_jac(p, jac)
    with torch.no_grad():
        for p, g in head_grads:
            if p.grad is None:
                p.grad = g.detach().clone()
            else:
                p.grad += g


def backward(
    tensors: Sequence[Tensor] | Tensor,
    /,
    *,
    jac_tensors: Sequence[Tensor] | Tensor | None = None,
    inputs: Iterable[Tensor] | None = None,
    retain_graph: bool = False,
    parallel_chunk_size: int | None = None,
) -> None:
    """TorchJD's ``torchjd.autojac.backward``: the Jacobian of ``tensors`` (one row per entry of
    all of them, or left-multiplied by ``jac_tensors``) with respect to ``inputs`` (default:
    every leaf they depend on), added into the inputs' ``.jac`` fields (https://torchjd.org,
    0.18).

    The rows are differentiated ``parallel_chunk_size`` at a time with one vmapped
    ``torch.autograd.grad`` (``is_grads_batched``), all at once by default, one by one (no
    vmap) with ``parallel_chunk_size=1``, as TorchJD does.
    """
    _check_chunk_size(parallel_chunk_size)
    outputs = _as_tensor_list(tensors, "tensors")
    if not outputs:
        raise ValueError("`tensors` cannot be empty")
    targets = _leaves(outputs) if inputs is None else list(inputs)
    for k, p in enumerate(targets):
        _check_expects_grad(p, f"inputs[{k}]", ".jac")
    if jac_tensors is None:
        m = sum(t.numel() for t in outputs)
        rows, offset = [], 0
        for t in outputs:  # the identity, cut into each tensor's columns
            eye = torch.zeros(m, t.numel(), dtype=t.dtype, device=t.device)
            eye[offset : offset + t.numel()] = torch.eye(t.numel(), dtype=t.dtype, device=t.device)
            rows.append(eye.view(m, *t.shape))
            offset += t.numel()
    else:
        rows = _as_tensor_list(jac_tensors, "jac_tensors")
        if len(rows) != len(outputs):
            raise ValueError(
                f"`jac_tensors` should have the same length as `tensors` (got {len(rows)} and "
                f"{len(outputs)})"
            )
        for k, (row, t) in enumerate(zip(rows, outputs)):
            if row.shape[1:] != t.shape:
                raise ValueError(
                    f"jac_tensors[{k}] has shape {list(row.shape)}, expected [m, "
                    f"{', '.join(map(str, t.shape))}]"
                )
        if len({row.shape[0] for row in rows}) != 1:
            raise ValueError("every tensor of `jac_tensors` must have the same first dimension")
        m = rows[0].shape[0]
    chunk = m if parallel_chunk_size is None else parallel_chunk_size
    jacs = [p.new_zeros((m, *p.shape)) for p in targets]
    for start in range(0, m, chunk):
        stop = min(start + chunk, m)
        last = stop == m
        if chunk == 1:
            grads = torch.autograd.grad(
                outputs,
                targets,
                grad_outputs=[row[start] for row in rows],
                retain_graph=retain_graph or not last,
                allow_unused=True,
            )
            grads = tuple(None if g is None else g.unsqueeze(0) for g in grads)
        else:
            grads = torch.autograd.grad(
                outputs,
                targets,
                grad_outputs=[row[start:stop] for row in rows],
                retain_graph=retain_graph or not last,
                allow_unused=True,
                is_grads_batched=True,
            )
        for jac, g in zip(jacs, grads):
            if g is not None:
                jac[start:stop].copy_(g)
    for p, jac in zip(targets, jacs):
        _accumulate_jac(p, jac)


# ---- the aggregation: .jac -> .grad -----------------------------------------------------------


def jac_to_grad(
    tensors: Iterable[Tensor],
    /,
    aggregator: Any,
    *,
    retain_jac: bool = False,
    optimize_gramian_computation: bool = False,
) -> Tensor | None:
    """TorchJD's ``torchjd.autojac.jac_to_grad``: aggregates the ``.jac`` fields of ``tensors``
    (from :func:`mtl_backward`, :func:`backward`, or TorchJD's own) and adds the result into
    their ``.grad`` fields; returns the weights (https://torchjd.org, 0.18).

    ``aggregator`` is an mtlgrad :class:`~mtlgrad.aggregators.Aggregator`, a TorchJD aggregator
    or a TorchJD name, mapped by :func:`from_torchjd`. A TorchJD object is mapped at its first
    call and the same mtlgrad aggregator serves the later ones (the stateful methods keep their
    state; settings changed on the TorchJD object afterwards are not seen); a name is mapped
    afresh at every call, so pass an object for NashMTL, GradVac and the randomised methods.
    The rows of all the ``.jac`` fields form the T task gradients; their Gram matrix and the
    weighted sum come from mtlgrad's native ops in one pass each, without concatenating the
    Jacobians (TorchJD's ``optimize_gramian_computation=True`` way; the flag is accepted, and
    refused with a method that is not Gram-based, as TorchJD does).

    Returns the weights (in the Jacobians' dtype and device) for Gram-based methods, ``None``
    for GradDrop. Unlike TorchJD, ``ConFIG`` returns its weights too. ``.jac`` is deleted
    unless ``retain_jac``, after a successful aggregation (a failed one leaves it). A NaN/Inf
    entry raises :class:`~mtlgrad.ops.NonFiniteGradientError` naming the row (task) and the
    tensor.
    """
    method = _mapped_once(aggregator)
    if not isinstance(optimize_gramian_computation, bool):
        raise TypeError(
            f"optimize_gramian_computation must be a bool, got {optimize_gramian_computation!r}"
        )
    if optimize_gramian_computation and not isinstance(method, agg.GramAggregator):
        raise ValueError(
            "jac_to_grad with optimize_gramian_computation=True needs an aggregator that "
            f"computes weights from the Gramian (e.g. UPGrad); {type(method).__name__} does not"
        )
    params = list(tensors)
    if not params:
        raise ValueError("The `tensors` parameter cannot be empty.")
    for k, p in enumerate(params):
        if not hasattr(p, "jac"):
            raise ValueError(
                f"tensors[{k}] has no .jac field. Did you use mtl_backward or backward before "
                "calling jac_to_grad?"
            )
        _check_expects_grad(p, f"tensors[{k}]", ".grad")
    jacs: list[Tensor] = [p.jac for p in params]  # type: ignore[attr-defined]
    T = jacs[0].shape[0]
    for k, jac in enumerate(jacs):
        if jac.shape[0] != T:
            raise ValueError(
                f"every .jac must have the same first dimension (the number of rows): "
                f"tensors[0].jac has {T}, tensors[{k}].jac {jac.shape[0]}"
            )
        if jac.shape[1:] != params[k].shape:
            raise ValueError(
                f"tensors[{k}].jac has shape {list(jac.shape)}, expected "
                f"[{T}, {', '.join(map(str, params[k].shape))}]"
            )
    grads = [jac[t].detach() for t in range(T) for jac in jacs]
    with torch.no_grad():
        aggregation = method.aggregate(
            grads,
            T,
            out=[p.grad for p in params],
            names=[f"tensors[{k}]" for k in range(len(params))],
            task_names=[f"row {t}" for t in range(T)],
            accumulate=True,
        )
    for p, out in zip(params, aggregation.out):
        if p.grad is None:
            p.grad = out
    if not retain_jac:
        for p in params:
            del p.jac  # type: ignore[attr-defined]
    if aggregation.weights is None:
        return None
    return aggregation.weights.to(device=jacs[0].device, dtype=jacs[0].dtype)
