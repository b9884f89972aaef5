"""LibMTL's weighting methods by name, as mtlgrad aggregators and loss weightings.

`LibMTL <https://github.com/median-research-group/LibMTL>`_ selects a weighting method by name
(``--weighting PCGrad``) and passes its hyperparameters under its own keyword names
(``--calpha 0.5 --rescale 1``). :func:`weighting` takes the same name and keyword arguments and
returns mtlgrad's equivalent: an :class:`~mtlgrad.aggregators.Aggregator` (for
:class:`~mtlgrad.optim.MTLOptimizer` or :func:`mtlgrad.backward`) or a
:class:`~mtlgrad.weighting.LossWeighting` (called on the losses; backpropagate its result).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from mtlgrad import aggregators as agg
from mtlgrad import weighting as lw

__all__ = ["METHODS", "NOT_AVAILABLE", "weighting"]


@dataclass(frozen=True)
class Method:
    """How one LibMTL weighting name maps to mtlgrad.

    Attributes:
        build: makes the mtlgrad object from ``num_tasks``, ``shared_params`` and LibMTL's keyword
            arguments (completed with ``defaults``).
        defaults: LibMTL's keyword arguments for this method and their defaults (LibMTL's
            ``config.py``).
        target: what it returns, as code.
        notes: where the two differ.
        needs: what the method needs besides the keyword arguments (``num_tasks``,
            ``shared_params``).
    """

    build: Callable[..., Any]
    defaults: dict[str, Any]
    target: str
    notes: str = ""
    needs: tuple[str, ...] = field(default_factory=tuple)


def _graddrop(num_tasks: int | None, shared: Any, leak: float) -> agg.GradDrop:
    if leak == 0:
        return agg.GradDrop()
    if num_tasks is None:
        raise ValueError(
            "weighting('GradDrop', leak=...): a non-zero leak needs num_tasks= (mtlgrad's "
            "GradDrop takes one leak per task)"
        )
    return agg.GradDrop(leak=[leak] * num_tasks)


def _gradvac(
    num_tasks: int | None, shared: Any, GradVac_beta: float, GradVac_group_type: int
) -> agg.GradVac:
    if GradVac_group_type != 0:
        raise ValueError(
            f"weighting('GradVac', GradVac_group_type={GradVac_group_type!r}): mtlgrad's GradVac "
            "runs on the whole shared gradient (group type 0); for per-layer targets use one "
            "mtlgrad.aggregators.GradVac per group of parameters"
        )
    return agg.GradVac(beta=GradVac_beta)


def _upgrad(
    num_tasks: int | None, shared: Any, UPGrad_norm_eps: float, UPGrad_reg_eps: float
) -> agg.UPGrad:
    if UPGrad_norm_eps not in (0.0, 1e-4):
        raise ValueError(
            f"weighting('UPGrad', UPGrad_norm_eps={UPGrad_norm_eps!r}): mtlgrad's UPGrad is "
            "scale-free and has no norm_eps (LibMTL's default 1e-4 only turns the update into "
            "the plain mean when trace(G) < 1e-4); only 1e-4 and 0 are accepted"
        )
    return agg.UPGrad(reg_eps=UPGrad_reg_eps)


#: LibMTL weighting name -> its mtlgrad equivalent.
METHODS: dict[str, Method] = {
    "EW": Method(
        lambda T, shared: lw.Equal(T), {}, "weighting.Equal(num_tasks)", needs=("num_tasks",)
    ),
    "GradNorm": Method(
        lambda T, shared, alpha: lw.GradNorm(T, shared, alpha=alpha),
        {"alpha": 1.5},
        "weighting.GradNorm(num_tasks, shared_params, alpha)",
        "the paper's weights, renormalised to sum T (LibMTL: T softmax(w)); L(0) is the first "
        "step's loss (LibMTL: the first epoch's average, with equal weights during it); norms on "
        "shared_params (pass the last shared layer, as the paper; LibMTL uses every shared "
        "parameter)",
        needs=("num_tasks", "shared_params"),
    ),
    "MGDA": Method(
        lambda T, shared, mgda_gn: agg.MGDA(normalization=mgda_gn),
        {"mgda_gn": "none"},
        "aggregators.MGDA(normalization=mgda_gn)",
        "exact min-norm point (LibMTL: the official Frank-Wolfe, 250 iterations or 1e-5); "
        "'loss' and 'loss+' need the losses, which mtlgrad.backward passes",
    ),
    "UW": Method(
        lambda T, shared: lw.UncertaintyWeighting(T, kinds="regression", init=-0.5),
        {},
        'weighting.UncertaintyWeighting(num_tasks, kinds="regression", init=-0.5)',
        "the same objective, L/(2 e^s) + s/2 with s = -0.5 at the start; add "
        "weighting.parameters() to the optimizer",
        needs=("num_tasks",),
    ),
    "DWA": Method(
        lambda T, shared, T_: lw.DWA(T, temperature=T_),
        {"T": 2.0},
        "weighting.DWA(num_tasks, temperature=T)",
        "call end_epoch() after each epoch (LibMTL's trainer keeps the epoch losses)",
        needs=("num_tasks",),
    ),
    "GLS": Method(
        lambda T, shared: lw.GLS(T), {}, "weighting.GLS(num_tasks)", needs=("num_tasks",)
    ),
    "GradDrop": Method(
        _graddrop,
        {"leak": 0.0},
        "aggregators.GradDrop(leak=[leak] * num_tasks)",
        "LibMTL applies it to the gradients of the representation (rep_grad=True); here to the "
        "per-task gradients given (the shared parameters, or features= of mtlgrad.backward)",
    ),
    "PCGrad": Method(
        lambda T, shared: agg.PCGrad(),
        {},
        "aggregators.PCGrad()",
        "projected gradients summed, as LibMTL; orders from a torch.Generator (LibMTL: Python's "
        "random, each task's shuffle including itself); no 1e-8 in the denominators",
    ),
    "GradVac": Method(
        _gradvac,
        {"GradVac_beta": 0.5, "GradVac_group_type": 0},
        "aggregators.GradVac(beta=GradVac_beta)",
        "group type 0 (whole model) only",
    ),
    "CAGrad": Method(
        lambda T, shared, calpha, rescale: agg.CAGrad(c=calpha, rescale=rescale),
        {"calpha": 0.5, "rescale": 1},
        "aggregators.CAGrad(c=calpha, rescale=rescale)",
        "exact solution (LibMTL: SLSQP at its default tolerance, 1e-8 regularisers)",
    ),
    "Nash_MTL": Method(
        lambda T, shared, update_weights_every, optim_niter, max_norm: agg.NashMTL(
            max_norm=max_norm, update_weights_every=update_weights_every, optim_niter=optim_niter
        ),
        {"update_weights_every": 1, "optim_niter": 20, "max_norm": 1.0},
        "aggregators.NashMTL(max_norm, update_weights_every, optim_niter)",
        "same fixed point; each iteration solved natively (LibMTL: cvxpy/ECOS), on a normalised G",
    ),
    "RLW": Method(
        lambda T, shared: lw.RLW(T),
        {},
        "weighting.RLW(num_tasks)",
        "softmax(N(0, I)) from a generator of its own (LibMTL: torch's global RNG)",
        needs=("num_tasks",),
    ),
    "Aligned_MTL": Method(
        lambda T, shared: agg.AlignedMTL(scale_mode="min"),
        {},
        'aggregators.AlignedMTL(scale_mode="min")',
        "aligned gradients summed with the smallest eigenvalue's scale, as LibMTL",
    ),
    "STCH": Method(
        lambda T, shared, STCH_mu, STCH_warmup_epoch: lw.STCH(
            T, mu=STCH_mu, warmup_epochs=STCH_warmup_epoch
        ),
        {"STCH_mu": 1.0, "STCH_warmup_epoch": 4},
        "weighting.STCH(num_tasks, mu=STCH_mu, warmup_epochs=STCH_warmup_epoch)",
        "call end_epoch() after each epoch",
        needs=("num_tasks",),
    ),
    "FairGrad": Method(
        lambda T, shared, FairGrad_alpha: agg.FairGrad(alpha=FairGrad_alpha),
        {"FairGrad_alpha": 1.0},
        "aggregators.FairGrad(alpha=FairGrad_alpha)",
        "solved to rounding (LibMTL: scipy least squares); LibMTL backpropagates Σ w_t L_t, so "
        "its heads get w_t times their gradient: pass scale_task_params=True for that",
    ),
    "FAMO": Method(
        lambda T, shared, FAMO_w_lr, FAMO_w_gamma: lw.FAMO(
            T, lr=FAMO_w_lr, weight_decay=FAMO_w_gamma
        ),
        {"FAMO_w_lr": 0.025, "FAMO_w_gamma": 1e-3},
        "weighting.FAMO(num_tasks, lr=FAMO_w_lr, weight_decay=FAMO_w_gamma)",
        "call weighting.update(new_losses) after the step (LibMTL's update_w)",
        needs=("num_tasks",),
    ),
    "MoCo": Method(
        lambda T, shared, MoCo_beta, MoCo_beta_sigma, MoCo_gamma, MoCo_gamma_sigma, MoCo_rho: (
            agg.MoCo(
                beta=MoCo_beta,
                beta_decay=MoCo_beta_sigma,
                gamma=MoCo_gamma,
                gamma_decay=MoCo_gamma_sigma,
                rho=MoCo_rho,
                normalize=True,
                weight_update="softmax",
            )
        ),
        {
            "MoCo_beta": 0.5,
            "MoCo_beta_sigma": 0.5,
            "MoCo_gamma": 0.1,
            "MoCo_gamma_sigma": 0.5,
            "MoCo_rho": 0.0,
        },
        "aggregators.MoCo(beta, beta_decay, gamma, gamma_decay, rho, normalize=True, "
        'weight_update="softmax")',
        "LibMTL's variant (each gradient rescaled to its loss, softmax weights); the paper's "
        "Algorithm 1 is aggregators.MoCo() with its defaults",
    ),
    "DB_MTL": Method(
        lambda T, shared, DB_beta, DB_beta_sigma: agg.DBMTL(beta=DB_beta, beta_decay=DB_beta_sigma),
        {"DB_beta": 0.9, "DB_beta_sigma": 0.0},
        "aggregators.DBMTL(beta=DB_beta, beta_decay=DB_beta_sigma)",
        "the log-losses' gradients (g_t / L_t, from the losses mtlgrad.backward passes); a zero "
        "gradient gets weight 0 (LibMTL adds 1e-8)",
    ),
    "UPGrad": Method(
        _upgrad,
        {"UPGrad_norm_eps": 1e-4, "UPGrad_reg_eps": 1e-4},
        "aggregators.UPGrad(reg_eps=UPGrad_reg_eps)",
        "exact projections (LibMTL: quadprog); no norm_eps (LibMTL gives the mean when "
        "trace(G) < 1e-4)",
    ),
}

#: LibMTL weighting names with no mtlgrad equivalent -> the closest mtlgrad methods.
NOT_AVAILABLE: dict[str, str] = {
    "IMTL": "aggregators.IMTLG (IMTL's gradient part; LibMTL's IMTL also learns loss scales, "
    "IMTL-L, which mtlgrad does not have)",
    "ExcessMTL": "aggregators.ExcessMTL (TorchJD's formulation; LibMTL's keyword arguments are "
    "not translated)",
    "MoDo": "aggregators.MoDo (called with the losses of 2 or 3 sub-batches; LibMTL's keyword "
    "arguments are not translated)",
    "SDMGrad": "aggregators.SDMGrad (called with the losses of 2 or 3 sub-batches; LibMTL's "
    "keyword arguments are not translated)",
    "MOML": "none (a bilevel method); closest: weighting.UncertaintyWeighting",
    "FORUM": "none (a bilevel method); closest: weighting.UncertaintyWeighting",
    "AutoLambda": "none (a bilevel method); closest: weighting.UncertaintyWeighting",
}


def weighting(
    name: str,
    *,
    num_tasks: int | None = None,
    shared_params: Iterable[Tensor] | None = None,
    **kwargs: Any,
) -> agg.Aggregator | lw.LossWeighting:
    """mtlgrad's equivalent of LibMTL's weighting method ``name``, with LibMTL's keyword
    arguments (https://github.com/median-research-group/LibMTL, ``LibMTL/weighting`` and the
    defaults of ``LibMTL/config.py``).

    Gradient methods return an :class:`~mtlgrad.aggregators.Aggregator`; loss-based methods a
    :class:`~mtlgrad.weighting.LossWeighting`, which needs ``num_tasks`` (and GradNorm the
    ``shared_params`` whose gradient norms it balances). Keyword arguments take LibMTL's names
    and defaults (``calpha``, ``mgda_gn``, ``T``, ``GradVac_beta``, ``STCH_mu``, ...).

    =============  =========================================================================
    LibMTL         mtlgrad
    =============  =========================================================================
    EW             ``weighting.Equal(num_tasks)`` (LibMTL's EW sums the losses)
    GradNorm       ``weighting.GradNorm(num_tasks, shared_params, alpha)``
    MGDA           ``aggregators.MGDA(normalization=mgda_gn)``
    UW             ``weighting.UncertaintyWeighting(num_tasks, init=-0.5)``
    DWA            ``weighting.DWA(num_tasks, temperature=T)``
    GLS            ``weighting.GLS(num_tasks)``
    GradDrop       ``aggregators.GradDrop(leak=[leak] * num_tasks)``
    PCGrad         ``aggregators.PCGrad()``
    GradVac        ``aggregators.GradVac(beta=GradVac_beta)`` (group type 0)
    CAGrad         ``aggregators.CAGrad(c=calpha, rescale=rescale)``
    Nash_MTL       ``aggregators.NashMTL(max_norm, update_weights_every, optim_niter)``
    RLW            ``weighting.RLW(num_tasks)``
    Aligned_MTL    ``aggregators.AlignedMTL()``
    STCH           ``weighting.STCH(num_tasks, mu=STCH_mu, warmup_epochs=STCH_warmup_epoch)``
    FairGrad       ``aggregators.FairGrad(alpha=FairGrad_alpha)``
    FAMO           ``weighting.FAMO(num_tasks, lr=FAMO_w_lr, weight_decay=FAMO_w_gamma)``
    UPGrad         ``aggregators.UPGrad(reg_eps=UPGrad_reg_eps)``
    MoCo           ``aggregators.MoCo(MoCo_beta, ..., normalize=True, weight_update="softmax")``
    DB_MTL         ``aggregators.DBMTL(beta=DB_beta, beta_decay=DB_beta_sigma)``
    =============  =========================================================================

    :data:`METHODS` holds each mapping's notes (where the numbers differ). IMTL, ExcessMTL,
    MoDo, SDMGrad and the bilevel methods (MOML, FORUM, AutoLambda) raise a
    ``ValueError`` naming the closest mtlgrad methods (:data:`NOT_AVAILABLE`); so does an unknown
    name, with the closest LibMTL names. An unknown keyword argument is a ``TypeError`` naming
    the method's keyword arguments.
    """
    if not isinstance(name, str):
        raise TypeError(f"weighting: name must be a LibMTL method name (str), got {name!r}")
    if name in NOT_AVAILABLE:
        raise ValueError(
            f"weighting: mtlgrad has no equivalent of LibMTL's {name}; closest: "
            f"{NOT_AVAILABLE[name]}"
        )
    method = METHODS.get(name)
    if method is None:
        close = difflib.get_close_matches(name, [*METHODS, *NOT_AVAILABLE], n=3, cutoff=0.5)
        close += [m for m in METHODS if m.lower() == name.lower() and m not in close]
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"weighting: unknown LibMTL weighting {name!r}{hint} (mapped: {', '.join(METHODS)})"
        )
    unknown = sorted(set(kwargs) - set(method.defaults))
    if unknown:
        accepted = ", ".join(method.defaults) or "none"
        raise TypeError(
            f"weighting({name!r}): unexpected keyword argument(s) {', '.join(unknown)}; LibMTL's "
            f"{name} takes: {accepted}"
        )
    if "num_tasks" in method.needs and num_tasks is None:
        raise ValueError(
            f"weighting({name!r}): LibMTL's {name} is a loss weighting here ({method.target}); "
            "pass num_tasks="
        )
    if "shared_params" in method.needs and shared_params is None:
        raise ValueError(
            f"weighting({name!r}): pass shared_params= (the parameters whose gradient norms "
            "GradNorm balances: the last shared layer, as in the paper)"
        )
    values = {**method.defaults, **kwargs}
    if name == "DWA":  # LibMTL's temperature is T, which here names the number of tasks
        values = {"T_": values["T"]}
    return method.build(num_tasks, shared_params, **values)
