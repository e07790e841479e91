"""Multi-process (DDP, gloo on CPU) behaviour of every plugin and callback.

- Every registered plugin and callback: a 2-process run with per-device batch b ends with the same
  weights as a 1-process run with batch 2b (atol 1e-5) unless the plugin trains with randomness
  (``stochastic_training``: then the run must finish with the plugin state in agreement across
  ranks, which the DistributedPlugins callback checks). Both ranks run in one torchrun launch.
- The same 2-process run stopped mid-epoch with a checkpoint and resumed ends, on every rank, with
  the uninterrupted run's weights and plugin states (rank-local state such as a replay memory is
  saved per rank).
- A rank that dies ends a `ddp_spawn` run with an error within a bounded time.
- A run killed mid-epoch resumes on another number of processes (1 -> 2 -> 1) with the rest of the
  epoch, each example once.
- A real `litplug fit --trainer.strategy=ddp --trainer.devices=2` subprocess run.
"""

from __future__ import annotations

import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from ddp_worker import build, ddp_cases
from helpers import assert_same_state, litplug_command, quiet_trainer, subprocess_env

from litplug.core.plugin import Plugin

HERE = Path(__file__).resolve().parent
CASES = ddp_cases()
# Known differences between a 2-process and a 1-process run, kept visible instead of hidden (strict
# xfail with the reason). Empty now: Admin's profiling pools its variances across ranks.
KNOWN_MISMATCH: dict[str, str] = {}


def _run_retrying_once(
    command: list[str], timeout: float, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a multi-process job; run it once more if it fails, with a warning that keeps the failure.

    Two start-up failures not caused by litplug were seen, once each in many runs: a gloo worker
    aborting at start-up, and `litplug fit` with the ddp strategy failing while other tests started
    process groups at the same time (likely a race for the free port Lightning picks). A second
    failure fails the test; a first one shows in pytest's warnings summary with its stderr.
    """
    completed = subprocess.run(
        command, env=subprocess_env(), capture_output=True, text=True, timeout=timeout, cwd=cwd
    )
    if completed.returncode != 0:
        warnings.warn(
            f"retrying {' '.join(command[1:4])}... after exit {completed.returncode}: {completed.stderr[-1500:]}",
            stacklevel=2,
        )
        completed = subprocess.run(
            command, env=subprocess_env(), capture_output=True, text=True, timeout=timeout, cwd=cwd
        )
    return completed


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    # LITPLUG_DDP_CASES=plugin-admin,no-plugin (with -k) runs only those cases while working on one.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    completed = _run_retrying_once([*command, str(HERE / "ddp_worker.py"), str(out)], timeout=900)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, marks=pytest.mark.xfail(reason=KNOWN_MISMATCH[c], strict=True))
        if c in KNOWN_MISMATCH
        else c
        for c in sorted(CASES)
    ],
)
def test_two_processes_match_one_process(case: str, ddp_results: Path) -> None:
    plugin_classes, callback_cls = CASES[case]
    result = torch.load(ddp_results / f"{case}.pt", weights_only=False)
    if any(not cls.supports_ddp for cls in plugin_classes):
        assert "do not support multi-process training" in result.get("error", ""), result
        return
    assert "error" not in result, result.get("traceback")
    trainer, module, data = build(plugin_classes, callback_cls, devices=1)
    trainer.fit(module, datamodule=data)
    single = module.state_dict()
    if any(cls.stochastic_training for cls in plugin_classes):
        return  # agreement across ranks was checked in the run; weights match in distribution only
    for key, value in single.items():
        if key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue  # BatchNorm running statistics are per rank (rank zero's are kept)
        torch.testing.assert_close(result["state"][key], value, atol=1e-5, rtol=1e-4, msg=f"{case}: {key}")


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_two_process_run_resumes_to_the_same_state_on_every_rank(case: str, ddp_results: Path) -> None:
    plugin_classes, _ = CASES[case]
    unsupported = [cls.name for cls in plugin_classes if not cls.supports_ddp]
    if unsupported:
        pytest.skip(f"{unsupported} do(es) not support multi-process training")
    for rank in (0, 1):
        runs = torch.load(ddp_results / f"{case}-rank{rank}.pt", weights_only=False)
        assert "error" not in runs, f"rank {rank}: {runs['error']}"
        assert runs.keys() == {"uninterrupted", "resumed"}, f"rank {rank}: the worker recorded {sorted(runs)}"
        expected, got = runs["uninterrupted"], runs["resumed"]
        for key, value in expected["state"].items():
            assert torch.equal(got["state"][key], value), f"rank {rank}: {key} differs after resume"
        assert_same_state(expected["plugins"], got["plugins"], f"rank {rank}")


@pytest.mark.slow
def test_a_dying_rank_ends_the_run_with_an_error_in_bounded_time(tmp_path: Path) -> None:
    command = [sys.executable, str(HERE / "ddp_die.py")]
    started = time.monotonic()
    completed = subprocess.run(
        command, env=subprocess_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    elapsed = time.monotonic() - started
    assert completed.returncode != 0
    assert "rank 1 died" in completed.stderr
    assert elapsed < 300, f"took {elapsed:.0f}s"


@pytest.mark.slow
def test_litplug_fit_with_ddp_strategy_in_a_subprocess(tmp_path: Path, repo_root: Path) -> None:
    results = tmp_path / "results.json"
    command = litplug_command(
        "fit",
        repo_root / "configs" / "quickstart.yaml",
        "--trainer.strategy=ddp",
        "--trainer.devices=2",
        "--trainer.accelerator=cpu",
        "--trainer.max_steps=5",
        "--trainer.limit_val_batches=2",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=false",
        "--test_after_fit=false",
        f"--results_path={results}",
    )
    completed = _run_retrying_once(command, timeout=600, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "Starting with 2 processes" in completed.stderr + completed.stdout
    import json

    saved = json.loads(results.read_text())
    assert saved["global_step"] == 5 and saved["metrics"]["train/loss"] > 0

    # Export under a spawn strategy: rank zero writes the program from inside its worker process.
    target = tmp_path / "model.pt2"
    export = litplug_command(
        "export",
        repo_root / "configs" / "quickstart.yaml",
        "--trainer.strategy=ddp_spawn",
        "--trainer.devices=2",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=false",
        "--ckpt_path=last",
        f"--export_path={target}",
    )
    completed = _run_retrying_once(export, timeout=600, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert completed.stdout.count(f"written to {target}") == 1  # rank zero alone
    assert torch.export.load(target).module()(torch.zeros(3, 64)).shape == (3, 10)
    # An export error raised in rank zero's worker is the same one-line error as without spawn.
    completed = subprocess.run(
        [*export, "--dynamic_dims=[1]"], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert completed.returncode == 2, completed.stderr[-4000:]
    assert "litplug: error: export_predictor: input dimension 1 cannot be kept free" in completed.stderr
    assert "Traceback" not in completed.stderr


@pytest.mark.slow
def test_resuming_mid_epoch_on_another_number_of_processes_trains_on_the_rest_of_the_epoch(
    tmp_path: Path,
) -> None:
    """1 process x 8 killed after 3 steps, resumed on 2 x 8; that run's checkpoint one step into
    epoch 1 resumed on 1 x 8: every example of each epoch once, in the global order, and the
    epoch ends where Lightning's batch_idx says."""
    import json

    completed = _run_retrying_once([sys.executable, str(HERE / "ddp_recut.py"), str(tmp_path)], timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]

    def record(name: str) -> dict[str, list[list[int]]]:
        return json.loads((tmp_path / f"{name}-rank0.json").read_text())

    def flat(batches: list[list[int]]) -> list[int]:
        return [i for batch in batches for i in batch]

    one, ranks = (
        record("one"),
        [record("one-to-two"), json.loads((tmp_path / "one-to-two-rank1.json").read_text())],
    )
    epochs = flat(one["seen"][:5]), flat(one["seen"][5:])
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(40))
    steps = [ranks[0]["seen"][k] + ranks[1]["seen"][k] for k in range(len(ranks[0]["seen"]))]
    assert flat(one["seen"][:3]) + steps[0] == epochs[0]
    assert flat(steps[1:]) == epochs[1]
    for rank in ranks:
        assert rank["batch_indices"] == [[0, 2], [1, 0], [1, 1], [1, 2]]
    back = record("two-to-one")
    assert steps[1] + flat(back["seen"]) == epochs[1]
    assert back["batch_indices"] == [[1, 2], [1, 3], [1, 4]]


def test_agreement_check_names_the_plugin_whose_state_differs(monkeypatch: pytest.MonkeyPatch) -> None:
    from litplug.callbacks.ddp import DistributedPlugins, StateDisagreementError
    from litplug.core import distributed

    class Counter(Plugin):
        name = "counter_state"

        def __init__(self) -> None:
            self.value = torch.tensor([1.0])

        def state_dict(self) -> dict[str, object]:
            return {"value": self.value}

    class Fake:
        plugins = [Counter()]

        def named_parameters(self) -> list[tuple[str, torch.Tensor]]:
            return [("w", torch.ones(2))]

    def gather(local: object) -> list[object]:  # rank 1 reports a different plugin value
        other = {key: dict(value) for key, value in local.items()}  # type: ignore[union-attr]
        other["plugin 'counter_state'"]["value"] = (2.0, 4.0)
        return [local, other]

    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "gather_object", gather)
    with pytest.raises(
        StateDisagreementError, match="plugin 'counter_state': state 'value' differs between rank 0"
    ):
        DistributedPlugins().assert_agreement(Fake(), "test")  # type: ignore[arg-type]


def test_lr_scaling_is_applied_once_and_survives_resume(tmp_path: Path) -> None:
    from litplug.callbacks.ddp import DistributedPlugins, lr_scale
    from litplug.core.module import LitplugModule

    assert lr_scale(256, 64, "sqrt") == 2.0 and lr_scale(256, 64, "linear") == 4.0
    from litplug.core.data import DigitsDataModule

    def fit(max_steps: int, callback: DistributedPlugins, ckpt: Path | None = None, batch: int = 16) -> float:
        module = LitplugModule(torch.nn.Linear(64, 10), optimizer=lambda p: torch.optim.SGD(p, lr=0.01))
        trainer = quiet_trainer(max_steps=max_steps, callbacks=[callback], limit_val_batches=0)
        trainer.fit(module, datamodule=DigitsDataModule(batch_size=batch), ckpt_path=ckpt)
        trainer.save_checkpoint(tmp_path / f"c{max_steps}.ckpt")
        return trainer.optimizers[0].param_groups[0]["lr"]

    assert fit(2, DistributedPlugins(lr_scaling="linear", base_batch_size=4)) == pytest.approx(0.04)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = fit(3, DistributedPlugins(lr_scaling="linear", base_batch_size=4), tmp_path / "c2.ckpt")
    assert resumed == pytest.approx(0.04)  # not scaled a second time
    assert not [w for w in caught if "DistributedPlugins" in str(w.message)]
    # On another global batch (other devices, another batch size) it keeps the scaled rates, and says so.
    other = "resumed with global batch 32, but the learning rates in the checkpoint were scaled x4 for global batch 16"
    with pytest.warns(UserWarning, match=other):
        assert fit(4, DistributedPlugins("linear", 4), tmp_path / "c3.ckpt", batch=32) == pytest.approx(0.04)


def test_gpu_check_script_dry_runs_on_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from litplug.callbacks.ddp.gpu_check import main

    monkeypatch.chdir(tmp_path)
    args = ["--accelerator", "cpu", "--devices", "1", "--precision", "32-true", "--steps", "2"]
    assert main([*args, "--only", "no-plugin"]) == 0
