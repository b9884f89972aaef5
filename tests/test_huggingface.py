"""MTLTrainer: the Hugging Face Trainer with per-task losses and an mtlgrad aggregator.

A BERT trunk built from a tiny config (no download) with two heads: sentence classification on
the first token and token-level regression. The Trainer's runs are compared with hand-written
loops over the same batches (sequential sampling, constant learning rate).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertModel,
    BertPreTrainedModel,
    TrainerCallback,
    TrainingArguments,
)

from mtlgrad.aggregators import MGDA, GradVac, UPGrad  # noqa: E402
from mtlgrad.integrations.huggingface import MTLTrainer  # noqa: E402
from mtlgrad.optim import MTLOptimizer  # noqa: E402

TASKS = ["sentiment", "tagging"]
LR = 1e-2
BATCH = 4


class BertMultiTask(BertPreTrainedModel):
    """A BERT trunk and two heads; ``forward`` returns ``{"losses": {task: loss}, ...}``.

    ``fault`` makes it misbehave for the error tests."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.sentiment = nn.Linear(config.hidden_size, 3)
        self.tagging = nn.Linear(config.hidden_size, 1)
        self.fault: str | None = None
        self.post_init()

    def forward(self, input_ids, sentiment_labels=None, tagging_labels=None):
        hidden = self.bert(input_ids).last_hidden_state
        logits = self.sentiment(hidden[:, 0])
        tags = self.tagging(hidden).squeeze(-1)
        losses = {}
        if sentiment_labels is not None:
            losses["sentiment"] = F.cross_entropy(logits, sentiment_labels)
        if tagging_labels is not None:
            losses["tagging"] = F.mse_loss(tags, tagging_labels)
        if self.fault == "missing":
            del losses["tagging"]
        elif self.fault == "unreduced":
            losses["tagging"] = F.mse_loss(tags, tagging_labels, reduction="none")
        elif self.fault == "none":
            losses["tagging"] = None
        elif self.fault == "no losses":
            return {"logits": logits, "tags": tags}
        return {"losses": losses, "logits": logits, "tags": tags, "hidden": hidden}


def make_model(seed: int = 0) -> BertMultiTask:
    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    return BertMultiTask(config)


def make_data(count: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(0, 50, (8,), generator=g),
            "sentiment_labels": torch.randint(0, 3, (), generator=g),
            "tagging_labels": torch.randn(8, generator=g),
        }
        for _ in range(count)
    ]


def batches(data: list[dict[str, torch.Tensor]], size: int = BATCH):
    for start in range(0, len(data), size):
        rows = data[start : start + size]
        yield {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


def make_args(tmp_path: Path, **overrides) -> TrainingArguments:
    options = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=BATCH,
        max_steps=4,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        train_sampling_strategy="sequential",  # the hand-written loops see the same batches
        lr_scheduler_type="constant",
        weight_decay=0.0,
        disable_tqdm=True,
    )
    options.update(overrides)
    return TrainingArguments(**options)


def make_trainer(model, args, data, aggregator, **kwargs) -> MTLTrainer:
    return MTLTrainer(
        model=model,
        args=args,
        train_dataset=data,
        aggregator=aggregator,
        optimizer_cls_and_kwargs=(torch.optim.AdamW, {"lr": LR}),
        **{"shared_params": "bert", **kwargs},
    )


def gradvac() -> GradVac:
    return GradVac(beta=0.5, generator=torch.Generator().manual_seed(0))


def hand_loop(model, data, aggregator, steps, max_grad_norm=1.0):
    """The loop the Trainer should run: MTLOptimizer, then clipping, then the step."""
    optimizer = MTLOptimizer(
        torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0),
        aggregator,
        shared_params=model.bert.parameters(),
    )
    records = []
    for step, batch in enumerate(batches(data)):
        if step == steps:
            break
        optimizer.zero_grad()
        records.append(optimizer.backward(model(**batch)["losses"]))
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
    return records


def assert_same_parameters(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), f"{name} differs by {(p - q).abs().max().item():.3g}"


def first_difference(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


# ---- training -----------------------------------------------------------------------------------


def test_training_equals_a_hand_written_loop_and_logs_the_weights(tmp_path: Path) -> None:
    data = make_data(16)
    model = make_model()
    reference = copy.deepcopy(model)
    trainer = make_trainer(model, make_args(tmp_path), data, gradvac())
    trainer.train()
    records = hand_loop(reference, data, gradvac(), steps=4)
    assert_same_parameters(model, reference)
    assert trainer.optimizer.optimizer.__class__ is MTLOptimizer  # inside AcceleratedOptimizer

    logs = [entry for entry in trainer.state.log_history if "learning_rate" in entry]
    assert len(logs) == 4
    assert any(not torch.allclose(r.weights, torch.ones(2, dtype=torch.float64)) for r in records)
    for entry, record in zip(logs, records):
        for name, weight, loss in zip(record.names, record.weights, record.losses):
            assert entry[f"{name}_weight"] == pytest.approx(weight.item(), rel=1e-12)
            assert entry[f"{name}_loss"] == pytest.approx(loss.item(), rel=1e-6)
        assert entry["loss"] == pytest.approx(sum(entry[f"{t}_loss"] for t in TASKS), rel=1e-6)


def test_multitask_module_partition_and_features_key(tmp_path: Path) -> None:
    from mtlgrad.nn import MultiTaskModel

    class Net(MultiTaskModel):
        def forward(self, x, a=None, b=None):
            outputs, z = super().forward(x, return_features=True)
            losses = {"a": F.mse_loss(outputs["a"].squeeze(-1), a)}
            losses["b"] = F.mse_loss(outputs["b"].squeeze(-1), b)
            return {"losses": losses, "z": z}

    torch.manual_seed(0)
    model = Net(
        nn.Sequential(nn.Linear(6, 8), nn.Tanh()), {"a": nn.Linear(8, 1), "b": nn.Linear(8, 1)}
    )
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(3)
    data = [{"x": torch.randn(6, generator=g), "a": torch.randn((), generator=g),
             "b": torch.randn((), generator=g)} for _ in range(8)]  # fmt: skip
    args = make_args(tmp_path, max_steps=2, max_grad_norm=0.0)
    trainer = MTLTrainer(
        model=model,
        args=args,
        train_dataset=data,
        aggregator=UPGrad(),
        features_key="z",
        optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.1}),
    )
    trainer.train()
    optimizer = MTLOptimizer(torch.optim.SGD(reference.parameters(), lr=0.1), UPGrad())
    for batch in list(batches(data))[:2]:
        optimizer.zero_grad()
        outputs = reference(**batch)
        optimizer.backward(outputs["losses"], features=outputs["z"])
        optimizer.step()
    assert_same_parameters(model, reference)
    assert trainer.task_names == ["a", "b"]


# ---- checkpoints --------------------------------------------------------------------------------


class FreshAggregatorState(TrainerCallback):
    """What a checkpoint without the aggregator's state gives: after the Trainer has loaded the
    checkpoint, the aggregator is reset to a newly built one's state."""

    def __init__(self, trainer: MTLTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.aggregator.load_state_dict(gradvac().state_dict())


def test_resume_from_a_checkpoint_is_bit_identical(tmp_path: Path) -> None:
    data = make_data(24)
    options = dict(max_steps=6, save_strategy="steps", save_steps=3, logging_steps=3)
    full_model = make_model()
    full = make_trainer(full_model, make_args(tmp_path / "full", **options), data, gradvac())
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert (checkpoint / "optimizer.pt").is_file()
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert isinstance(saved["param_groups"][0]["mtlgrad"], bytes)

    resumed_model = make_model(seed=5)  # the checkpoint's weights replace these
    resumed = make_trainer(
        resumed_model, make_args(tmp_path / "resumed", **options), data, gradvac()
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert_same_parameters(full_model, resumed_model)
    assert torch.equal(resumed.aggregator._targets, full.aggregator._targets)

    # Without the aggregator's state (GradVac's targets and generator), the run differs.
    fresh_model = make_model(seed=5)
    fresh = make_trainer(fresh_model, make_args(tmp_path / "fresh", **options), data, gradvac())
    fresh.add_callback(FreshAggregatorState(fresh))
    fresh.train(resume_from_checkpoint=str(checkpoint))
    difference = first_difference(full_model, fresh_model)
    print(f"without the aggregator's state: parameters differ by {difference:.3g}")
    assert difference > 1e-6


# ---- evaluation ---------------------------------------------------------------------------------


def test_evaluation_reports_each_task_loss(tmp_path: Path) -> None:
    train, evaluation = make_data(8), make_data(12, seed=2)
    model = make_model()
    trainer = make_trainer(model, make_args(tmp_path, max_steps=2), train, UPGrad())
    trainer.train()
    metrics = trainer.evaluate(eval_dataset=evaluation)

    model.eval()
    with torch.no_grad():
        expected = torch.stack(
            [torch.stack([model(**b)["losses"][t] for t in TASKS]) for b in batches(evaluation)]
        ).mean(0)
    for name, value in zip(TASKS, expected.tolist()):
        assert metrics[f"eval_{name}_loss"] == pytest.approx(value, rel=1e-6)
    assert metrics["eval_loss"] == pytest.approx(expected.sum().item(), rel=1e-6)

    prediction = trainer.predict(evaluation, ignore_keys=["hidden"])
    logits, tags = prediction.predictions  # the outputs but the losses and the ignored ones
    assert logits.shape == (12, 3) and tags.shape == (12, 8)
    assert prediction.metrics["test_tagging_loss"] == pytest.approx(expected[1].item(), rel=1e-6)


# ---- gradient accumulation ----------------------------------------------------------------------


def test_accumulation_aggregates_the_summed_task_gradients_once(tmp_path: Path) -> None:
    data = make_data(8)
    model = make_model()
    reference = copy.deepcopy(model)
    args = make_args(tmp_path, max_steps=1, gradient_accumulation_steps=2, max_grad_norm=0.0)
    trainer = MTLTrainer(
        model=model,
        args=args,
        train_dataset=data,
        aggregator=MGDA(),
        shared_params="bert",
        optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.1}),
    )
    trainer.train()

    # By hand: each task's gradient summed over the two micro-batches (each loss halved), one
    # MGDA of the T x P matrix for the trunk (nonlinear in J: aggregating each micro-batch on
    # its own differs, by 1.8e-3 here), each head its own task's summed gradient.
    shared = list(reference.bert.parameters())
    heads = {"sentiment": list(reference.sentiment.parameters()),
             "tagging": list(reference.tagging.parameters())}  # fmt: skip
    total = {t: [torch.zeros_like(p) for p in shared + heads[t]] for t in TASKS}
    for batch in list(batches(data))[:2]:
        losses = reference(**batch)["losses"]
        for t in TASKS:
            grads = torch.autograd.grad(
                losses[t] / 2, shared + heads[t], retain_graph=True, allow_unused=True
            )
            for acc, g in zip(total[t], grads):
                if g is not None:
                    acc += g
    J = torch.stack([torch.cat([g.reshape(-1) for g in total[t][: len(shared)]]) for t in TASKS])
    d = MGDA()(J.double()).float()
    with torch.no_grad():
        offset = 0
        for p in shared:
            p -= 0.1 * d[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        for t in TASKS:
            for p, g in zip(heads[t], total[t][len(shared) :]):
                p -= 0.1 * g
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert len(trainer.optimizer.optimizer.accumulator) == 0  # taken by the aggregation


def test_accumulation_with_features_is_refused(tmp_path: Path) -> None:
    args = make_args(tmp_path, max_steps=1, gradient_accumulation_steps=2)
    trainer = make_trainer(make_model(), args, make_data(8), UPGrad(), features_key="hidden")
    with pytest.raises(ValueError, match=r"gradient_accumulation_steps=2 .*features_key='hidden'"):
        trainer.train()


# ---- AMP ----------------------------------------------------------------------------------------


class EnableUnscaling(TrainerCallback):
    """On a machine without CUDA, accelerate's fp16 has no GradScaler: give it one (a CPU
    GradScaler with a power-of-two scale) after the model is prepared (no fp16 autocast), so that
    the Trainer's unscale-before-clipping path and ``scaler.step`` run as on a GPU."""

    def __init__(self, trainer: MTLTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.accelerator.native_amp = True


def test_the_accelerators_grad_scaler_gives_the_unscaled_update(tmp_path: Path) -> None:
    data = make_data(12)
    model = make_model()
    reference = copy.deepcopy(model)
    trainer = make_trainer(model, make_args(tmp_path, max_steps=3, fp16=True), data, gradvac())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    trainer.accelerator.scaler = scaler
    trainer.add_callback(EnableUnscaling(trainer))
    trainer.train()
    assert trainer.optimizer.optimizer.scaler is scaler  # MTLOptimizer's
    assert trainer.optimizer.scaler is scaler  # AcceleratedOptimizer's: scaler.step and update
    assert scaler.get_scale() == 2.0**12 and scaler._growth_tracker.item() == 3  # 3 good steps
    # Powers of two scale exactly: the same parameters as without a scaler, clipping included
    # (clipping the scaled gradients would differ).
    hand_loop(reference, data, gradvac(), steps=3)
    assert_same_parameters(model, reference)


def test_an_overflow_skips_the_step_and_lowers_the_scale(tmp_path: Path) -> None:
    model = make_model()
    before = copy.deepcopy(model)
    data = make_data(4)
    for row in data:
        row["tagging_labels"] = row["tagging_labels"] * 1e6  # finite, but not once scaled
    args = make_args(tmp_path, max_steps=1, fp16=True)
    trainer = make_trainer(model, args, data, gradvac())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**120)
    trainer.accelerator.scaler = scaler
    trainer.add_callback(EnableUnscaling(trainer))
    trainer.train()
    assert trainer.optimizer.optimizer.last_record.skipped
    assert trainer.accelerator.optimizer_step_was_skipped
    assert scaler.get_scale() == 2.0**119
    assert_same_parameters(model, before)


# ---- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("missing", r"no loss for task 'tagging'"),
        ("unreduced", r"loss of task 'tagging' must be a scalar, got shape \[4, 8\]"),
        ("none", r"loss of task 'tagging' is None"),
        ("no losses", r"no per-task losses under 'losses' \(its entries: \['logits', 'tags'\]\)"),
    ],
)
def test_bad_model_outputs_name_the_task(tmp_path: Path, fault: str, message: str) -> None:
    model = make_model()
    trainer = make_trainer(model, make_args(tmp_path, max_steps=2), make_data(8), UPGrad())
    if fault == "missing":
        trainer.task_names = list(TASKS)
    model.fault = fault
    with pytest.raises((ValueError, TypeError), match=message):
        trainer.train()


def test_a_task_that_disappears_after_the_first_step_is_named(tmp_path: Path) -> None:
    model = make_model()

    class Drop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            model.fault = "missing"

    trainer = make_trainer(model, make_args(tmp_path, max_steps=2), make_data(8), UPGrad())
    trainer.add_callback(Drop())
    with pytest.raises(ValueError, match=r"no loss for task 'tagging' .*got \['sentiment'\]"):
        trainer.train()


def test_bad_options_are_refused(tmp_path: Path) -> None:
    args, data = make_args(tmp_path, max_steps=1), make_data(4)
    with pytest.raises(TypeError, match="aggregator must be an mtlgrad Aggregator"):
        make_trainer(make_model(), args, data, "upgrad")
    with pytest.raises(ValueError, match="compute_loss_func returns one loss"):
        make_trainer(make_model(), args, data, UPGrad(), compute_loss_func=lambda *a, **k: 0)
    with pytest.raises(ValueError, match="engine must be one of"):
        make_trainer(make_model(), args, data, UPGrad(), engine="fast")
    trainer = make_trainer(make_model(), args, data, UPGrad(), shared_params="trunk")
    with pytest.raises(ValueError, match=r"shared_params='trunk'.*children: \['bert', "):
        trainer.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the head passed as shared is warned about by mtlgrad
        trainer = make_trainer(
            make_model(), args, data, UPGrad(), shared_params=lambda m: m.parameters()
        )
        with pytest.raises(UserWarning, match="reached by the loss of 'sentiment' only"):
            trainer.train()
