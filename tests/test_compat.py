"""mtlgrad.compat: the entry points with other libraries' call shapes, against those libraries'
documented usage (TorchJD, installed) or float64 re-implementations of their algorithms
(Pytorch-PCGrad), and LibMTL's names and keyword arguments."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor, nn

import mtlgrad
from mtlgrad import aggregators as agg
from mtlgrad import weighting as lw
from mtlgrad.compat import libmtl
from mtlgrad.compat import pcgrad as compat_pcgrad
from mtlgrad.compat import torchjd as compat_torchjd

F64 = torch.float64

# ---- Pytorch-PCGrad ----------------------------------------------------------------------------


class ThreeTaskNet(nn.Module):
    """Tasks 0 and 1 share ``pair`` (reached by two of three tasks), each task has a head, and
    ``unused`` is reached by no task: the three cases of Pytorch-PCGrad's mask."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Linear(4, 6, dtype=F64)
        self.pair = nn.Linear(6, 5, dtype=F64)
        self.heads = nn.ModuleList(
            [nn.Linear(5, 1, dtype=F64), nn.Linear(5, 1, dtype=F64), nn.Linear(6, 1, dtype=F64)]
        )
        self.unused = nn.Linear(2, 2, dtype=F64)

    def losses(self, x: Tensor, y: Tensor, num_tasks: int = 3) -> list[Tensor]:
        z = torch.tanh(self.trunk(x))
        zp = torch.tanh(self.pair(z))
        outputs = [self.heads[0](zp), self.heads[1](zp), self.heads[2](z)]
        return [((outputs[t].squeeze(-1) - y[:, t]) ** 2).mean() for t in range(num_tasks)]


def pcgrad_batch(seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 4, generator=gen, dtype=F64)
    # Opposite targets make the tasks conflict.
    base = torch.randn(16, generator=gen, dtype=F64)
    y = torch.stack([base, -base, 0.5 * base + torch.randn(16, generator=gen, dtype=F64)], 1)
    return x, y


def reference_pcgrad(
    task_grads: list[list[Tensor | None]],
    params: list[Tensor],
    orders: list[list[int]],
    reduction: str,
) -> list[Tensor]:
    """Pytorch-PCGrad's algorithm as its description gives it, in float64: gradients flattened
    over all parameters (missing = zeros), a per-parameter mask of who has a gradient, each task
    projected against the others' original gradients in ``orders[i]``, then the reduction on the
    entries every task has and the sum elsewhere."""
    flat, masks = [], []
    for grads in task_grads:
        flat.append(
            torch.cat(
                [
                    (torch.zeros(p.numel(), dtype=F64) if g is None else g.reshape(-1))
                    for g, p in zip(grads, params)
                ]
            )
        )
        masks.append(
            torch.cat(
                [
                    torch.full((p.numel(),), g is not None, dtype=torch.bool)
                    for g, p in zip(grads, params)
                ]
            )
        )
    shared = torch.stack(masks).all(0)
    projected = [g.clone() for g in flat]
    for i, order in enumerate(orders):
        for j in order:
            dot = projected[i] @ flat[j]
            if dot < 0:
                projected[i] = projected[i] - dot / (flat[j] @ flat[j]) * flat[j]
    stacked = torch.stack(projected)
    merged = torch.zeros_like(flat[0])
    merged[shared] = (
        stacked[:, shared].mean(0) if reduction == "mean" else stacked[:, shared].sum(0)
    )
    merged[~shared] = stacked[:, ~shared].sum(0)
    return [part.view_as(p) for part, p in zip(merged.split([p.numel() for p in params]), params)]


def all_orders(T: int) -> list[list[list[int]]]:
    """Every choice of visiting orders: for each task, a permutation of the other tasks."""
    per_task = [
        [list(perm) for perm in itertools.permutations([j for j in range(T) if j != i])]
        for i in range(T)
    ]
    return [list(choice) for choice in itertools.product(*per_task)]


def task_gradients(losses: list[Tensor], params: list[Tensor]) -> list[list[Tensor | None]]:
    return [
        list(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True))
        for loss in losses
    ]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("seed", [0, 3, 11])  # 2, 3 and 3 conflicting pairs
def test_pcgrad_matches_the_reference_for_one_of_the_orders(reduction: str, seed: int) -> None:
    net = ThreeTaskNet(seed)
    params = list(net.parameters())
    optimizer = compat_pcgrad.PCGrad(
        torch.optim.SGD(params, lr=0.1), reduction, generator=torch.Generator().manual_seed(seed)
    )
    x, y = pcgrad_batch(seed)
    losses = net.losses(x, y)
    grads = task_gradients(losses, params)
    for p in params:  # replaced, not accumulated
        p.grad = torch.full_like(p, 7.0)
    optimizer.pc_backward(losses)
    ours = [p.grad.clone() for p in params]
    errors = [
        max(
            (a - b).abs().max().item()
            for a, b in zip(ours, reference_pcgrad(grads, params, o, reduction))
        )
        for o in all_orders(3)
    ]
    assert min(errors) < 1e-12
    if seed != 0:  # all three pairs conflict: the order matters, and the test tells them apart
        assert max(errors) > 1e-6
    # The projections mattered: without them (every order skipped) the result differs.
    unprojected = reference_pcgrad(grads, params, [[], [], []], reduction)
    assert max((a - b).abs().max().item() for a, b in zip(ours, unprojected)) > 1e-3
    # The parameter no task reaches gets zeros, as Pytorch-PCGrad writes them.
    assert torch.equal(net.unused.weight.grad, torch.zeros_like(net.unused.weight))


def test_pcgrad_two_tasks_trains_as_the_reference() -> None:
    """With two tasks the order does not matter: three Adam steps of the compat optimizer and of
    the reference land on the same parameters."""
    nets = [ThreeTaskNet(5), ThreeTaskNet(5)]
    ours = compat_pcgrad.PCGrad(torch.optim.Adam(nets[0].parameters(), lr=0.05, weight_decay=0.01))
    reference_opt = torch.optim.Adam(nets[1].parameters(), lr=0.05, weight_decay=0.01)
    assert ours.optimizer is ours._optim and ours.reduction == "mean"
    for step in range(3):
        x, y = pcgrad_batch(10 + step)
        ours.zero_grad()
        ours.pc_backward(nets[0].losses(x, y, num_tasks=2))
        ours.step()
        reference_opt.zero_grad()
        params = list(nets[1].parameters())
        grads = task_gradients(nets[1].losses(x, y, num_tasks=2), params)
        for p, g in zip(params, reference_pcgrad(grads, params, [[1], [0]], "mean")):
            p.grad = g
        reference_opt.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # the head of task 2 (no loss) and the unused layer were decayed as zeros-grad parameters
    assert not torch.equal(nets[0].heads[2].weight, ThreeTaskNet(5).heads[2].weight)


def test_pcgrad_seeded_generator_reproduces_and_checkpoints() -> None:
    def run(generator_seed: int) -> list[Tensor]:
        net = ThreeTaskNet(3)
        opt = compat_pcgrad.PCGrad(
            torch.optim.SGD(net.parameters(), lr=0.1),
            generator=torch.Generator().manual_seed(generator_seed),
        )
        results = []
        for step in range(4):
            x, y = pcgrad_batch(step)
            opt.zero_grad()
            opt.pc_backward(net.losses(x, y))
            results.append(torch.cat([p.grad.reshape(-1) for p in net.parameters()]))
            opt.step()
        return results

    assert all(torch.equal(a, b) for a, b in zip(run(0), run(0)))
    net = ThreeTaskNet(3)
    opt = compat_pcgrad.PCGrad(torch.optim.SGD(net.parameters(), lr=0.1))
    state = opt.state_dict()
    assert set(state) == {"optimizer", "aggregator"}
    opt.load_state_dict(state)


def test_pcgrad_errors() -> None:
    net = ThreeTaskNet(0)
    with pytest.raises(ValueError, match="reduction must be one of 'mean', 'sum'; got 'max'"):
        compat_pcgrad.PCGrad(torch.optim.SGD(net.parameters(), lr=0.1), "max")
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        compat_pcgrad.PCGrad(list(net.parameters()))  # type: ignore[arg-type]
    opt = compat_pcgrad.PCGrad(torch.optim.SGD(net.parameters(), lr=0.1))
    x, y = pcgrad_batch(0)
    losses = net.losses(x, y)
    losses[1] = losses[1] * float("nan")
    with pytest.raises(mtlgrad.NonFiniteGradientError, match="task 1"):
        opt.pc_backward(losses)


# ---- TorchJD ------------------------------------------------------------------------------------

torchjd = pytest.importorskip("torchjd")
from torchjd import aggregation as tja  # noqa: E402
from torchjd import autojac  # noqa: E402


def torchjd_mtl_model(seed: int, num_tasks: int) -> tuple[nn.Module, nn.ModuleList]:
    """TorchJD's "Multi-Task Learning" example model (a shared module and linear heads), float64."""
    torch.manual_seed(seed)
    shared = nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 3), nn.ReLU()).to(F64)
    heads = nn.ModuleList(nn.Linear(3, 1).to(F64) for _ in range(num_tasks))
    return shared, heads


def torchjd_mtl_losses(
    shared: nn.Module, heads: nn.ModuleList, seed: int
) -> tuple[list[Tensor], Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 10, generator=gen, dtype=F64)
    targets = torch.randn(len(heads), 16, 1, generator=gen, dtype=F64)
    # opposite targets for tasks 0 and 1 make them conflict
    targets[1] = -targets[0] + 0.3 * targets[1]
    features = shared(x)
    losses = [nn.functional.mse_loss(h(features), targets[t]) for t, h in enumerate(heads)]
    return losses, features


def run_mtl_example(seed: int, num_tasks: int, library: str, aggregator: object) -> list[Tensor]:
    """One step of TorchJD's documented two-step usage, with TorchJD's functions or ours."""
    shared, heads = torchjd_mtl_model(seed, num_tasks)
    losses, features = torchjd_mtl_losses(shared, heads, seed)
    functions = autojac if library == "torchjd" else compat_torchjd
    functions.mtl_backward(losses, features=features)
    functions.jac_to_grad(shared.parameters(), aggregator)
    return [p.grad.clone() for p in [*shared.parameters(), *heads.parameters()]]


def assert_grads_close(ours: list[Tensor], theirs: list[Tensor], atol: float) -> None:
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=atol)


EXACT_ACROSS_LIBRARIES = [
    # (TorchJD aggregator factory, tasks, tolerance: TorchJD's solver accuracy)
    (tja.Mean, 3, 1e-12),
    (tja.Sum, 3, 1e-12),
    (lambda: tja.Constant(torch.tensor([0.5, -1.0, 2.0], dtype=F64)), 3, 1e-12),
    (tja.UPGrad, 3, 1e-10),  # quadprog; reg_eps 1e-4 on both sides (measured 8e-17)
    (tja.DualProj, 3, 1e-10),
    (tja.MGDA, 2, 1e-10),  # Frank-Wolfe is exact for two tasks
    (tja.PCGrad, 2, 1e-12),  # the order does not matter for two tasks
    (tja.IMTLG, 3, 1e-9),
    (tja.AlignedMTL, 3, 1e-9),
    (tja.ConFIG, 3, 1e-9),
    (lambda: tja.FairGrad(alpha=1.0), 3, 1e-8),  # scipy least squares (measured 3e-14)
]


@pytest.mark.parametrize("make, num_tasks, atol", EXACT_ACROSS_LIBRARIES)
def test_torchjd_documented_usage_gives_the_same_grads(
    make: object, num_tasks: int, atol: float
) -> None:
    theirs = run_mtl_example(0, num_tasks, "torchjd", make())  # type: ignore[operator]
    ours = run_mtl_example(0, num_tasks, "mtlgrad", make())  # type: ignore[operator]
    assert_grads_close(ours, theirs, atol)
    # the example conflicts, so the non-trivial methods are not the mean in disguise
    mean = run_mtl_example(0, num_tasks, "torchjd", tja.Mean())
    if make not in (tja.Mean,):
        assert max((a - b).abs().max().item() for a, b in zip(theirs, mean)) > 1e-3


def test_torchjd_mgda_three_tasks_ours_is_the_exact_min_norm_point() -> None:
    """TorchJD's Frank-Wolfe stops at epsilon; ours is exact: never longer, and close."""
    shared, heads = torchjd_mtl_model(1, 3)
    losses, features = torchjd_mtl_losses(shared, heads, 1)
    autojac.mtl_backward(losses, features=features, retain_graph=True)
    J = torch.cat([p.jac.reshape(3, -1) for p in shared.parameters()], 1)
    ours = compat_torchjd.from_torchjd(tja.MGDA())(J)
    # measured: 3.6% of the norm apart at TorchJD's defaults, 0.085% at epsilon=1e-6, 0.009% at
    # epsilon=1e-9 (Frank-Wolfe converges sublinearly towards ours)
    previous = float("inf")
    for epsilon, max_iters in [(1e-3, 100), (1e-6, 10_000)]:
        theirs = tja.MGDA(epsilon=epsilon, max_iters=max_iters)(J)
        assert ours.norm() <= theirs.norm() + 1e-12
        distance = ((ours - theirs).norm() / ours.norm()).item()
        assert distance < previous
        previous = distance
    assert previous < 2e-3


@pytest.mark.parametrize("num_tasks", [2, 3])
def test_torchjd_jac_fields_are_interchangeable(num_tasks: int) -> None:
    """Our mtl_backward writes TorchJD's .jac and head .grad; each library's jac_to_grad reads
    the other's .jac."""
    runs = {}
    for library in ("torchjd", "mtlgrad"):
        shared, heads = torchjd_mtl_model(2, num_tasks)
        losses, features = torchjd_mtl_losses(shared, heads, 2)
        (autojac if library == "torchjd" else compat_torchjd).mtl_backward(
            losses, features=features
        )
        runs[library] = (shared, heads)
    for a, b in zip(runs["mtlgrad"][0].parameters(), runs["torchjd"][0].parameters()):
        assert a.jac.shape == (num_tasks, *a.shape)
        torch.testing.assert_close(a.jac, b.jac, rtol=0, atol=1e-14)
    for a, b in zip(runs["mtlgrad"][1].parameters(), runs["torchjd"][1].parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-14)
    # crossed: TorchJD's jac_to_grad on our .jac, ours on TorchJD's
    w_theirs = autojac.jac_to_grad(runs["mtlgrad"][0].parameters(), tja.UPGrad())
    w_ours = compat_torchjd.jac_to_grad(runs["torchjd"][0].parameters(), tja.UPGrad())
    torch.testing.assert_close(w_ours, w_theirs, rtol=0, atol=1e-7)
    assert w_ours.dtype == F64
    for a, b in zip(runs["mtlgrad"][0].parameters(), runs["torchjd"][0].parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-7)
        assert not hasattr(a, "jac") and not hasattr(b, "jac")


def test_torchjd_backward_matches() -> None:
    """autojac.backward: per-entry rows, jac_tensors, inputs, chunking; .jac accumulates."""
    for chunk in (None, 1, 2):
        results = {}
        for library in ("torchjd", "mtlgrad"):
            torch.manual_seed(0)
            param = torch.randn(3, dtype=F64, requires_grad=True)
            other = torch.randn(2, 3, dtype=F64, requires_grad=True)
            y1 = torch.tensor([-1.0, 1.0, 2.0], dtype=F64) @ param
            y2 = (other @ param) ** 2  # two rows
            functions = autojac if library == "torchjd" else compat_torchjd
            functions.backward([y1, y2], parallel_chunk_size=chunk, retain_graph=True)
            J = [
                torch.tensor([1.0, 0.0, 2.0], dtype=F64),
                torch.tensor([[1.0, 0.0], [0.5, 2.0], [0.0, -1.0]], dtype=F64),
            ]
            functions.backward([y1, y2], jac_tensors=J, inputs=[param], parallel_chunk_size=chunk)
            results[library] = (param.jac.clone(), other.jac.clone())
        for a, b in zip(results["mtlgrad"], results["torchjd"]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
    assert results["mtlgrad"][0].shape == (3, 3) and results["mtlgrad"][1].shape == (3, 2, 3)


def test_torchjd_autogram_engine_translates_to_gram_engine() -> None:
    """TorchJD's autogram example (Engine + UPGradWeighting + losses.backward(weights)) and its
    README translation (mtlgrad.GramEngine + mtlgrad.backward) give the same weights and .grad."""
    from torchjd.autogram import Engine

    def model_and_batch() -> tuple[nn.Module, Tensor, Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 1)).to(F64)
        gen = torch.Generator().manual_seed(1)
        return (
            model,
            torch.randn(16, 5, generator=gen, dtype=F64),
            torch.randn(16, generator=gen, dtype=F64),
        )

    criterion = nn.MSELoss(reduction="none")
    model, x, y = model_and_batch()
    engine = Engine(model, batch_dim=0)
    losses = criterion(model(x).squeeze(dim=1), y)
    gramian = engine.compute_gramian(losses)
    weights_theirs = tja.UPGradWeighting()(gramian)
    losses.backward(weights_theirs)
    theirs = [p.grad.clone() for p in model.parameters()]

    model, x, y = model_and_batch()
    gram_engine = mtlgrad.GramEngine(model)
    losses = criterion(model(x).squeeze(dim=1), y)
    record = mtlgrad.backward(
        losses,
        shared_params=model.parameters(),
        aggregator=agg.UPGrad(reg_eps=1e-4),
        engine=gram_engine,
    )
    torch.testing.assert_close(record.gram, gramian, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(record.weights, weights_theirs, rtol=0, atol=1e-7)
    assert_grads_close([p.grad for p in model.parameters()], theirs, atol=1e-7)


def test_from_torchjd_maps_objects_names_and_settings() -> None:
    f = compat_torchjd.from_torchjd
    upgrad = f(tja.UPGrad())
    assert type(upgrad) is agg.UPGrad and upgrad.reg_eps == 1e-4
    from torchjd.linalg import QuadprogProjector

    assert f(tja.UPGrad(projector=QuadprogProjector(reg_eps=0.0))).reg_eps == 0.0
    assert f("DualProj", reg_eps=1e-3).reg_eps == 1e-3
    assert type(f(tja.UPGradWeighting())) is agg.UPGrad
    assert type(f(tja.Random())) is agg.RLW
    assert type(f("PCGrad")) is agg.PCGrad
    cagrad = f("CAGrad", c=0.4)
    assert type(cagrad) is agg.CAGrad and cagrad.c == 0.4 and cagrad.rescale == 0
    assert f(tja.GradVac(beta=0.25)).beta == 0.25
    assert f(tja.AlignedMTL(scale_mode="median")).scale_mode == "median"
    assert f(tja.GradDrop(leak=torch.tensor([0.0, 1.0]))).leak.tolist() == [0.0, 1.0]
    assert type(f(tja.FairGrad(alpha=2.0))) is agg.FairGrad
    nash = f("NashMTL", n_tasks=3, max_norm=2.0, optim_niter=5)
    assert (nash.max_norm, nash.optim_niter) == (2.0, 5)
    mine = agg.MGDA()
    assert f(mine) is mine
    krum = f(tja.Krum(n_byzantine=1, n_selected=2))
    assert type(krum) is agg.Krum and (krum.n_byzantine, krum.n_selected) == (1, 2)
    assert f("TrimmedMean", trim_number=2).trim_number == 2
    pcd = f(tja.PCD(tau=0.1, beta=0.9))
    assert type(pcd) is agg.PCD and (pcd.beta, pcd.eps) == (0.9, 1e-8)
    excess = f(tja.ExcessMTL(robust_step_size=0.5, n_warmup_steps=2))
    assert (excess.step_size, excess.warmup_steps) == (0.5, 2)
    # AlignedMTL is averaged (TorchJD), not summed (the official code, mtlgrad's AlignedMTL)
    J = torch.randn(3, 7, dtype=F64)
    torch.testing.assert_close(f("AlignedMTL")(J), agg.AlignedMTL()(J) / 3)
    torch.testing.assert_close(f("AlignedMTL")(J), tja.AlignedMTL()(J))


def test_from_torchjd_refuses_what_does_not_match() -> None:
    f = compat_torchjd.from_torchjd
    with pytest.raises(ValueError, match="TorchJD's CRMOGM is not translated: build mtlgrad"):
        f("CRMOGM")
    with pytest.raises(ValueError, match=r"MoDo is not translated: use mtlgrad.aggregators.MoDo"):
        f("MoDo")
    with pytest.raises(ValueError, match="pref_vector has no mtlgrad equivalent"):
        f(tja.UPGrad(pref_vector=torch.tensor([0.2, 0.8])))
    with pytest.raises(ValueError, match="custom f"):
        f(tja.GradDrop(f=lambda p: p**2))
    with pytest.raises(ValueError, match="unknown TorchJD aggregator 'Upgrad'; mapped: Mean"):
        f("Upgrad")
    with pytest.raises(TypeError, match=r"from_torchjd\('CAGrad'\): missing a required argument"):
        f("CAGrad")
    with pytest.raises(TypeError, match="expected a torchjd.aggregation aggregator"):
        f(torch.optim.SGD)
    with pytest.raises(ValueError, match=r"tensors\[0\] has no .jac field"):
        compat_torchjd.jac_to_grad([torch.zeros(2, requires_grad=True)], agg.Mean())
    with pytest.raises(ValueError, match="optimize_gramian_computation=True needs"):
        p = torch.zeros(2, requires_grad=True)
        p.jac = torch.ones(2, 2)
        compat_torchjd.jac_to_grad([p], tja.GradDrop(), optimize_gramian_computation=True)


def test_torchjd_jac_to_grad_keeps_the_mapped_state_and_names_bad_rows() -> None:
    gradvac = tja.GradVac()
    p = torch.zeros(4, dtype=F64, requires_grad=True)
    for _ in range(2):
        p.jac = torch.tensor([[1.0, 0.0, 0.0, 0.0], [-1.0, 1.0, 0.0, 0.0]], dtype=F64)
        compat_torchjd.jac_to_grad([p], gradvac)
    mapped = compat_torchjd._MAPPED_OBJECTS[gradvac]
    assert mapped.state_dict()["targets"].abs().sum() > 0  # the EMA targets moved
    p.jac = torch.tensor([[1.0, 0.0, 0.0, 0.0], [float("nan"), 0.0, 0.0, 0.0]], dtype=F64)
    with pytest.raises(mtlgrad.NonFiniteGradientError, match=r"row 1.*tensors\[0\]"):
        compat_torchjd.jac_to_grad([p], agg.Mean())
    assert hasattr(p, "jac")  # a failed call leaves .jac


@pytest.mark.parametrize("name", ["CAGrad", "NashMTL"])
def test_torchjd_cvxpy_methods(name: str) -> None:
    pytest.importorskip("cvxpy")
    make = (lambda: tja.CAGrad(c=0.5)) if name == "CAGrad" else (lambda: tja.NashMTL(n_tasks=3))
    theirs = run_mtl_example(3, 3, "torchjd", make())
    ours = run_mtl_example(3, 3, "mtlgrad", make())
    assert_grads_close(ours, theirs, atol=1e-6)  # measured: CAGrad 2e-10, NashMTL 7e-9


# ---- LibMTL -------------------------------------------------------------------------------------

LIBMTL_NAMES = [  # LibMTL/weighting/__init__.py and the bilevel names of LibMTL/config.py
    "EW", "GradNorm", "MGDA", "UW", "DWA", "GLS", "GradDrop", "PCGrad", "GradVac", "IMTL",
    "CAGrad", "Nash_MTL", "RLW", "MoCo", "Aligned_MTL", "DB_MTL", "STCH", "ExcessMTL", "FairGrad",
    "FAMO", "MoDo", "SDMGrad", "UPGrad", "MOML", "FORUM", "AutoLambda",
]  # fmt: skip


@pytest.mark.parametrize("name", LIBMTL_NAMES)
def test_libmtl_every_name_maps_or_names_the_closest(name: str) -> None:
    shared = [nn.Parameter(torch.randn(3, 2))]
    if name in libmtl.NOT_AVAILABLE:
        with pytest.raises(ValueError, match=f"no equivalent of LibMTL's {name}; closest: "):
            libmtl.weighting(name, num_tasks=3, shared_params=shared)
        return
    method = libmtl.weighting(name, num_tasks=3, shared_params=shared)
    assert isinstance(method, (agg.Aggregator, lw.LossWeighting))
    assert set(libmtl.METHODS) | set(libmtl.NOT_AVAILABLE) == set(LIBMTL_NAMES)


def test_libmtl_keyword_arguments_map_to_ours() -> None:
    w = libmtl.weighting
    cagrad = w("CAGrad", calpha=0.3, rescale=2)
    assert type(cagrad) is agg.CAGrad and (cagrad.c, cagrad.rescale) == (0.3, 2)
    assert (w("CAGrad").c, w("CAGrad").rescale) == (0.5, 1)  # LibMTL's defaults
    assert w("MGDA", mgda_gn="l2").normalization == "l2"
    assert w("GradVac", GradVac_beta=0.1).beta == 0.1
    nash = w("Nash_MTL", update_weights_every=3, optim_niter=7, max_norm=2.0)
    assert (nash.update_weights_every, nash.optim_niter, nash.max_norm) == (3, 7, 2.0)
    assert w("DWA", num_tasks=2, T=5.0).temperature == 5.0
    stch = w("STCH", num_tasks=2, STCH_mu=0.5, STCH_warmup_epoch=2)
    assert (stch.mu, stch.warmup_epochs) == (0.5, 2)
    famo = w("FAMO", num_tasks=2, FAMO_w_lr=0.1, FAMO_w_gamma=0.01)
    assert (famo.lr, famo.weight_decay) == (0.1, 0.01)
    assert w("FairGrad", FairGrad_alpha=2.0).alpha == 2.0
    assert w("UPGrad", UPGrad_reg_eps=1e-3).reg_eps == 1e-3
    assert w("GradDrop").leak is None
    moco = w("MoCo", MoCo_beta=0.3, MoCo_gamma=0.2)
    assert (moco.beta, moco.gamma, moco.normalize, moco.weight_update) == (
        0.3,
        0.2,
        True,
        "softmax",
    )
    db = w("DB_MTL", DB_beta=0.8, DB_beta_sigma=0.1)
    assert type(db) is agg.DBMTL and (db.beta, db.beta_decay) == (0.8, 0.1)
    assert w("GradDrop", num_tasks=2, leak=0.5).leak.tolist() == [0.5, 0.5]
    shared = [nn.Parameter(torch.randn(3, 2))]
    assert w("GradNorm", num_tasks=2, shared_params=shared, alpha=0.5).alpha == 0.5
    assert type(w("Aligned_MTL")) is agg.AlignedMTL and w("Aligned_MTL").scale_mode == "min"


def test_libmtl_loss_weightings_give_libmtls_objective() -> None:
    """EW, UW and GLS against LibMTL's formulas at the start of training."""
    losses = torch.tensor([0.7, 2.0, 0.1], dtype=F64)
    w = libmtl.weighting
    torch.testing.assert_close(w("EW", num_tasks=3)(losses), losses.sum())
    s = torch.full((3,), -0.5, dtype=F64)  # LibMTL's UW: loss_scale initialised to -0.5
    uw = (losses / (2 * s.exp()) + s / 2).sum()
    torch.testing.assert_close(w("UW", num_tasks=3)(losses).to(F64), uw)
    torch.testing.assert_close(w("GLS", num_tasks=3)(losses), losses.prod() ** (1 / 3))
    torch.testing.assert_close(w("DWA", num_tasks=3)(losses), losses.sum())  # first epochs: 1


def test_libmtl_aligned_mtl_weights_are_libmtls() -> None:
    """LibMTL's Aligned_MTL: alpha = B.sum(0) from the eigen-decomposition of G."""
    J = torch.randn(3, 20, dtype=F64, generator=torch.Generator().manual_seed(0))
    M = J @ J.T
    lmbda, V = torch.linalg.eigh(M)
    order = torch.argsort(lmbda, descending=True)
    lmbda, V = lmbda[order], V[:, order]
    B = lmbda[-1].sqrt() * ((V @ torch.diag(1 / lmbda.sqrt())) @ V.T)
    torch.testing.assert_close(libmtl.weighting("Aligned_MTL").weights(M), B.sum(0))


def test_libmtl_errors() -> None:
    w = libmtl.weighting
    with pytest.raises(
        ValueError, match=r"unknown LibMTL weighting 'Nash-MTL'; did you mean 'Nash_MTL'"
    ):
        w("Nash-MTL")
    with pytest.raises(ValueError, match=r"did you mean .*'PCGrad'"):
        w("pcgrad")
    with pytest.raises(
        TypeError,
        match=r"unexpected keyword argument\(s\) c; LibMTL's CAGrad takes: calpha, rescale",
    ):
        w("CAGrad", c=0.5)
    with pytest.raises(ValueError, match="is a loss weighting here .*pass num_tasks="):
        w("EW")
    with pytest.raises(ValueError, match="pass shared_params="):
        w("GradNorm", num_tasks=2)
    with pytest.raises(ValueError, match="GradVac_group_type=1"):
        w("GradVac", GradVac_group_type=1)
    with pytest.raises(ValueError, match="UPGrad_norm_eps=0.01"):
        w("UPGrad", UPGrad_norm_eps=0.01)
    with pytest.raises(ValueError, match="non-zero leak needs num_tasks="):
        w("GradDrop", leak=0.2)
    with pytest.raises(ValueError, match="closest: aggregators.IMTLG"):
        w("IMTL")
