"""The shared training loop: learning, exact resume, EMA, checkpoints, non-finite losses, two processes."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from gmpipe.config.loop import LoopConfig
from gmpipe.train.checkpoint import latest_checkpoint, read_checkpoint
from gmpipe.train.ema import EMA
from gmpipe.train.loop import LossStep, NonFiniteLossError, _epoch_permutation, batch_indices, train

X = torch.randn(256, 4, generator=torch.Generator().manual_seed(0))
W_TRUE = torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
Y = X @ W_TRUE


def _regression_step(model: nn.Module, poison_at: int | None = None) -> LossStep:
    def loss(batch, step, context, modules):
        x, y = batch
        noise = torch.randn_like(y) * 0.01  # uses the global RNG: resume must restore it
        value = (modules["model"](x) - y - noise).square().mean()
        if step == poison_at:
            value = value * float("nan")
        return value, {"mse": value.detach()}

    return LossStep("model", model, loss)


def _make_batch(index, device):
    return X[index].to(device), Y[index].to(device)


def _config(**overrides) -> LoopConfig:
    base = dict(steps=6, batch_size=16, lr=0.05, log_every=2, checkpoint_every=2, ema_decay=0.9, clip_grad_norm=10.0)
    return LoopConfig(**{**base, **overrides})


def _run(tmp_path, config, model=None, **kwargs):
    torch.manual_seed(1)
    model = model or nn.Linear(4, 1)
    return train(config, [_regression_step(model, kwargs.pop("poison_at", None))], len(X), _make_batch,
                 tmp_path / "ckpt", live_dir=tmp_path / "live", ema_of="model", **kwargs)


def test_loss_goes_down_and_metrics_are_logged(tmp_path):
    result = _run(tmp_path, _config(steps=60, log_every=10, checkpoint_every=30))
    assert result.history[-1]["model/mse"] < 0.1 * result.history[0]["model/mse"]
    assert (tmp_path / "live" / "plots" / "metrics" / "model" / "mse.tsv").is_file()
    assert result.step == 60


def test_resume_continues_and_matches_an_uninterrupted_run(tmp_path):
    straight = _run(tmp_path / "a", _config(steps=6))
    first = _run(tmp_path / "b", _config(steps=4))
    assert first.step == 4 and latest_checkpoint(tmp_path / "b/ckpt").name == "step-00000004"
    resumed = _run(tmp_path / "b", _config(steps=6), model=nn.Linear(4, 1))
    assert resumed.resumed_from == 4 and resumed.step == 6
    for a, b in zip(straight.modules["model"].parameters(), resumed.modules["model"].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(straight.ema.module.weight, resumed.ema.module.weight, rtol=0, atol=0)


def test_finished_run_is_a_no_op_that_keeps_its_history(tmp_path):
    first = _run(tmp_path, _config(steps=4))
    again = _run(tmp_path, _config(steps=4))
    assert again.resumed_from == 4 and again.step == 4
    assert again.history == first.history and [r["step"] for r in again.history] == [2, 4]
    # The dvclive curves are rewritten from the checkpoint's history, complete, even when no step ran.
    rows = (tmp_path / "live/plots/metrics/model/mse.tsv").read_text().splitlines()
    assert [row.split("\t")[0] for row in rows[1:]] == ["2", "4"]


def test_ema_round_trip_and_warmup():
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.99)
    assert ema.current_decay() == pytest.approx(0.1)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    restored = EMA(nn.Linear(3, 2), decay=0.99)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 1
    torch.testing.assert_close(restored.module.weight, ema.module.weight, rtol=0, atol=0)
    # d_0 = 0.1: the average moved 90% of the way to the new weights.
    torch.testing.assert_close(ema.module.weight, model.weight - 0.1, rtol=0, atol=1e-6)


def test_checkpoint_round_trip_is_exact(tmp_path):
    result = _run(tmp_path, _config(steps=2))
    state = read_checkpoint(latest_checkpoint(tmp_path / "ckpt"), ["model"])
    for key, value in result.modules["model"].state_dict().items():
        torch.testing.assert_close(state["modules"]["model"][key], value, rtol=0, atol=0)
    assert state["trainer"]["step"] == 2 and state["optimizers"]["model"]["optimizer"]["state"]


def test_only_newest_checkpoints_are_kept(tmp_path):
    _run(tmp_path, _config(steps=8, checkpoint_every=2, keep_checkpoints=2))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-00000006", "step-00000008"]


def test_pickled_checkpoint_is_refused_and_the_previous_one_used(tmp_path, capsys):
    _run(tmp_path, _config(steps=4))
    optim_file = latest_checkpoint(tmp_path / "ckpt") / "model.optim.pt"

    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    optim_file.write_bytes(pickle.dumps({"optimizer": Evil()}))
    resumed = _run(tmp_path, _config(steps=6))
    out = capsys.readouterr().out
    assert "refused to load" in out and "trying the previous checkpoint" in out and "code ran" not in out
    assert resumed.resumed_from == 2 and resumed.step == 6
    assert (tmp_path / "ckpt/.corrupt-step-00000004").is_dir()


@pytest.mark.parametrize("damage", ["truncate", "header", "trainer", "nan"])
def test_damaged_newest_checkpoint_is_skipped_for_the_newest_intact_one(tmp_path, capsys, damage):
    straight = _run(tmp_path / "a", _config(steps=6))
    _run(tmp_path / "b", _config(steps=4))
    newest = latest_checkpoint(tmp_path / "b/ckpt")
    weights = newest / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "header":
        weights.write_bytes(b"\x00" * 16 + weights.read_bytes()[16:])
    elif damage == "trainer":
        (newest / "trainer.json").write_text('{"history": []}')
    else:
        from safetensors.torch import load_file, save_file

        tensors = load_file(weights)
        tensors["weight"][0, 0] = float("nan")
        save_file(tensors, weights)
    resumed = _run(tmp_path / "b", _config(steps=6))
    assert "skipped" in capsys.readouterr().out
    assert resumed.resumed_from == 2 and resumed.step == 6
    # Resuming from step 2 replays the same batches: the result equals an uninterrupted run.
    torch.testing.assert_close(straight.modules["model"].weight, resumed.modules["model"].weight, rtol=0, atol=0)


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLossError, match="non-finite model loss at step 3"):
        _run(tmp_path, _config(steps=6), poison_at=3)
    assert latest_checkpoint(tmp_path / "ckpt").name == "step-00000002"


def test_nonfinite_loss_can_be_skipped(tmp_path):
    result = _run(tmp_path, _config(steps=6, nonfinite="skip"), poison_at=3)
    assert result.step == 6 and all(torch.isfinite(p).all() for p in result.modules["model"].parameters())


def test_batch_indices_shard_the_global_batch():
    one = batch_indices(100, 8, step=3, micro=0, grad_accum=1, seed=5)
    ranks = torch.cat([batch_indices(100, 8, 3, 0, 1, 5, rank=r, world=2) for r in range(2)])
    assert torch.equal(one, ranks)
    micro = torch.cat([batch_indices(100, 8, 3, m, 2, 5) for m in range(2)])
    assert torch.equal(one, micro)
    epoch = torch.cat([batch_indices(100, 10, s, 0, 1, 5) for s in range(10)])
    assert sorted(epoch.tolist()) == list(range(100))  # one epoch visits every item once


def test_batch_indices_draw_each_epoch_order_once():
    def uncached(step: int) -> list[int]:  # the definition: position p of the walk is item perm_{p // n}[p % n]
        positions = range(step * 8, step * 8 + 8)
        orders = {e: torch.randperm(30, generator=torch.Generator().manual_seed(7 * 1_000_003 + e)) for e in range(4)}
        return [int(orders[p // 30][p % 30]) for p in positions]

    _epoch_permutation.cache_clear()
    for step in range(12):  # 96 positions over 30 items: batches straddle three epoch boundaries
        assert batch_indices(30, 8, step, 0, 1, seed=7).tolist() == uncached(step)
    info = _epoch_permutation.cache_info()
    assert info.misses == 4 and info.hits > info.misses  # one draw per epoch, not per step


def test_training_leaves_no_epoch_order_behind(tmp_path):
    _run(tmp_path, _config(steps=3))
    assert _epoch_permutation.cache_info().currsize == 0  # a notebook that trained keeps no copy of the data's order


def _two_process_worker(directory: str):
    from pathlib import Path

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    # debug_launcher forks: drop the single-process state that earlier tests left in this process.
    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    step = _regression_step(model)
    result = train(_config(steps=5, checkpoint_every=5), [step], len(X), _make_batch, Path(directory) / "ckpt",
                   accelerator=accelerator, ema_of="model")
    flat = torch.cat([p.detach().flatten() for p in result.modules["model"].parameters()])
    gathered = accelerator.gather(flat[None])
    assert torch.equal(gathered[0], gathered[1]), "ranks diverged"
    if accelerator.is_main_process:
        torch.save(gathered, Path(directory) / "gathered.pt")


def test_two_processes_keep_identical_parameters(tmp_path):
    """Two CPU ranks through accelerate.debug_launcher. It forks, so it runs in a fresh interpreter: forking
    the test process after other tests started Prefect's background threads is not safe."""
    import subprocess
    import sys

    from tests.conftest import REPO

    script = (
        "from accelerate import debug_launcher; from tests.train.test_loop import _two_process_worker; "
        f"debug_launcher(_two_process_worker, args=({str(tmp_path)!r},), num_processes=2)"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    gathered = torch.load(tmp_path / "gathered.pt", weights_only=True)
    assert gathered.shape[0] == 2 and torch.equal(gathered[0], gathered[1])
    assert latest_checkpoint(tmp_path / "ckpt").name == "step-00000005"


def test_nonfinite_check_without_host_sync_stops_before_the_next_checkpoint(tmp_path, monkeypatch):
    """The accelerator path (a device-side flag checked at log/checkpoint boundaries), exercised on CPU."""
    import gmpipe.train.loop as loop

    monkeypatch.setattr(loop, "checks_each_step", lambda device, config: False)
    with pytest.raises(NonFiniteLossError, match="between steps 2 and 4"):
        _run(tmp_path, _config(steps=6), poison_at=3)
    assert latest_checkpoint(tmp_path / "ckpt").name == "step-00000002"


def test_bf16_autocast_and_compile_run_on_cpu(tmp_path):
    """GPU speed paths exercised on CPU: bf16 autocast through accelerate, and torch.compile."""
    from gmpipe.config.compute import ComputeConfig
    from gmpipe.train.loop import make_accelerator

    accelerator = make_accelerator(ComputeConfig(device="cpu", mixed_precision="bf16"))
    result = _run(tmp_path / "bf16", _config(steps=4), accelerator=accelerator)
    assert result.step == 4 and all(torch.isfinite(p).all() for p in result.modules["model"].parameters())
    compiled = _run(tmp_path / "compiled", _config(steps=3, compile=True))
    assert compiled.step == 3 and latest_checkpoint(tmp_path / "compiled/ckpt").name == "step-00000003"


def test_channels_last_trains_the_same_convolution_and_hands_back_the_default_layout(tmp_path):
    """channels_last changes the memory layout only: the same seed gives the same weights (to float rounding), the
    checkpoint resumes into either layout, and the modules (and EMA) come back contiguous for saving."""
    images = torch.randn(64, 2, 8, 8, generator=torch.Generator().manual_seed(2))

    def conv_step(model):
        def loss(batch, step, context, modules):
            value = (modules["model"](batch) - batch.flip(1)).square().mean()
            return value, {"mse": value.detach()}
        return LossStep("model", model, loss)

    def run(folder, channels_last, steps=4):
        torch.manual_seed(3)
        model = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 2, 3, padding=1))
        return train(_config(steps=steps, channels_last=channels_last), [conv_step(model)], len(images),
                     lambda index, device: images[index].to(device), tmp_path / folder, ema_of="model")

    plain, fast = run("plain", False), run("fast", True)
    for a, b in zip(plain.modules["model"].parameters(), fast.modules["model"].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        assert b.is_contiguous()
    assert all(p.is_contiguous() for p in fast.ema.module.parameters())
    resumed = run("fast", False, steps=6)  # a layout switch is no new run: it continues
    assert resumed.resumed_from == 4 and resumed.step == 6
    # ... and continues it: AdamW's moments follow their weights into the new layout (the fused CPU kernel walks both
    # in memory order), so either switch ends where six uninterrupted steps do
    run("plain_then_fast", False)
    switched = run("plain_then_fast", True, steps=6)
    straight = run("straight", False, steps=6)
    for model in (resumed, switched):
        assert model.resumed_from == 4
        for a, b in zip(straight.modules["model"].parameters(), model.modules["model"].parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
