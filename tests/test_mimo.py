"""MIMO: surgery (M=1 is the plain model, widened layers keep the original in block 0), member
batches (different rows per head in training, the same at evaluation), the summed loss, the averaged
prediction, errors, and a short run in which every head learns from its own input block."""

from __future__ import annotations

import copy
import math
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import quiet_trainer
from torch import nn

from litplug.core.data import DigitsDataModule
from litplug.core.errors import CheckpointError, PluginConfigError
from litplug.core.models import MLP, SmallCNN
from litplug.core.module import LitplugModule
from litplug.plugins.mimo import (
    MIMO,
    MIMOInputConv2d,
    MIMOInputLinear,
    ensemble_log_probs,
    member_indices,
    member_metrics,
    mimo_loss,
    mimo_predict,
    repeat_inputs,
    stack_member_inputs,
    sum_member_blocks,
    widen_model,
)


def _module(model: nn.Module, plugin: MIMO) -> LitplugModule:
    module = LitplugModule(model, plugins=[plugin])
    module.apply_surgery()
    return module


# -- M = 1 is exactly the plain model ----------------------------------------------------------------


@pytest.mark.parametrize("make", [lambda: MLP(64, [32]), lambda: SmallCNN(width=8)], ids=["mlp", "cnn"])
def test_one_member_is_the_plain_model(make) -> None:
    torch.manual_seed(0)
    plain = make()
    widened = copy.deepcopy(plain)
    module = _module(widened, MIMO(num_members=1, batch_repetitions=1))
    assert all(
        torch.equal(a, b)
        for a, b in zip(plain.state_dict().values(), widened.state_dict().values(), strict=True)
    )
    x = torch.rand(5, 1, 8, 8)
    y = torch.randint(0, 10, (5,))
    for stage in ("train", "val"):
        inputs, targets = module.hooks.transform_batch(module=module, batch=(x, y), stage=stage)
        outputs = module(inputs)
        assert torch.equal(outputs, plain(x))
        assert torch.equal(
            module.main_loss(outputs, targets, (inputs, targets), stage), F.cross_entropy(plain(x), y)
        )
        assert torch.equal(module.log_probs(outputs, "val"), F.log_softmax(plain(x), -1))


def test_one_member_trains_bit_identically_to_no_plugin() -> None:
    def train(plugins: list) -> nn.Module:
        L.seed_everything(0)
        model = MLP(64, [32], dropout=0.2)  # dropout: the random stream must be the same too
        module = LitplugModule(model, plugins=plugins, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
        quiet_trainer(max_steps=4, limit_val_batches=0).fit(
            module, datamodule=DigitsDataModule(batch_size=128)
        )
        return model

    plain, mimo = train([]), train([MIMO(num_members=1, batch_repetitions=1)])
    for (name, a), b in zip(plain.state_dict().items(), mimo.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


# -- surgery ------------------------------------------------------------------------------------------


def test_mlp_surgery_keeps_the_original_weights_in_block_zero() -> None:
    torch.manual_seed(0)
    plain = MLP(64, [32, 16], num_classes=10)
    model = widen_model(copy.deepcopy(plain), num_members=3)
    first, head = model.body[1], model.head
    assert first.weight.shape == (32, 3 * 64) and head.weight.shape == (30, 16) and head.bias.shape == (30,)
    assert torch.equal(first.weight[:, :64], plain.body[1].weight)
    assert torch.equal(first.bias, plain.body[1].bias)
    assert torch.equal(head.weight[:10], plain.head.weight) and torch.equal(head.bias[:10], plain.head.bias)
    # the other blocks are fresh draws from the same initialiser: different, same scale
    for block in (first.weight[:, 64:128], first.weight[:, 128:]):
        assert not torch.equal(block, plain.body[1].weight)
        assert block.abs().max() <= 1 / 64**0.5
    assert not torch.equal(head.weight[10:20], head.weight[20:])
    # member 0 alone (other members' inputs zero) reproduces the plain network on head 0
    x = torch.rand(4, 64)
    outputs = model(torch.cat([x, torch.zeros(4, 128)], dim=1))
    torch.testing.assert_close(outputs[:, :10], plain(x))


def test_cnn_surgery_widens_stem_channels_and_head() -> None:
    torch.manual_seed(0)
    plain = SmallCNN(width=8, batch_norm=False).eval()
    model = widen_model(copy.deepcopy(plain), num_members=2).eval()
    assert model.stem.weight.shape == (8, 2, 3, 3) and model.head.out_features == 20
    assert torch.equal(model.stem.weight[:, :1], plain.stem.weight)
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(model(torch.cat([x, torch.zeros_like(x)], 1))[:, :10], plain(x))


def test_surgery_is_deterministic_idempotent_and_does_not_touch_the_random_stream() -> None:
    torch.manual_seed(0)
    base = MLP(64, [32])
    state = torch.get_rng_state()
    a = widen_model(copy.deepcopy(base), 3)
    assert torch.equal(torch.get_rng_state(), state)
    b = widen_model(copy.deepcopy(base), 3)
    assert all(
        torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    weight = a.head.weight
    assert widen_model(a, 3).head.weight is weight  # replayed surgery changes nothing
    with pytest.raises(ValueError, match="already widened to 3"):
        widen_model(a, 2)


def test_user_model_with_named_layers() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Sequential(nn.Linear(64, 32), nn.ReLU())
            self.classifier = nn.Linear(32, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.classifier(self.encoder(x))

    with pytest.raises(PluginConfigError, match="plugin 'mimo': argument 'input_layer'"):
        _module(Net(), MIMO(num_members=2))
    module = _module(Net(), MIMO(num_members=2, input_layer="encoder.0", output_layer="classifier"))
    assert module.model.encoder[0].in_features == 128 and module.model.classifier.out_features == 20
    assert module.log_probs(module(repeat_inputs(torch.rand(3, 64), 2)), "val").shape == (3, 10)


# -- member batches -----------------------------------------------------------------------------------


def _coded_batch(n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs whose every feature is the row number, targets = row number: rows are traceable."""
    rows = torch.arange(n)
    return rows.float().unsqueeze(1).expand(n, 4).clone(), rows


@pytest.mark.parametrize(("rho", "reps"), [(0.0, 1), (0.0, 3), (0.5, 2), (1.0, 2)])
def test_training_heads_get_their_own_shuffled_rows(rho: float, reps: int) -> None:
    torch.manual_seed(0)
    plugin = MIMO(num_members=3, input_repetition=rho, batch_repetitions=reps)
    x, y = _coded_batch()
    inputs, targets = plugin.litplug_transform_batch((x, y), "train", None)
    assert inputs.shape == (12 * reps, 3 * 4) and targets.shape == (12 * reps, 3)
    blocks = inputs.view(12 * reps, 3, 4)
    assert torch.equal(blocks, targets.unsqueeze(-1).float().expand(-1, -1, 4))  # inputs follow targets
    for m in range(3):  # every head sees every unique example exactly `reps` times
        assert torch.equal(torch.bincount(targets[:, m], minlength=12), torch.full((12,), reps))
    shared = (targets == targets[:, :1]).all(1).float().mean().item()
    if rho == 1.0:
        assert shared == 1.0
    else:  # the shared fraction is at least rho; the rest differs between heads (almost surely)
        assert rho <= shared < rho + 0.3
        assert not torch.equal(targets[:, 0], targets[:, 1])


def test_input_repetition_shares_the_tail_of_the_main_shuffle() -> None:
    torch.manual_seed(1)
    indices = member_indices(batch_size=40, num_members=4, input_repetition=0.25, batch_repetitions=1)
    shared_from = int(40 * 0.75)
    assert (indices[:, shared_from:] == indices[:1, shared_from:]).all()
    assert all(torch.equal(row.sort().values, torch.arange(40)) for row in indices)


def test_evaluation_heads_get_the_same_input() -> None:
    plugin = MIMO(num_members=3, eval_input="tiled")
    x = torch.rand(5, 1, 8, 8)
    y = torch.arange(5)
    for stage in ("val", "test"):
        inputs, targets = plugin.litplug_transform_batch((x, y), stage, None)
        assert targets is y and inputs.shape == (5, 3, 8, 8)
        assert all(torch.equal(inputs[:, m : m + 1], x) for m in range(3))
    assert torch.equal(plugin.litplug_transform_batch(x, "predict", None), x.repeat(1, 3, 1, 1))
    # "summed": the plain input goes in, and the widened input layer gives every member the same
    summed = MIMO(num_members=3, eval_input="summed")
    assert summed.litplug_transform_batch((x, y), "test", None) is None


def test_stack_member_inputs_concatenates_channels_in_member_order() -> None:
    x = torch.arange(3 * 2 * 2 * 2).float().view(3, 2, 2, 2)
    indices = torch.tensor([[2, 0], [1, 1]])  # member 0 rows 2, 0; member 1 rows 1, 1
    out = stack_member_inputs(x, indices)
    assert out.shape == (2, 4, 2, 2)
    assert torch.equal(out[0], torch.cat([x[2], x[1]])) and torch.equal(out[1], torch.cat([x[0], x[1]]))


# -- loss and prediction ------------------------------------------------------------------------------


def test_loss_is_the_sum_of_each_heads_mean_cross_entropy() -> None:
    torch.manual_seed(0)
    outputs = torch.randn(6, 3 * 4)
    targets = torch.randint(0, 4, (6, 3))
    expected = sum(F.cross_entropy(outputs[:, 4 * m : 4 * m + 4], targets[:, m]) for m in range(3))
    torch.testing.assert_close(mimo_loss(outputs, targets, 3), expected)
    mean_over_heads = F.cross_entropy(outputs.view(6, 3, 4).reshape(18, 4), targets.reshape(18))
    torch.testing.assert_close(mimo_loss(outputs, targets, 3), 3 * mean_over_heads)  # not the mean
    eval_targets = targets[:, 0]
    torch.testing.assert_close(
        mimo_loss(outputs, eval_targets, 3), mimo_loss(outputs, eval_targets[:, None].expand(6, 3), 3)
    )


def test_prediction_averages_head_probabilities() -> None:
    torch.manual_seed(0)
    outputs = torch.randn(5, 2 * 3)
    expected = (F.softmax(outputs[:, :3], -1) + F.softmax(outputs[:, 3:], -1)) / 2
    torch.testing.assert_close(ensemble_log_probs(outputs, 2).exp(), expected)
    model = MLP(4, [8], num_classes=3)
    widen_model(model, 2)
    x = torch.rand(5, 4)
    torch.testing.assert_close(mimo_predict(model, x, 2), ensemble_log_probs(model(x.repeat(1, 2)), 2).exp())


def test_member_metrics_by_hand() -> None:
    # 2 examples, 3 heads, 2 classes; head predictions: ex0 -> (0, 1, 0), ex1 -> (1, 1, 1)
    logits = torch.tensor([[2.0, 0.0, 0.0, 2.0, 1.0, 0.0], [0.0, 1.0, 0.0, 3.0, 0.0, 2.0]])
    targets = torch.tensor([0, 1])
    got = member_metrics(logits, targets, 3)
    torch.testing.assert_close(got["member1_acc"], torch.tensor(0.5))
    torch.testing.assert_close(got["member_acc"], torch.tensor((1.0 + 0.5 + 1.0) / 3))
    torch.testing.assert_close(got["disagreement"], torch.tensor((2 / 3 + 0.0) / 2))
    nll0 = (
        -(F.log_softmax(torch.tensor([2.0, 0.0]), 0)[0] + F.log_softmax(torch.tensor([0.0, 1.0]), 0)[1]) / 2
    )
    torch.testing.assert_close(got["member0_nll"], nll0)


# -- errors and state ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"num_members": 0}, "num_members"),
        ({"num_members": 2.5}, "num_members"),
        ({"num_members": True}, "num_members"),
        ({"input_repetition": -0.1}, "input_repetition"),
        ({"input_repetition": 1.5}, "input_repetition"),
        ({"batch_repetitions": 0}, "batch_repetitions"),
        ({"input_layer": ""}, "input_layer"),
    ],
)
def test_bad_hyperparameters_name_the_argument(kwargs: dict, argument: str) -> None:
    with pytest.raises(PluginConfigError, match=f"plugin 'mimo': argument '{argument}'"):
        MIMO(**kwargs)


@pytest.mark.parametrize(
    ("model", "kwargs", "argument", "problem"),
    [
        (MLP(64, [32]), {"input_layer": "body.9"}, "input_layer", "not found"),
        (MLP(64, [32]), {"output_layer": "body.0"}, "output_layer", "Flatten"),
        (nn.Sequential(nn.LSTM(8, 8)), {}, "input_layer", "no default"),
        (
            nn.ModuleDict({"stem": nn.Conv2d(4, 4, 3, groups=2), "head": nn.Linear(4, 2)}),
            {},
            "input_layer",
            "grouped",
        ),
        (nn.ModuleDict({"stem": nn.Conv2d(1, 4, 3), "head": nn.LSTM(4, 2)}), {}, "output_layer", "LSTM"),
    ],
)
def test_models_that_cannot_be_widened(model: nn.Module, kwargs: dict, argument: str, problem: str) -> None:
    with pytest.raises(PluginConfigError, match=f"plugin 'mimo': argument '{argument}'.*{problem}"):
        _module(model, MIMO(num_members=2, **kwargs))


def test_checkpoint_with_another_member_count_is_refused() -> None:
    assert MIMO(num_members=3).state_dict() == {"num_members": 3}
    with pytest.raises(CheckpointError, match="num_members=3.*num_members=2"):
        MIMO(num_members=2).load_state_dict({"num_members": 3})


# -- a short run --------------------------------------------------------------------------------------


def test_every_head_learns_from_its_own_input_block(tmp_path) -> None:
    """If a head's targets were not aligned with its own input block it would stay near chance."""
    L.seed_everything(0)
    module = LitplugModule(
        MLP(64, [128]),
        plugins=[MIMO(num_members=2, batch_repetitions=1)],
        optimizer=lambda p: torch.optim.Adam(p, lr=3e-3),
    )
    data = DigitsDataModule(batch_size=64)
    trainer = quiet_trainer(max_epochs=4, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    result = trainer.test(module, datamodule=data, verbose=False)[0]
    assert result["test/member0_acc"] > 0.85 and result["test/member1_acc"] > 0.85, result
    assert result["test/acc"] > 0.85 and 0.0 < result["test/disagreement"] < 0.2, result
    assert result["test/nll"] <= result["test/member_nll"] + 1e-6, result  # Jensen: mean of probs helps
    assert (tmp_path / "reliability_mimo_test.png").exists()


# -- evaluation without the tiled input: summed input-layer weights -----------------------------------


def _widened(make, members: int = 3, dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return widen_model(make(), members).to(dtype).eval()


@pytest.mark.parametrize(
    "make",
    [lambda: MLP(64, [32]), lambda: SmallCNN(width=8), lambda: SmallCNN(width=8, batch_norm=False)],
    ids=["mlp", "cnn", "cnn-bias"],
)
@pytest.mark.parametrize("members", [2, 3])
def test_summed_input_weights_equal_the_tiled_forward(make, members: int) -> None:
    model = _widened(make, members)
    first = model.stem if hasattr(model, "stem") else model.body[1]
    assert isinstance(first, (MIMOInputConv2d, MIMOInputLinear))
    x = torch.rand(7, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        tiled, plain = model(repeat_inputs(x, members)), model(x)
    assert (tiled - plain).abs().max() < 1e-6 and plain.shape == (7, 10 * members)
    # float32, the training dtype: the same up to float rounding
    model32 = _widened(make, members, torch.float32)
    with torch.no_grad():
        assert torch.allclose(model32(x.float()), model32(repeat_inputs(x.float(), members)), atol=1e-5)
    # the state-dict keys are the plain layer's (old checkpoints load)
    assert set(model.state_dict()) == set(widen_model(make(), members).state_dict())


def test_summed_weight_is_the_sum_of_member_blocks_by_hand() -> None:
    w = torch.arange(2 * 6 * 1 * 1, dtype=torch.float64).view(2, 6, 1, 1)  # 3 members x 2 channels
    assert torch.equal(sum_member_blocks(w, 3), w[:, 0:2] + w[:, 2:4] + w[:, 4:6])
    lin = torch.arange(12.0).view(2, 6)
    assert torch.equal(sum_member_blocks(lin, 2), lin[:, :3] + lin[:, 3:])


def test_summed_weight_cache_is_invalidated_by_optimizer_steps_train_and_loads() -> None:
    model = _widened(lambda: SmallCNN(width=8), 3, torch.float32)
    stem = model.stem
    x = torch.rand(5, 1, 8, 8)

    def check_fresh() -> None:
        with torch.no_grad():
            plain = model(x)
            assert torch.allclose(plain, model(repeat_inputs(x, 3)), atol=1e-5)
        assert torch.equal(stem._summed_cache[1], sum_member_blocks(stem.weight.detach(), 3))

    check_fresh()
    cached = stem._summed_cache[1]
    with torch.no_grad():
        model(x)
    assert stem._summed_cache[1] is cached  # reused while nothing changed
    # an optimizer step (training forward: differentiable sum, no cache)
    model.train()
    assert stem._summed_cache is None
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model(repeat_inputs(x, 3)).sum().backward()
    optimizer.step()
    model.eval()
    check_fresh()
    # an optimizer step without a train() call in between (eval mode, e.g. a fine-tuning loop)
    cached = stem._summed_cache[1]
    optimizer.zero_grad()
    model(repeat_inputs(x, 3)).sum().backward()
    optimizer.step()
    with torch.no_grad():
        model(x)
    assert stem._summed_cache[1] is not cached
    check_fresh()
    # loading other weights
    other = _widened(lambda: SmallCNN(width=8), 3, torch.float32)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    model.load_state_dict(other.state_dict())
    check_fresh()
    assert torch.equal(stem._summed_cache[1], sum_member_blocks(other.stem.weight.detach(), 3))


def test_plain_input_with_autograd_gets_the_tiled_gradients() -> None:
    a = _widened(lambda: MLP(64, [16]), 2)
    b = copy.deepcopy(a)
    x = torch.rand(4, 64, dtype=torch.float64)
    a(x).square().sum().backward()
    b(repeat_inputs(x, 2)).square().sum().backward()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-10)
    assert a.body[1]._summed_cache is None  # nothing cached from a differentiable forward


def test_input_layer_rejects_inputs_of_another_width() -> None:
    model = _widened(lambda: MLP(64, [16]), 3)
    with pytest.raises(ValueError, match="dim 1 of size 192.*or 64"):
        model(torch.rand(2, 100, dtype=torch.float64))


@pytest.mark.parametrize(("eval_input", "tiled"), [("auto", False), ("summed", False), ("tiled", True)])
def test_eval_input_modes_give_the_same_predictions(eval_input: str, tiled: bool) -> None:
    torch.manual_seed(0)
    reference = _module(SmallCNN(width=8), MIMO(num_members=3, eval_input="tiled")).eval()
    module = _module(copy.deepcopy(reference.model), MIMO(num_members=3, eval_input=eval_input)).eval()
    x, y = torch.rand(6, 1, 8, 8), torch.arange(6)
    with torch.no_grad():
        inputs, _ = module.hooks.transform_batch(module=module, batch=(x, y), stage="test")
        assert inputs.shape[1] == (3 if tiled else 1)
        expected = reference.log_probs(reference(repeat_inputs(x, 3)), "test")
        assert torch.allclose(module.log_probs(module(inputs), "test"), expected, atol=1e-5)


class _FixedWidthFront(nn.Module):
    """Reshapes its input to a fixed width before the input layer: cannot take the plain input."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(128, 16)
        self.out = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.inp(x.reshape(-1, 128))))


def test_auto_eval_input_falls_back_to_tiling_with_a_warning() -> None:
    plugin = MIMO(num_members=2, input_layer="inp", output_layer="out", eval_input="auto")
    module = _module(_FixedWidthFront(), plugin).eval()
    x, y = torch.rand(4, 64), torch.arange(4)
    with pytest.warns(UserWarning, match="keeps the tiled evaluation input"):
        inputs, _ = module.hooks.transform_batch(module=module, batch=(x, y), stage="val")
    assert inputs.shape == (4, 128) and plugin._eval_input == "tiled"
    inputs, _ = module.hooks.transform_batch(module=module, batch=(x, y), stage="val")  # decided once
    assert inputs.shape == (4, 128)


@pytest.mark.parametrize("half", ["bf16-mixed", "bf16-true"])
def test_auto_eval_input_sums_in_half_precision_without_a_warning(half: str) -> None:
    """Rounding of half precision is not a model that needs tiling (it warned under bf16 before)."""
    torch.manual_seed(0)
    plugin = MIMO(num_members=3, eval_input="auto")
    module = _module(SmallCNN(width=8), plugin).eval()
    x, y = torch.rand(16, 1, 8, 8), torch.arange(16) % 10
    if half == "bf16-true":
        module, x = module.bfloat16(), x.bfloat16()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=half == "bf16-mixed"):
            assert module.hooks.transform_batch(module=module, batch=(x, y), stage="val")[0] is x
    assert plugin._eval_input == "summed"


def test_auto_eval_input_does_not_decide_in_training_mode() -> None:
    plugin = MIMO(num_members=2, eval_input="auto")
    module = _module(SmallCNN(width=8), plugin)
    module.train()
    x, y = torch.rand(4, 1, 8, 8), torch.arange(4)
    stats = module.model.stem_norm.running_mean.clone()
    inputs, _ = module.hooks.transform_batch(module=module, batch=(x, y), stage="val")
    assert inputs.shape[1] == 2 and plugin._eval_input is None
    assert torch.equal(module.model.stem_norm.running_mean, stats)
    module.eval()
    assert module.hooks.transform_batch(module=module, batch=(x, y), stage="val")[0] is x
    assert plugin._eval_input == "summed"


def test_fast_averaging_equals_logsumexp_and_falls_back_on_underflow() -> None:
    torch.manual_seed(0)
    outputs = torch.randn(50, 3 * 10) * 8

    def by_logsumexp(z: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(F.log_softmax(z.view(-1, 3, 10), -1), -2) - math.log(3.0)

    with torch.no_grad():
        # float32: within a few ulps (relative 1e-6); float64: exact to 1e-12
        assert torch.allclose(ensemble_log_probs(outputs, 3), by_logsumexp(outputs), rtol=1e-6, atol=1e-6)
        wide = outputs.double()
        assert (ensemble_log_probs(wide, 3) - by_logsumexp(wide)).abs().max() < 1e-12
        extreme = outputs.clone()
        extreme[0] = torch.tensor([0.0] + [-200.0] * 9).repeat(3)  # class probabilities e^-200
        fast = ensemble_log_probs(extreme, 3)
        assert torch.isfinite(fast).all()
        assert torch.allclose(fast, by_logsumexp(extreme), atol=1e-5) and fast[0, 1] < -150
    # with autograd: the logsumexp form, differentiable
    grad_outputs = outputs.clone().requires_grad_()
    ensemble_log_probs(grad_outputs, 3)[:, 0].sum().backward()
    assert grad_outputs.grad is not None


def test_bad_eval_input_names_the_argument() -> None:
    with pytest.raises(PluginConfigError, match="plugin 'mimo': argument 'eval_input'"):
        MIMO(eval_input="sum")
