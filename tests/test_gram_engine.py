"""The gram engine: G layer by layer against the loop engine's G, the written .grad, both
per-layer ways, reused modules, free parameters, per-sample losses, AMP, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from training_helpers import NoVmap, gram_aggregator_classes, make_aggregator

import mtlgrad
from mtlgrad.aggregators import MGDA, PCGrad, Sum, UPGrad
from mtlgrad.optim import MTLOptimizer
from mtlgrad.step import _gram_engine, _layer_grams, _task_parts
from mtlgrad.step._differentiate import partition

DTYPE = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class MLP(nn.Module):
    def __init__(self, tasks: int = 3) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.LayerNorm(16), nn.Tanh()
        )
        self.heads = nn.ModuleList(nn.Linear(16, 1) for _ in range(tasks))

    def forward(self, x):
        z = self.trunk(x)
        return [h(z).squeeze(-1) for h in self.heads]


class CNN(nn.Module):
    def __init__(self, tasks: int = 3) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.Conv2d(6, 8, 3, stride=2, padding=1, padding_mode="reflect"),
            nn.GroupNorm(2, 8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 1, bias=False),
            nn.Flatten(),
        )
        self.conv1d = nn.Conv1d(8, 4, 3, padding=2, dilation=2)
        self.heads = nn.ModuleList(nn.Linear(4 * 16, 1) for _ in range(tasks))

    def forward(self, x):
        z = self.trunk(x).reshape(x.shape[0], 8, 16)
        z = self.conv1d(z).flatten(1)
        return [h(z).squeeze(-1) for h in self.heads]


class TransformerBlock(nn.Module):
    """Embedding, attention (a module with parameters of its own and a Linear child: the generic
    path), LayerNorm, MLP."""

    def __init__(self, tasks: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 16, padding_idx=0)
        self.attention = nn.MultiheadAttention(16, 2, batch_first=True)
        self.norm = nn.LayerNorm(16)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.heads = nn.ModuleList(nn.Linear(16, 1) for _ in range(tasks))

    def forward(self, tokens):
        h = self.embed(tokens)
        a, _ = self.attention(h, h, h, need_weights=False)
        h = self.norm(h + a)
        h = h + self.mlp(h)
        z = h.mean(dim=1)
        return [head(z).squeeze(-1) for head in self.heads]


class Reused(nn.Module):
    """One Linear applied twice (recurrence) and a parameter used functionally."""

    def __init__(self, tasks: int = 3) -> None:
        super().__init__()
        self.cell = nn.Linear(8, 8)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 8))
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(tasks))

    def forward(self, x):
        h = torch.tanh(self.cell(x))
        h = torch.tanh(self.cell(h)) * self.scale
        return [head(h).squeeze(-1) for head in self.heads]


class Tied(nn.Module):
    """A weight shared by two modules, and a module's parameter also used outside it."""

    def __init__(self, tasks: int = 3) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.b.weight = self.a.weight
        self.c = nn.Linear(8, 8)
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(tasks))

    def forward(self, x):
        h = torch.tanh(self.b(torch.tanh(self.a(x))))
        h = self.c(h) + h @ self.c.weight  # c.weight inside c and outside it
        return [head(h).squeeze(-1) for head in self.heads]


class Decoders(nn.Module):
    """The tasks' own parts of the graph: two tasks with a decoder of their own (one of them after
    a shared layer that no other task uses, the other gated by a row of a trunk weight, used
    functionally), two tasks sharing one head, and a task whose loss reads the trunk's output
    directly."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.gate = nn.Linear(16, 16)
        self.adapter = nn.Linear(16, 16)
        decoders = [nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 1)) for _ in range(2)]
        self.heads = nn.ModuleList([*decoders, nn.Linear(16, 1)])

    def forward(self, x):
        z = self.gate(self.trunk(x))
        shared_head = self.heads[2](z).squeeze(-1)
        return [
            self.heads[0](self.adapter(z)).squeeze(-1),
            self.heads[1](z * self.gate.weight[0]).squeeze(-1),
            shared_head,
            2 * shared_head,
            z.sum(-1),
        ]


class SkipHeads(nn.Module):
    """Heads that read the trunk's output and an intermediate below it: each task's part ends at
    two edges, one below the other, which is no cut."""

    def __init__(self, tasks: int = 3) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, 16), nn.Tanh())
        self.top = nn.Sequential(nn.Linear(16, 16), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(32, 1) for _ in range(tasks))

    def forward(self, x):
        h = self.trunk(x)
        z = self.top(h)
        return [head(torch.cat([z, h], dim=-1)).squeeze(-1) for head in self.heads]


def inputs(name: str, seed: int = 0):
    g = gen(seed)
    if name == "cnn":
        return torch.randn(4, 3, 8, 8, generator=g, dtype=DTYPE)
    if name == "transformer":
        tokens = torch.randint(0, 20, (4, 5), generator=g)
        tokens[0, -1] = 0  # a padding token
        return tokens
    if name == "reused" or name == "tied":
        return torch.randn(10, 8, generator=g, dtype=DTYPE)
    return torch.randn(12, 6, generator=g, dtype=DTYPE)


MODELS = {
    "mlp": MLP,
    "cnn": CNN,
    "transformer": TransformerBlock,
    "reused": Reused,
    "tied": Tied,
    "decoders": Decoders,
    "skip_heads": SkipHeads,
}


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[name]().to(DTYPE)


def shared_of(model: nn.Module) -> list[nn.Parameter]:
    heads = {id(p) for p in model.heads.parameters()}
    return [p for p in model.parameters() if id(p) not in heads]


def losses_of(model: nn.Module, x, seed: int = 1) -> list[torch.Tensor]:
    outputs = model(x)
    y = torch.randn(outputs[0].shape[0], len(outputs), generator=gen(seed), dtype=DTYPE)
    return [((o - y[:, t]) ** 2).mean() * (t + 1) for t, o in enumerate(outputs)]


def step(name: str, aggregator, engine, seed: int = 0, **kwargs):
    model = build(name, seed)
    if engine == "gram":
        engine = mtlgrad.GramEngine(model)
    x = inputs(name, seed)
    record = mtlgrad.backward(
        losses_of(model, x),
        shared_params=shared_of(model),
        aggregator=aggregator,
        engine=engine,
        **kwargs,
    )
    return model, record


def assert_same_step(name: str, make_aggregator_, **kwargs) -> None:
    reference, expected = step(name, make_aggregator_(), "loop", **kwargs)
    model, record = step(name, make_aggregator_(), "gram", **kwargs)
    scale = float(expected.gram.abs().max())
    torch.testing.assert_close(record.gram, expected.gram, rtol=0, atol=1e-10 * scale)
    torch.testing.assert_close(record.weights, expected.weights, rtol=1e-8, atol=1e-10)
    for (n, p), q in zip(reference.named_parameters(), model.parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-11, msg=n)


def loop_then_gram(reference: nn.Module, model: nn.Module, x) -> tuple:
    """The records of a UPGrad step of ``reference`` by the loop engine and of ``model`` by
    the gram engine (hooked before its forward), on the same input."""
    expected = mtlgrad.backward(
        losses_of(reference, x), shared_params=shared_of(reference), aggregator=UPGrad()
    )
    engine = mtlgrad.GramEngine(model)
    assert engine._layers, "nothing hooked"
    record = mtlgrad.backward(
        losses_of(model, x), shared_params=shared_of(model), aggregator=UPGrad(), engine=engine
    )
    return expected, record


# vmap has no batching rule for CPU flash attention's backward: torch warns of a slower fallback.
# The Decoders model's adapter is, on purpose, a shared layer that one task alone reaches.
pytestmark = [
    pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*reached by the loss of 'task 0' only:UserWarning"),
]


def fail_vmap(monkeypatch) -> None:
    """Makes the engine's vmapped backward fail, as where a node has no batching rule."""

    def failing(*args, **kwargs):
        raise RuntimeError("vmap: no batching rule (the test's)")

    monkeypatch.setattr(torch, "vmap", failing)


@pytest.mark.parametrize("vmapped", [True, False], ids=["vmapped", "task_by_task"])
@pytest.mark.parametrize("name", list(MODELS))
def test_gram_and_grad_equal_the_loop_engine(monkeypatch, name: str, vmapped: bool) -> None:
    """Both ways of running the backward over the tasks: vmapped, and one task at a time where
    vmap fails (each materialising layer's gradient taken as the task's output gradients
    arrive; the ghost layers keep them until the last task)."""
    monkeypatch.setattr(_gram_engine._Plan, "holds_less_per_task", lambda *args: False)
    if not vmapped:
        fail_vmap(monkeypatch)
    assert_same_step(name, UPGrad)


def parts_found(monkeypatch, name: str) -> list:
    """The tasks' parts the engine found in a step of model ``name`` (None: no split)."""
    found = []

    def spy(*args, **kwargs):
        found.append(find(*args, **kwargs))
        return found[-1]

    find = _task_parts.find
    monkeypatch.setattr(_task_parts, "find", spy)
    assert_same_step(name, UPGrad)
    return found


def test_each_tasks_own_part_is_differentiated_alone(monkeypatch) -> None:
    """The heads are differentiated one task at a time, and the vmapped backward starts where
    the tasks' parts end: the trunk's output for the decoders, the task without parameters of
    its own and the gated decoder (with the gate's row too), the shared head's output for the
    two tasks that share it."""
    (parts,) = parts_found(monkeypatch, "decoders")
    assert parts is not None and parts.own == [True] * 5
    ends = [{type(parts.edges[i].node).__name__ for i in frontier} for frontier in parts.frontier]
    assert ends[0] == ends[4] == {"_IdentityBackward"}  # the adapter's, the gate's output
    assert parts.frontier[0] != parts.frontier[4]
    assert ends[1] == {"_IdentityBackward", "SelectBackward0"}
    assert ends[2] == ends[3] == {"SqueezeBackward1"}  # the shared head's output
    assert parts.frontier[2] == parts.frontier[3]
    (parts,) = parts_found(monkeypatch, "mlp")
    assert parts is not None and all(f == parts.frontier[0] for f in parts.frontier)


def test_parts_that_end_one_below_another_are_not_split(monkeypatch) -> None:
    """A head reading the trunk's output and an intermediate below it: the gradient at the
    intermediate includes the path through the output, so a split would count it twice (checked:
    forcing it gives a different G); the engine does without it, and stays exact."""
    assert parts_found(monkeypatch, "skip_heads") == [None]
    monkeypatch.setattr(_task_parts, "_is_cut", lambda nodes: True)
    reference, expected = step("skip_heads", UPGrad(), "loop")
    _, forced = step("skip_heads", UPGrad(), "gram")
    assert not torch.allclose(forced.gram, expected.gram, rtol=1e-3)


def test_the_same_loss_for_two_tasks_and_a_constant_loss() -> None:
    """A loss given twice has no part of its own (two edges lead into it); a constant loss has
    no graph: both are exact beside a task whose head is split off."""
    records = []
    for engine in ("loop", "gram"):
        model = build("mlp")
        how = mtlgrad.GramEngine(model) if engine == "gram" else engine
        outputs = model(inputs("mlp"))
        first = outputs[0].pow(2).mean()
        losses = [first, outputs[1].pow(2).mean(), first]
        records.append(
            mtlgrad.backward(
                losses, shared_params=shared_of(model), aggregator=UPGrad(), engine=how
            )
        )
    torch.testing.assert_close(records[1].gram, records[0].gram, rtol=1e-10, atol=0)


class WideCNN(nn.Module):
    """Many rows, few parameters: 32 x 32 images, 4 and 8 channels."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 8, 3)
        )
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(3))

    def forward(self, x):
        z = self.trunk(x).mean(dim=(2, 3))
        return [h(z).squeeze(-1) for h in self.heads]


def test_many_rows_and_few_parameters_take_the_gradients_per_task(monkeypatch) -> None:
    """A convolutional trunk whose layers all materialise and whose activations outnumber its
    parameters takes the T gradients by one backward per task (no vmapped backward runs); an
    MLP with ghost-way layers is vmapped."""
    chosen, vmapped = [], []
    holds_less = _gram_engine._Plan.holds_less_per_task
    vmap = torch.vmap

    def spy(self, *args):
        chosen.append(holds_less(self, *args))
        return chosen[-1]

    def spy_vmap(*args, **kwargs):
        vmapped.append(True)
        return vmap(*args, **kwargs)

    monkeypatch.setattr(_gram_engine._Plan, "holds_less_per_task", spy)
    monkeypatch.setattr(torch, "vmap", spy_vmap)
    torch.manual_seed(0)
    reference, model = WideCNN().to(DTYPE), WideCNN().to(DTYPE)
    model.load_state_dict(reference.state_dict())
    x = torch.randn(2, 3, 32, 32, generator=gen(0), dtype=DTYPE)
    expected, record = loop_then_gram(reference, model, x)
    assert chosen == [True] and not vmapped
    torch.testing.assert_close(record.gram, expected.gram, rtol=1e-10, atol=0)
    for p, q in zip(reference.parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad)
    chosen.clear()
    wide = MLP()  # few rows, wide layers: the ghost way, which needs the T output gradients
    wide.trunk = nn.Sequential(nn.Linear(6, 64), nn.Tanh(), nn.Linear(64, 64))
    wide.heads = nn.ModuleList(nn.Linear(64, 1) for _ in range(3))
    wide = wide.to(DTYPE)
    engine = mtlgrad.GramEngine(wide)
    losses = losses_of(wide, inputs("mlp")[:4])
    mtlgrad.backward(losses, shared_params=shared_of(wide), aggregator=UPGrad(), engine=engine)
    assert chosen == [False] and vmapped


def test_the_anchor_is_no_ones_parameter() -> None:
    """The engine's anchor is a leaf of the graph: the step's walk must not take it for a head
    (it would backpropagate through the whole trunk a second time to fill its .grad)."""
    model = build("mlp")
    engine = mtlgrad.GramEngine(model)
    losses = losses_of(model, inputs("mlp"))
    parts = partition(losses, shared=shared_of(model))
    assert all(not getattr(h, "_mtlgrad_gram_anchor", False) for hs in parts.heads for h in hs)
    mtlgrad.backward(losses, shared_params=shared_of(model), aggregator=UPGrad(), engine=engine)
    assert engine._anchors and all(a.grad is None for a in engine._anchors.values())


@pytest.mark.parametrize("cls", gram_aggregator_classes(), ids=lambda c: c.__name__)
def test_every_gram_aggregator_writes_the_loop_engines_grad(cls) -> None:
    assert_same_step("mlp", lambda: make_aggregator(cls, seed=3))


@pytest.mark.parametrize("way", ["ghost", "materialise"])
@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer", "reused"])
def test_both_ways_per_layer_are_exact(monkeypatch, name: str, way: str) -> None:
    monkeypatch.setattr(_layer_grams, "FORCE_WAY", [way])
    assert_same_step(name, MGDA)


def test_both_ways_agree_on_one_layer() -> None:
    g = gen(5)
    X = torch.randn(7, 5, generator=g, dtype=DTYPE)
    D = torch.randn(4, 7, 3, generator=g, dtype=DTYPE)
    ghost = _layer_grams._rows_gram(X, D, "ghost")
    materialised = _layer_grams._rows_gram(X, D, "materialise")
    grads = torch.stack([D[t].T @ X for t in range(4)])
    torch.testing.assert_close(materialised, grads)
    flat = grads.reshape(4, -1)
    torch.testing.assert_close(ghost, flat @ flat.T)
    torch.testing.assert_close(_layer_grams.gram64(materialised), flat @ flat.T)


def test_the_cost_model_picks_the_cheaper_way() -> None:
    # Few rows, a wide layer: ghost; many rows, a narrow layer: materialise.
    ghost, materialise = _layer_grams.weight_row_costs(rows=64, fan_in=1024, fan_out=1024, tasks=8)
    assert ghost < materialise
    ghost, materialise = _layer_grams.weight_row_costs(rows=4096, fan_in=16, fan_out=16, tasks=8)
    assert ghost > materialise


def test_frozen_layers_are_skipped() -> None:
    def make(name, seed=0):
        model = build("mlp")
        model.trunk[0].requires_grad_(False)
        return model

    reference, model = make("mlp"), make("mlp")
    x = inputs("mlp")
    expected, record = loop_then_gram(reference, model, x)
    torch.testing.assert_close(record.gram, expected.gram, rtol=1e-10, atol=0)
    assert model.trunk[0].weight.grad is None
    for p, q in zip(reference.parameters(), model.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad)


def test_per_sample_losses_give_the_per_sample_gram() -> None:
    model = build("mlp")
    engine = mtlgrad.GramEngine(model)
    x = inputs("mlp")
    y = torch.randn(12, generator=gen(2), dtype=DTYPE)
    per_sample = (model(x)[0] - y) ** 2  # 12 losses, one per sample
    record = mtlgrad.backward(
        per_sample, shared_params=model.trunk.parameters(), aggregator=Sum(), engine=engine
    )
    reference = build("mlp")
    shared = list(reference.trunk.parameters())
    rows = []
    per_sample_ref = (reference(x)[0] - y) ** 2
    for i in range(12):
        grads = torch.autograd.grad(per_sample_ref[i], shared, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    J = torch.stack(rows)
    torch.testing.assert_close(record.gram, J @ J.T, rtol=1e-10, atol=1e-12)
    expected = J.sum(0)
    got = torch.cat([p.grad.reshape(-1) for p in model.trunk.parameters()])
    torch.testing.assert_close(got, expected)


def test_samples_by_tasks_losses() -> None:
    model = build("mlp")
    engine = mtlgrad.GramEngine(model)
    x = inputs("mlp")
    outputs = torch.stack(model(x), dim=1)  # 12 x 3
    losses = outputs**2
    record = mtlgrad.backward(
        losses, shared_params=model.trunk.parameters(), aggregator=UPGrad(), engine=engine
    )
    assert record.gram.shape == (36, 36)
    assert record.names[:2] == ["losses[0, 0]", "losses[0, 1]"]


def test_vmap_failure_falls_back_to_one_backward_per_task() -> None:
    class Model(MLP):
        def forward(self, x):
            z = NoVmap.apply(self.trunk(x))
            return [h(z).squeeze(-1) for h in self.heads]

    torch.manual_seed(0)
    reference, model = Model().to(DTYPE), Model().to(DTYPE)
    model.load_state_dict(reference.state_dict())
    x = inputs("mlp")
    expected, record = loop_then_gram(reference, model, x)
    torch.testing.assert_close(record.gram, expected.gram, rtol=1e-10, atol=0)
    for p, q in zip(reference.parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad)


def test_gradient_accumulation_and_heads() -> None:
    reference, model = build("mlp"), build("mlp")
    engine = mtlgrad.GramEngine(model)
    for micro in range(2):
        x = inputs("mlp", seed=10 + micro)
        mtlgrad.backward(
            losses_of(reference, x, seed=micro),
            shared_params=shared_of(reference),
            aggregator=MGDA(),
        )
        mtlgrad.backward(
            losses_of(model, x, seed=micro),
            shared_params=shared_of(model),
            aggregator=MGDA(),
            engine=engine,
        )
    for p, q in zip(reference.parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad)


def test_heads_scaled_on_request() -> None:
    assert_same_step("mlp", MGDA, scale_task_params=True)


def test_grad_scaler() -> None:
    model = build("mlp")
    engine = mtlgrad.GramEngine(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    x = inputs("mlp")
    record = mtlgrad.backward(
        losses_of(model, x),
        shared_params=shared_of(model),
        aggregator=MGDA(),
        engine=engine,
        scaler=scaler,
    )
    reference, expected = step("mlp", MGDA(), "loop")
    torch.testing.assert_close(record.gram, expected.gram)
    for p, q in zip(shared_of(reference), shared_of(model)):
        torch.testing.assert_close(q.grad, p.grad * 2.0**8)
    # An overflow skips the step.
    overflowing = build("mlp")
    engine = mtlgrad.GramEngine(overflowing)
    losses = losses_of(overflowing, x)
    losses[1] = losses[1] * 1e305
    record = mtlgrad.backward(
        losses,
        shared_params=shared_of(overflowing),
        aggregator=MGDA(),
        engine=engine,
        scaler=scaler,
    )
    assert record.skipped
    assert all(torch.isnan(p.grad).all() for p in shared_of(overflowing))


@pytest.mark.parametrize("how", ["vmapped", "task_by_task", "per_task_gradients"])
def test_a_nonfinite_gradient_names_its_task_and_parameter_and_writes_nothing(
    monkeypatch, how: str
) -> None:
    per_task = how == "per_task_gradients"
    monkeypatch.setattr(_gram_engine._Plan, "holds_less_per_task", lambda *args: per_task)
    if how == "task_by_task":
        fail_vmap(monkeypatch)
    model = build("mlp")
    engine = mtlgrad.GramEngine(model)
    outputs = model(inputs("mlp"))
    losses = {
        "depth": outputs[0].pow(2).mean(),
        "seg": (outputs[1] * float("inf")).mean(),
        "normals": outputs[2].pow(2).mean(),
    }
    with pytest.raises(mtlgrad.NonFiniteGradientError, match="task 'seg': parameter") as caught:
        mtlgrad.backward(losses, shared_params=shared_of(model), aggregator=UPGrad(), engine=engine)
    assert caught.value.tasks == [1]
    assert all(p.grad is None for p in model.parameters())


def test_errors_name_the_engines() -> None:
    from mtlgrad.aggregators import GradDrop

    model = build("mlp")
    engine = mtlgrad.GramEngine(model)
    losses = losses_of(model, inputs("mlp"))
    with pytest.raises(TypeError, match="GradDrop is not Gram-based.*engine='loop'"):
        mtlgrad.backward(
            losses, shared_params=shared_of(model), aggregator=GradDrop(), engine=engine
        )
    with pytest.raises(ValueError, match="engine='gram' needs the shared modules hooked"):
        mtlgrad.backward(losses, shared_params=shared_of(model), aggregator=Sum(), engine="gram")
    with pytest.raises(TypeError, match="not a module"):
        mtlgrad.GramEngine(torch.zeros(2))


def test_mtl_optimizer_builds_the_engine_from_the_model() -> None:
    from mtlgrad.nn import MultiTaskModel

    def build_model():
        torch.manual_seed(0)
        return MultiTaskModel(
            nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16)),
            {"a": nn.Linear(16, 1), "b": nn.Linear(16, 1)},
        ).to(DTYPE)

    a, b = build_model(), build_model()
    loop = MTLOptimizer(torch.optim.SGD(a.parameters(), lr=0.1), PCGrad(generator=gen(0)), model=a)
    gram = MTLOptimizer(
        torch.optim.SGD(b.parameters(), lr=0.1), PCGrad(generator=gen(0)), model=b, engine="gram"
    )
    x = inputs("mlp")
    for optimizer, model in ((loop, a), (gram, b)):
        for _ in range(3):
            optimizer.zero_grad()
            out = model(x)
            optimizer.backward({n: o.pow(2).mean() for n, o in out.items()})
            optimizer.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(q, p)
    with pytest.raises(ValueError, match="engine='gram' needs model="):
        MTLOptimizer(torch.optim.SGD(a.parameters(), lr=0.1), Sum(), engine="gram")


def test_compiled_model() -> None:
    reference, model = build("mlp"), build("mlp")
    engine = mtlgrad.GramEngine(model)
    compiled = torch.compile(model, backend="aot_eager")
    x = inputs("mlp")
    expected = mtlgrad.backward(
        losses_of(reference, x), shared_params=shared_of(reference), aggregator=UPGrad()
    )
    record = mtlgrad.backward(
        losses_of(compiled, x),
        shared_params=shared_of(model),
        aggregator=UPGrad(),
        engine=engine,
    )
    torch.testing.assert_close(record.gram, expected.gram, rtol=1e-10, atol=0)


def test_hooks_keep_nothing_without_a_step_and_can_be_removed() -> None:
    import gc

    from mtlgrad.step._gram_engine import _Call

    def live_calls() -> int:
        gc.collect()
        return sum(type(o) is _Call for o in gc.get_objects())

    model = build("mlp")
    engine = mtlgrad.GramEngine(model)
    before = live_calls()
    out = model(inputs("mlp"))
    assert live_calls() == before + 6  # two Linear and a LayerNorm in the trunk, three heads
    del out
    assert live_calls() == before  # the calls' records went with the graph
    with torch.no_grad():
        out = model(inputs("mlp"))
    assert out[0].grad_fn is None and live_calls() == before
    engine.remove()
    out = model(inputs("mlp"))
    with pytest.raises(RuntimeError, match="hooks were removed"):
        mtlgrad.backward(
            [o.sum() for o in out], shared_params=shared_of(model), aggregator=Sum(), engine=engine
        )


def test_an_engine_built_after_the_forward_warns() -> None:
    reference, model = build("mlp"), build("mlp")
    x = inputs("mlp")
    expected = mtlgrad.backward(
        losses_of(reference, x), shared_params=shared_of(reference), aggregator=UPGrad()
    )
    losses = losses_of(model, x)
    engine = mtlgrad.GramEngine(model)  # too late: the forward ran unhooked
    with pytest.warns(UserWarning, match="Build the engine before the forward"):
        record = mtlgrad.backward(
            losses, shared_params=shared_of(model), aggregator=UPGrad(), engine=engine
        )
    torch.testing.assert_close(record.gram, expected.gram, rtol=1e-10, atol=0)


def test_the_stages_show_in_the_profiler() -> None:
    # The heads, the backward over the tasks, each layer's contribution and the write are named
    # ranges (benchmarks/profile_gram_engine.py reads them).
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        step("mlp", UPGrad(), "gram")
    names = {event.key for event in profile.key_averages()}
    for stage in ("heads", "backward", "layer", "write"):
        assert f"mtlgrad::gram_engine::{stage}" in names, sorted(names)[:20]
