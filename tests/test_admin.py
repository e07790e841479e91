"""Admin: omegas against the hand recursion, closed form, surgery, resume without re-profiling, errors."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn

from litplug.core.data import StdlibTextDataModule
from litplug.core.errors import PluginConfigError, PluginSetupError
from litplug.core.hookspecs import hookimpl
from litplug.core.models import ResidualSublayer, TransformerLanguageModel
from litplug.core.module import LitplugModule
from litplug.core.plugin import Plugin
from litplug.plugins.admin import (
    Admin,
    AdminModelError,
    add_residual_scales,
    closed_form_omega,
    fold_omegas_into_weights,
    profile_omegas,
    residual_scales,
)

WIDTH = 256


class Scale(nn.Module):
    """Branch ``f(x) = dropout(c * x)``: on a unit-variance input its variance is ``c^2 / (1 - p)`` in training."""

    def __init__(self, c: float, p: float = 0.0) -> None:
        super().__init__()
        self.c = c
        self.dropout = nn.Dropout(p)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c * x)


class KnownVarianceStack(nn.Module):
    """A user model following the residual sub-layer protocol, with branches of known variance."""

    def __init__(self, coefficients: list[float], p: float = 0.0, norm_position: str = "post") -> None:
        super().__init__()
        self.layers = nn.ModuleList(ResidualSublayer(Scale(c, p), WIDTH, norm_position) for c in coefficients)

    def residual_sublayers(self) -> list[ResidualSublayer]:
        return list(self.layers)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def unit_variance_input(rows: int = 512) -> Tensor:
    x = torch.randn(rows, WIDTH, generator=torch.Generator().manual_seed(1))
    return (x - x.mean()) / x.std()


def hand_recursion(branch_variances: list[float], input_variance: float = 1.0) -> list[float]:
    """The paper's rule written out for inputs of known variance: every LN output has variance 1."""
    omegas, r, x_var = [], 1.0, input_variance
    for f_var in branch_variances:
        omegas.append(r)
        r = math.sqrt(r * r * x_var + f_var)
        x_var = 1.0
    return omegas


# -- the formula -------------------------------------------------------------------------------------


def test_profiled_omegas_follow_the_recursion_on_known_variances() -> None:
    coefficients = [0.5, 1.0, 2.0, 0.3, 1.5]
    model = KnownVarianceStack(coefficients)
    add_residual_scales(model)
    result = profile_omegas(model, unit_variance_input())
    expected = hand_recursion([c * c for c in coefficients])
    assert result.omegas == pytest.approx(expected, rel=2e-3)
    # w_i^2 = 1 + sum_{j<i} Var f_j: the closed sum METHODS.md states.
    assert [w * w for w in result.omegas] == pytest.approx(
        [1.0 + sum(c * c for c in coefficients[:i]) for i in range(len(coefficients))], rel=4e-3
    )
    for omega, scale in zip(result.omegas, residual_scales(model), strict=True):
        assert scale.shape == (WIDTH,)
        assert torch.allclose(scale, torch.full_like(scale, omega))


def test_profiling_runs_in_training_mode_with_dropout_and_restores_eval_mode() -> None:
    p = 0.5
    coefficients = [1.0, 1.0, 1.0]
    model = KnownVarianceStack(coefficients, p=p).eval()
    add_residual_scales(model)
    result = profile_omegas(model, unit_variance_input(rows=2048))
    # Dropout on: Var f = c^2 / (1 - p) = 2, not the eval-mode 1.
    assert result.branch_variances == pytest.approx([c * c / (1 - p) for c in coefficients], rel=0.03)
    assert result.omegas == pytest.approx(hand_recursion([2.0, 2.0, 2.0]), rel=0.02)
    assert not model.training


def test_profiled_omegas_match_a_manual_forward_of_the_transformer() -> None:
    torch.manual_seed(0)
    model = TransformerLanguageModel(
        98, d_model=32, num_heads=2, num_layers=3, dim_feedforward=64, dropout=0.1
    )
    add_residual_scales(model)
    tokens = torch.randint(0, 98, (4, 16), generator=torch.Generator().manual_seed(2))
    rng = torch.get_rng_state()
    result = profile_omegas(model, tokens)
    # The same forward written out by hand, from the same RNG state (so the same dropout masks).
    torch.set_rng_state(rng)
    model.train()
    expected, r = [], 1.0
    with torch.no_grad():
        x = model.embedding_dropout(
            model.token_embedding(tokens) + model.position_embedding(torch.arange(16))
        )
        for sublayer in model.residual_sublayers():
            expected.append(r)
            skip, branch = r * x, sublayer.branch(x)
            r = math.sqrt(skip.double().var().item() + branch.double().var().item())
            x = sublayer.norm(skip + branch)
    assert result.omegas == pytest.approx(expected, rel=1e-6)
    assert result.omegas[0] == 1.0
    assert all(b > a for a, b in zip(result.omegas[1:], result.omegas[2:], strict=False))  # grows with depth


def test_profiling_leaves_the_global_rng_stream_untouched() -> None:
    model = TransformerLanguageModel(98, d_model=16, num_heads=2, num_layers=2, dim_feedforward=32)
    add_residual_scales(model)
    tokens = torch.randint(0, 98, (2, 8))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    profile_omegas(model, tokens)
    assert torch.equal(torch.get_rng_state(), state)
    after_profiling = torch.rand(5)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(5), after_profiling)


def _profile_shard_worker(rank: int, store: str, out_dir: str, rows: list[int]) -> None:
    """One rank of a 2-process gloo group: profile the transformer on this rank's rows of the batch."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        model, tokens = _shard_test_model_and_tokens()
        mine = tokens[rows[rank] : rows[rank + 1]]
        result = profile_omegas(model, mine)
        torch.save(
            {"omegas": result.omegas, "in": result.input_variances, "branch": result.branch_variances},
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        torch.distributed.destroy_process_group()


def _shard_test_model_and_tokens() -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    model = TransformerLanguageModel(
        98, d_model=32, num_heads=2, num_layers=3, dim_feedforward=64, dropout=0.0
    )
    add_residual_scales(model)
    # Shards of different sizes and content (low tokens vs high tokens), so pooling must weigh them.
    tokens = torch.randint(0, 98, (7, 16), generator=torch.Generator().manual_seed(3))
    tokens[:2] = tokens[:2] % 10
    return model, tokens


@pytest.mark.slow
def test_profiling_under_two_processes_equals_one_process_on_the_global_batch(tmp_path: Path) -> None:
    """Under torch.distributed every rank profiles on its shard, and the pooled variances give the
    single-process omegas on the concatenated batch, identical on both ranks (not rank 0's shard's)."""
    rows = [0, 2, 7]  # rank 0: rows 0-1, rank 1: rows 2-6
    torch.multiprocessing.spawn(
        _profile_shard_worker, args=(str(tmp_path / "store"), str(tmp_path), rows), nprocs=2, join=True
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0] == ranks[1]  # bitwise: every rank pools the same gathered statistics
    model, tokens = _shard_test_model_and_tokens()
    single = profile_omegas(model, tokens)
    assert ranks[0]["omegas"] == pytest.approx(single.omegas, rel=1e-6)
    assert ranks[0]["in"] == pytest.approx(single.input_variances, rel=1e-6)
    assert ranks[0]["branch"] == pytest.approx(single.branch_variances, rel=1e-6)
    shard_only = profile_omegas(_shard_test_model_and_tokens()[0], tokens[:2])
    assert shard_only.omegas != pytest.approx(single.omegas, rel=1e-3)  # the test can tell them apart


# -- closed form and surgery -------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "value"), [(1, 1.3731), (12, 2.0170), (36, 3.0408)])
def test_closed_form_value(n: int, value: float) -> None:
    assert closed_form_omega(n) == pytest.approx(value, abs=1e-4)
    assert closed_form_omega(n) == pytest.approx(math.sqrt((n + 1) / math.log(n + 1) - 1))


def test_closed_form_rejects_no_sublayers() -> None:
    with pytest.raises(ValueError, match="num_sublayers"):
        closed_form_omega(0)


def test_closed_form_surgery_sets_every_omega_and_fit_start_keeps_it() -> None:
    model = TransformerLanguageModel(98, d_model=16, num_heads=2, num_layers=3, dim_feedforward=32)
    plugin = Admin(init="closed_form")
    module = LitplugModule(model, plugins=[plugin])
    module.apply_surgery()
    scales = residual_scales(module.model)
    assert len(scales) == 6
    for scale in scales:
        assert torch.allclose(scale, torch.full((16,), closed_form_omega(6)))
    plugin.litplug_on_fit_start(module, (torch.randint(0, 98, (2, 8)), torch.zeros(2, 8, dtype=torch.long)))
    assert not plugin.profiled
    assert all(torch.allclose(s, torch.full((16,), closed_form_omega(6))) for s in scales)


def test_surgery_is_idempotent_and_makes_trainable_parameters() -> None:
    model = TransformerLanguageModel(98, d_model=16, num_heads=2, num_layers=2, dim_feedforward=32)
    before = sum(p.numel() for p in model.parameters())
    assert add_residual_scales(model) == 4
    first = residual_scales(model)
    assert add_residual_scales(model, value=7.0) == 0  # replayed: nothing new, nothing changed
    assert all(a is b for a, b in zip(first, residual_scales(model), strict=True))
    assert all(torch.equal(s, torch.ones(16)) for s in first)
    assert sum(p.numel() for p in model.parameters()) == before + 4 * 16
    assert all(s.requires_grad for s in first)
    assert all(f"sublayers.{i}.residual_scale" in model.state_dict() for i in range(4))


def test_pre_ln_sublayers_are_left_alone_in_a_mixed_stack() -> None:
    model = KnownVarianceStack([1.0, 1.0, 1.0])
    model.layers[1].norm_position = "pre"
    assert add_residual_scales(model) == 2
    assert model.layers[1].residual_scale is None
    result = profile_omegas(model, unit_variance_input())
    # The pre-LN sub-layer adds x + f(norm(x)) = 2x to the stream: the next post-LN input has variance 4.
    assert result.input_variances[1] == pytest.approx(result.omegas[1] ** 2 * 4.0, rel=2e-3)


# -- the plugin in a run -----------------------------------------------------------------------------


def tiny_run(
    plugins: list[Plugin], max_steps: int, ckpt_dir: Path | None = None, ckpt_path: Path | None = None
):
    torch.manual_seed(0)
    data = StdlibTextDataModule(seq_len=16, batch_size=8, num_files=2, max_chars=20_000)
    model = TransformerLanguageModel(
        data.vocab_size, d_model=16, num_heads=2, num_layers=2, dim_feedforward=32
    )
    module = LitplugModule(model, plugins=plugins, optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    callbacks = [ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=2, save_top_k=-1)] if ckpt_dir else []
    trainer = quiet_trainer(
        max_steps=max_steps, limit_val_batches=0, callbacks=callbacks, enable_checkpointing=bool(callbacks)
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module


class OmegaSpy(Plugin):
    """Runs right after Admin at fit start and records the omegas training starts from."""

    name = "omega_spy"
    run_after = ("admin",)

    def __init__(self) -> None:
        self.seen: list[Tensor] = []

    @hookimpl
    def litplug_on_fit_start(self, module: Any) -> None:
        self.seen = [s.detach().clone() for s in residual_scales(module.model)]


def test_fit_profiles_once_and_stores_the_scalars() -> None:
    admin, spy = Admin(), OmegaSpy()
    module = tiny_run([admin, spy], max_steps=2)
    assert admin.profiled
    assert len(admin.omegas) == 4 and admin.omegas[0] == 1.0 and admin.omegas[1] > 1.0
    for omega, seen in zip(admin.omegas, spy.seen, strict=True):
        assert torch.allclose(seen, torch.full_like(seen, omega))
    # Training moved the omegas (they are parameters in the optimizer).
    assert not torch.allclose(residual_scales(module.model)[1], spy.seen[1])
    state = admin.state_dict()
    restored = Admin()
    restored.load_state_dict(state)
    assert restored.state_dict() == state


def test_resume_keeps_trained_omegas_and_does_not_profile_again(tmp_path: Path) -> None:
    tiny_run([Admin(), OmegaSpy()], max_steps=4, ckpt_dir=tmp_path)
    checkpoint_path = tmp_path / "epoch=0-step=2.ckpt"
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    saved = [checkpoint["state_dict"][f"model.sublayers.{i}.residual_scale"] for i in range(4)]
    assert not all(torch.allclose(s, s[0].expand_as(s)) for s in saved)  # trained: no longer constant
    admin, spy = Admin(), OmegaSpy()
    tiny_run([admin, spy], max_steps=3, ckpt_path=checkpoint_path)
    assert admin.profiled
    assert admin.omegas == checkpoint["litplug"]["plugins"]["admin"]["state"]["omegas"]
    for at_fit_start, stored in zip(spy.seen, saved, strict=True):
        assert torch.equal(at_fit_start, stored)  # fit start after the resume changed nothing


# -- errors ------------------------------------------------------------------------------------------


def test_unknown_init_is_rejected() -> None:
    with pytest.raises(PluginConfigError, match="'admin'.*'init'.*'profile', 'closed_form'"):
        Admin(init="fixup")  # type: ignore[arg-type]


def test_pre_ln_transformer_is_a_clear_error() -> None:
    model = TransformerLanguageModel(98, d_model=16, num_heads=2, num_layers=2, norm_position="pre")
    module = LitplugModule(model, plugins=[Admin()])
    with pytest.raises(PluginSetupError, match="admin.*no post-LN residual sub-layers"):
        module.apply_surgery()
    with pytest.raises(AdminModelError, match="no post-LN"):
        add_residual_scales(model)


def test_model_without_the_protocol_is_a_clear_error() -> None:
    with pytest.raises(PluginSetupError, match="admin.*residual_sublayers"):
        LitplugModule(nn.Linear(4, 4), plugins=[Admin()])
    with pytest.raises(AdminModelError, match="no residual_sublayers"):
        add_residual_scales(nn.Linear(4, 4))


def test_sublayer_missing_part_of_the_protocol_is_named() -> None:
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(4, 4)

        def residual_sublayers(self) -> list[nn.Module]:
            return [self.inner]

    with pytest.raises(AdminModelError, match="sub-layer 0.*lacks"):
        add_residual_scales(Broken())


def test_check_setup_fails_before_training_on_a_pre_ln_model() -> None:
    data = StdlibTextDataModule(seq_len=16, batch_size=8, num_files=2, max_chars=20_000)
    model = TransformerLanguageModel(
        data.vocab_size, d_model=16, num_heads=2, num_layers=1, norm_position="pre"
    )
    module = LitplugModule(model, plugins=[Admin()])
    with pytest.raises(PluginSetupError, match="post-LN"):
        quiet_trainer(max_steps=1, limit_val_batches=0).fit(module, datamodule=data)


# -- export ------------------------------------------------------------------------------------------


def test_folding_omegas_into_weights_keeps_the_function_and_removes_them() -> None:
    torch.manual_seed(0)
    model = TransformerLanguageModel(98, d_model=32, num_heads=2, num_layers=3, dim_feedforward=64).eval()
    add_residual_scales(model)
    with torch.no_grad():
        for scale in residual_scales(model):
            scale.uniform_(0.5, 3.0)  # trained omegas are vectors, not constants
    folded = fold_omegas_into_weights(model)
    tokens = torch.randint(0, 98, (4, 16))
    assert torch.allclose(folded(tokens), model(tokens), atol=1e-5)
    assert all(s.residual_scale is None for s in folded.residual_sublayers())
    assert all(s.residual_scale is not None for s in model.residual_sublayers())  # the original is untouched
    plain = TransformerLanguageModel(98, d_model=32, num_heads=2, num_layers=3, dim_feedforward=64)
    assert plain.load_state_dict(folded.state_dict()) is not None  # loads into a model without Admin


def test_folding_refuses_a_branch_it_does_not_know() -> None:
    model = KnownVarianceStack([1.0, 1.0])
    add_residual_scales(model)
    with pytest.raises(AdminModelError, match="cannot fold"):
        fold_omegas_into_weights(model)
