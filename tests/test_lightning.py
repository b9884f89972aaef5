"""PyTorch Lightning: mtl_step and AggregatorCheckpoint against hand-written reference loops."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pl = pytest.importorskip("lightning.pytorch")

import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import mtlgrad  # noqa: E402
from mtlgrad.aggregators import GradVac, PCGrad, UPGrad  # noqa: E402
from mtlgrad.integrations.lightning import AggregatorCheckpoint, mtl_step  # noqa: E402
from mtlgrad.optim import MTLOptimizer  # noqa: E402

TASKS = ("depth", "seg")
BATCH, BATCHES = 8, 3


class TwoTaskNet(nn.Module):
    """A shared trunk and one head per task, the heads equal at first and their targets opposite
    (the task gradients conflict)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(5, 12), nn.Tanh())
        self.heads = nn.ModuleDict({t: nn.Linear(12, 1) for t in TASKS})
        self.heads["seg"].load_state_dict(self.heads["depth"].state_dict())

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.trunk(x)
        return {
            t: ((head(z).squeeze(-1).float() - (i + 1) * y[:, i]) ** 2).mean() * (i + 1)
            for i, (t, head) in enumerate(self.heads.items())
        }


def dataset(scale: float = 1.0) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH * BATCHES, 5, generator=g) * scale
    y = torch.randn(BATCH * BATCHES, 1, generator=g) * torch.tensor([1.0, -1.0])
    return TensorDataset(x, y)


def batches(data: TensorDataset, size: int = BATCH) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(DataLoader(data, batch_size=size, shuffle=False))


def gradvac() -> GradVac:
    return GradVac(beta=0.3, generator=torch.Generator().manual_seed(7))


def pcgrad() -> PCGrad:
    return PCGrad(generator=torch.Generator().manual_seed(7))


def sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def adam(params: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=0.01)


class MTLModule(pl.LightningModule):
    """mtl_step with the MTLOptimizer from configure_optimizers."""

    def __init__(
        self,
        make_aggregator: Callable[[], Any] = gradvac,
        make_optimizer: Callable[[Any], torch.optim.Optimizer] = sgd,
        scheduler: dict[str, Any] | None = None,
        **step_options: Any,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = TwoTaskNet()
        self.make_aggregator = make_aggregator
        self.make_optimizer = make_optimizer
        self.scheduler = scheduler
        self.step_options = step_options
        self.records: list[mtlgrad.StepRecord] = []

    def configure_optimizers(self) -> Any:
        optimizer = MTLOptimizer(
            self.make_optimizer(self.net.parameters()),
            self.make_aggregator(),
            shared_params=self.net.trunk.parameters(),
        )
        if self.scheduler is None:
            return optimizer
        config = dict(self.scheduler)
        config["scheduler"] = config.pop("make")(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": config}

    def training_step(self, batch: Any, batch_idx: int) -> None:
        self.records.append(mtl_step(self, self.net.losses(*batch), **self.step_options))


class FunctionalModule(pl.LightningModule):
    """The functional mtlgrad.backward with a bare aggregator, stepped by hand."""

    def __init__(self, with_checkpoint_callback: bool = True) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = TwoTaskNet()
        self.aggregator = gradvac()
        self.with_checkpoint_callback = with_checkpoint_callback

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return adam(self.net.parameters())

    def configure_callbacks(self) -> list[pl.Callback]:
        return [AggregatorCheckpoint(self.aggregator)] if self.with_checkpoint_callback else []

    def training_step(self, batch: Any, batch_idx: int) -> None:
        optimizer = self.optimizers()
        mtlgrad.backward(
            self.net.losses(*batch),
            shared_params=self.net.trunk.parameters(),
            aggregator=self.aggregator,
        )
        optimizer.step()
        optimizer.zero_grad()


def trainer(epochs: int, **options: Any) -> pl.Trainer:
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": epochs,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "logger": False,
        "enable_checkpointing": False,
    }
    return pl.Trainer(**{**defaults, **options})


def fit(module: pl.LightningModule, epochs: int, data: TensorDataset | None = None, **options):
    loader = DataLoader(dataset() if data is None else data, batch_size=BATCH, shuffle=False)
    ckpt_path = options.pop("ckpt_path", None)
    t = trainer(epochs, **options)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*GPU available but not used.*")
        # weights_only: the checkpoints (mtlgrad's state included) load without unpickling code
        t.fit(module, loader, ckpt_path=ckpt_path, weights_only=True if ckpt_path else None)
    return t


def reference(
    make_aggregator: Callable[[], Any],
    make_optimizer: Callable[[Any], torch.optim.Optimizer],
    epochs: int,
    *,
    data: TensorDataset | None = None,
    clip_norm: float | None = None,
    step_lr: tuple[str, int, int] | None = None,
    batch_size: int = BATCH,
) -> TwoTaskNet:
    """The hand-written loop: MTLOptimizer, clip_grad_norm_, step, StepLR by hand."""
    net = TwoTaskNet()
    optimizer = MTLOptimizer(
        make_optimizer(net.parameters()), make_aggregator(), shared_params=net.trunk.parameters()
    )
    scheduler = None
    if step_lr is not None:
        interval, every, step_size = step_lr
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=0.5)
    steps = 0
    for _ in range(epochs):
        for x, y in batches(dataset() if data is None else data, batch_size):
            optimizer.backward(net.losses(x, y))
            if clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(net.parameters(), clip_norm)
            optimizer.step()
            optimizer.zero_grad()
            steps += 1
            if scheduler is not None and interval == "step" and steps % every == 0:
                scheduler.step()
        if scheduler is not None and interval == "epoch":
            scheduler.step()
    return net


def parameters(net: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in net.parameters()]


def assert_equal_parameters(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), f"{name} differs by {(p - q).abs().max().item():.3g}"


# ---- fit equals the hand-written loop -------------------------------------------------------


@pytest.mark.parametrize("make_aggregator", [gradvac, pcgrad], ids=["gradvac", "pcgrad"])
def test_fit_equals_hand_written_loop(make_aggregator) -> None:
    module = MTLModule(make_aggregator)
    t = fit(module, epochs=2)
    assert t.global_step == 2 * BATCHES
    expected = reference(make_aggregator, sgd, epochs=2)
    assert_equal_parameters(module.net, expected)
    # the parameters moved, and the method reweighted (the weights are not all ones)
    assert not torch.equal(parameters(module.net)[0], parameters(TwoTaskNet())[0])
    assert any(
        not torch.equal(r.weights, torch.ones(2, dtype=torch.float64)) for r in module.records
    )


# ---- checkpoints ------------------------------------------------------------------------------


@pytest.mark.parametrize("every", ["epoch", "step"])
def test_resume_from_checkpoint_is_bit_identical(tmp_path: Path, every: str) -> None:
    # A checkpoint after the second epoch, taken by epoch or by step count. (Mid-epoch, Lightning
    # restarts a plain DataLoader from its first batch and warns that the result is unreliable.)
    if every == "epoch":
        options, name = {"filename": "{epoch}"}, "epoch=1.ckpt"
    else:
        options, name = {"filename": "{step}", "every_n_train_steps": BATCHES}, "step=6.ckpt"
    scheduler = {"make": lambda o: torch.optim.lr_scheduler.StepLR(o, 1, 0.5), "interval": "epoch"}
    whole = MTLModule(gradvac, adam, scheduler)
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, **options)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*no pre-optimization state was saved.*")
        fit(whole, epochs=4, enable_checkpointing=True, callbacks=[checkpoints])
    resumed = MTLModule(gradvac, adam, scheduler)
    with warnings.catch_warnings():  # the ModelCheckpoint that wrote it is not needed to resume
        warnings.filterwarnings("ignore", ".*callbacks used to create the checkpoint.*")
        fit(resumed, epochs=4, ckpt_path=tmp_path / name)
    assert_equal_parameters(resumed.net, whole.net)
    # the targets came back from the checkpoint (a fresh GradVac would start from zeros)
    assert not torch.equal(resumed.records[0].weights, whole.records[0].weights)
    assert torch.equal(resumed.records[0].weights, whole.records[2 * BATCHES].weights)
    assert resumed.optimizers().param_groups[0]["lr"] == pytest.approx(0.01 * 0.5**4)


@pytest.mark.parametrize("with_callback", [True, False], ids=["with-callback", "without"])
def test_functional_backward_resumes_with_aggregator_checkpoint(tmp_path, with_callback) -> None:
    whole = FunctionalModule(with_callback)
    fit(whole, epochs=3)
    first = FunctionalModule(with_callback)
    t = fit(first, epochs=2)
    t.save_checkpoint(tmp_path / "two.ckpt")
    resumed = FunctionalModule(with_callback)
    fit(resumed, epochs=3, ckpt_path=tmp_path / "two.ckpt")
    if with_callback:
        assert_equal_parameters(resumed.net, whole.net)
    else:  # the test can fail: without the callback, GradVac restarts from zero targets
        assert any(
            not torch.equal(p, q) for p, q in zip(resumed.net.parameters(), whole.net.parameters())
        )


def test_aggregator_checkpoint_warns_on_a_checkpoint_without_its_state(tmp_path) -> None:
    first = FunctionalModule(with_checkpoint_callback=False)
    fit(first, epochs=1).save_checkpoint(tmp_path / "bare.ckpt")
    with pytest.warns(UserWarning, match="holds no state for AggregatorCheckpoint"):
        fit(FunctionalModule(), epochs=2, ckpt_path=tmp_path / "bare.ckpt")


# ---- gradient accumulation --------------------------------------------------------------------


def accumulating_reference(make_aggregator, epochs: int, every: int) -> TwoTaskNet:
    """The hand-written accumulation: aggregate=False, then the cycle's last micro-batch (or the
    epoch's last batch) aggregates; each micro-batch's losses divided by ``every``."""
    net = TwoTaskNet()
    optimizer = MTLOptimizer(sgd(net.parameters()), make_aggregator(), net.trunk.parameters())
    for _ in range(epochs):
        data = batches(dataset())
        for k, (x, y) in enumerate(data):
            last = (k + 1) % every == 0 or k == len(data) - 1
            losses = {t: loss / every for t, loss in net.losses(x, y).items()}
            optimizer.backward(losses, aggregate=last)
            if last:
                optimizer.step()
                optimizer.zero_grad()
    return net


def test_accumulation_matches_hand_written_accumulation() -> None:
    # 3 batches an epoch in cycles of 2: the epoch's last batch steps alone
    module = MTLModule(gradvac, sgd, accumulate_grad_batches=2)
    t = fit(module, epochs=2)
    assert t.global_step == 2 * 2
    assert sum(r is not None for r in module.records) == 4
    assert_equal_parameters(module.net, accumulating_reference(gradvac, 2, every=2))


def test_accumulation_aggregates_once_as_one_step_on_the_whole_batch() -> None:
    module = MTLModule(gradvac, sgd, accumulate_grad_batches=BATCHES)
    fit(module, epochs=2)
    whole_batch = dataset()  # one step an epoch on the 3 micro-batches together
    expected = reference(gradvac, sgd, epochs=2, data=whole_batch, batch_size=BATCH * BATCHES)
    for p, q in zip(module.net.parameters(), expected.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # the test can fail: aggregating each micro-batch on its own and adding the updates differs
    separate = accumulating_reference(gradvac, 2, every=1)
    assert (parameters(separate)[0] - parameters(expected)[0]).abs().max() > 1e-3


# ---- clipping, schedulers, logging ----------------------------------------------------------


@pytest.mark.parametrize("interval,every", [("step", 2), ("epoch", 1)])
def test_clipping_and_scheduler_match_reference_and_keys_are_logged(tmp_path, interval, every):
    scheduler = {
        "make": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
        "interval": interval,
        "frequency": every,
    }
    module = MTLModule(gradvac, sgd, scheduler, gradient_clip_val=0.05)
    logger = CSVLogger(tmp_path, name="run", version=0)
    fit(module, epochs=2, logger=logger, log_every_n_steps=1)
    expected = reference(gradvac, sgd, epochs=2, clip_norm=0.05, step_lr=(interval, every, 1))
    assert_equal_parameters(module.net, expected)
    # both took effect: without clipping, or without the scheduler, the result differs
    unclipped = reference(gradvac, sgd, epochs=2, step_lr=(interval, every, 1))
    constant_lr = reference(gradvac, sgd, epochs=2, clip_norm=0.05)
    for other in (unclipped, constant_lr):
        assert (parameters(module.net)[0] - parameters(other)[0]).abs().max() > 1e-4
    halvings = 3 if interval == "step" else 2
    assert module.optimizers().param_groups[0]["lr"] == pytest.approx(0.05 * 0.5**halvings)

    with open(tmp_path / "run" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    keys = {
        "mtl/loss/depth",
        "mtl/loss/seg",
        "mtl/weight/depth",
        "mtl/weight/seg",
        "mtl/conflicts",
        "mtl/cosine/depth/seg",
    }
    assert keys <= set(rows[0])
    logged = [float(row["mtl/weight/seg"]) for row in rows if row["mtl/weight/seg"]]
    assert logged == pytest.approx([float(r.weights[1]) for r in module.records])
    cosines = [float(row["mtl/cosine/depth/seg"]) for row in rows if row["mtl/cosine/depth/seg"]]
    assert cosines == pytest.approx([float(r.cosines[0, 1]) for r in module.records])


# ---- mixed precision --------------------------------------------------------------------------


def fp16_plugin(init_scale: float = 2.0**16) -> MixedPrecision:
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale))


def assert_close_updates(net: nn.Module, expected: nn.Module, tolerance: float) -> None:
    """Each tensor's update within ``tolerance`` of the reference update, relative to its norm
    (the forward's low-precision rounding, not a factor of the loss scale)."""
    for (name, p), q, p0 in zip(
        net.named_parameters(), expected.parameters(), TwoTaskNet().parameters()
    ):
        step, reference_step = (p - p0).detach(), (q - p0).detach()
        error = (step - reference_step).norm() / reference_step.norm()
        assert error < tolerance, f"{name}: update off by {error:.3g} of its norm"


def one_batch(scale: float = 1.0) -> TensorDataset:
    x, y = dataset(scale).tensors
    return TensorDataset(x[:BATCH], y[:BATCH])


@pytest.mark.parametrize("clip", [None, 0.05], ids=["no-clip", "clip"])
def test_16_mixed_uses_the_plugins_scaler_and_matches_fp32(clip) -> None:
    module = MTLModule(upgrad_factory, sgd, gradient_clip_val=clip)
    plugin = fp16_plugin(init_scale=2.0**8)  # 2^16 overflows this first step's fp16 gradients
    fit(module, epochs=1, data=one_batch(), plugins=[plugin])
    assert module.optimizers().optimizer.scaler is plugin.scaler
    assert module.records[0].skipped is False
    expected = reference(upgrad_factory, sgd, epochs=1, data=one_batch(), clip_norm=clip)
    assert_close_updates(module.net, expected, 1e-2)
    assert plugin.scaler.get_scale() == 2.0**8


def upgrad_factory() -> UPGrad:
    return UPGrad()


def test_16_mixed_overflow_skips_the_step() -> None:
    module = MTLModule(upgrad_factory, sgd)
    plugin = fp16_plugin()
    fit(module, epochs=1, data=one_batch(scale=1e6), plugins=[plugin])  # fp16 overflows
    assert module.records[0].skipped is True
    assert_equal_parameters(module.net, TwoTaskNet())
    assert plugin.scaler.get_scale() == 2.0**15


def test_bf16_mixed_matches_fp32() -> None:
    module = MTLModule(upgrad_factory, sgd)
    t = fit(module, epochs=1, data=one_batch(), precision="bf16-mixed")
    assert getattr(t.precision_plugin, "scaler", None) is None
    expected = reference(upgrad_factory, sgd, epochs=1, data=one_batch())
    assert_close_updates(module.net, expected, 3e-2)


# ---- errors -----------------------------------------------------------------------------------


class AutomaticModule(MTLModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = True


class PlainOptimizerModule(MTLModule):
    def configure_optimizers(self) -> Any:
        return sgd(self.net.parameters())


class OwnScalerModule(MTLModule):
    def configure_optimizers(self) -> Any:
        optimizer = super().configure_optimizers()
        optimizer.scaler = torch.amp.GradScaler("cpu")
        return optimizer


class TwoMTLOptimizersModule(MTLModule):
    def configure_optimizers(self) -> Any:
        return [super().configure_optimizers(), super().configure_optimizers()]


class ForeignOptimizerModule(MTLModule):
    def training_step(self, batch: Any, batch_idx: int) -> None:
        other = MTLOptimizer(sgd(self.net.parameters()), gradvac())
        mtl_step(self, self.net.losses(*batch), optimizer=other)


@pytest.mark.parametrize(
    "module,options,error,match",
    [
        (AutomaticModule, {}, RuntimeError, "automatic_optimization = False"),
        (PlainOptimizerModule, {}, TypeError, "returned SGD: wrap the optimizer"),
        (OwnScalerModule, {}, ValueError, "precision plugin .* has none"),
        (OwnScalerModule, {"plugins": "fp16"}, ValueError, "not the one of the Trainer's"),
        (TwoMTLOptimizersModule, {}, ValueError, "pass optimizer="),
        (ForeignOptimizerModule, {}, ValueError, "not one that configure_optimizers returned"),
    ],
    ids=["automatic", "plain-optimizer", "scaler-bf16", "scaler-other", "two", "foreign"],
)
def test_misconfigured_module_raises(module, options, error, match) -> None:
    if options.get("plugins") == "fp16":
        options = {"plugins": [fp16_plugin()]}
    with pytest.raises(error, match=match):
        fit(module(), epochs=1, data=one_batch(), **options)


@pytest.mark.parametrize(
    "options,error,match",
    [
        ({"accumulate_grad_batches": 0}, ValueError, "positive int"),
        ({"gradient_clip_val": -1.0}, ValueError, "non-negative finite"),
        ({"gradient_clip_val": 1.0, "gradient_clip_algorithm": "max"}, Exception, "max"),
    ],
    ids=["accumulate-zero", "clip-negative", "clip-algorithm"],
)
def test_bad_step_option_raises(options, error, match) -> None:
    with pytest.raises(error, match=match):
        fit(MTLModule(gradvac, sgd, **options), epochs=1, data=one_batch())


def test_reduce_on_plateau_asks_to_step_it_by_hand() -> None:
    scheduler = {"make": torch.optim.lr_scheduler.ReduceLROnPlateau, "interval": "epoch"}
    with pytest.raises(ValueError, match="step_schedulers=False"):
        fit(MTLModule(gradvac, sgd, scheduler), epochs=1, data=one_batch())
    module = MTLModule(gradvac, sgd, scheduler, step_schedulers=False)
    fit(module, epochs=1, data=one_batch())  # stepped by the user, not by mtl_step


def test_mtl_step_outside_a_module_and_bad_callback_raise() -> None:
    with pytest.raises(TypeError, match="LightningModule"):
        mtl_step(TwoTaskNet(), [torch.ones(())])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Aggregator"):
        AggregatorCheckpoint(torch.optim.SGD)  # type: ignore[arg-type]


def test_integration_is_not_imported_by_mtlgrad() -> None:
    code = (
        "import sys, mtlgrad, mtlgrad.integrations; "
        "assert 'lightning' not in sys.modules, 'lightning imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_ddp_strategy_keeps_the_replicas_identical() -> None:
    """``strategy="ddp"`` with 2 CPU processes (gloo), each on its own shard of the data:
    mtl_step's MTLOptimizer averages each task's gradients over the ranks, so the replicas end
    identical (without it they drift apart)."""
    worker = Path(__file__).with_name("lightning_ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        result = subprocess.run(
            [sys.executable, str(worker), "2"],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
            cwd=worker.parent,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("Lightning's ddp strategy did not finish within 600 s (a hang)")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    for rank in (0, 1):
        assert f"ok replicas identical (rank {rank})" in output, output[-4000:]
