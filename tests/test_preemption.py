"""Long runs on clusters: SIGTERM / SIGUSR1 stop a run at a checkpoint that resumes exactly; a kill
during checkpoint writing leaves the previous checkpoint loadable; a run folder without a
checkpoint starts over cleanly; each log line carries the ETA."""
import json
import os
import signal

import pytest
import torch

import datasets
import tables
import train

CSIA = ["--stage", "csia", "--vit", "", "--image_size", "32", "--batch_size", "4", "--global_batch", "4", "--steps", "6", "--vocab_size", "400",
        "--llm_dim", "32", "--llm_layers", "1", "--llm_ffn", "64"]


def _log(run):
    return [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return datasets.make_synthetic(tmp_path_factory.mktemp("synth"), n_train=4, n_test=1, size=64, max_objects=2)


@pytest.fixture(scope="module")
def straight(synth, tmp_path_factory):
    run = tmp_path_factory.mktemp("straight")
    assert train.main(CSIA + ["--synth_root", str(synth), "--out", str(run)]) == 0
    return run


@pytest.mark.parametrize("name", ["SIGTERM", "SIGUSR1"])
def test_signal_stops_at_a_checkpoint_and_resume_is_exact(synth, straight, tmp_path, monkeypatch, capsys, name):
    data = ["--synth_root", str(synth)]
    lr = train.cosine_lr

    def lr_with_signal(step, cfg):  # the scheduler's signal arrives during step 3
        if step == 2:
            os.kill(os.getpid(), getattr(signal, name))
        return lr(step, cfg)
    monkeypatch.setattr(train, "cosine_lr", lr_with_signal)
    assert train.main(CSIA + data + ["--out", str(tmp_path / "cut")]) == train.EXIT_PREEMPTED
    assert f"{name} at step 3: checkpoint written" in capsys.readouterr().err
    assert train.checkpoint_pair(tmp_path / "cut")[2] == 3 and _log(tmp_path / "cut")[-1] == dict(step=3, preempted=name)
    monkeypatch.setattr(train, "cosine_lr", lr)
    assert train.main(["--resume", str(tmp_path / "cut")]) == 0
    straight, cut = _log(straight), [r for r in _log(tmp_path / "cut") if "loss" in r]
    assert [r["step"] for r in cut] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in cut] == pytest.approx([r["loss"] for r in straight], abs=1e-6)
    assert all(r["eta_s"] >= 0 for r in cut) and straight[-1]["eta_s"] == 0
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored after the run


@pytest.mark.parametrize("kill_at", [1, 2, 3, 4])
def test_a_kill_while_writing_leaves_a_loadable_checkpoint(tmp_path, kill_at):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    def state(step):
        return dict(step=step, optimizer=opt.state_dict(), scaler=scaler.state_dict(), rng=[train.rng_state()])
    with torch.no_grad():
        model.weight.fill_(1.0)
    train.save_checkpoint(tmp_path, model, state(1))
    with torch.no_grad():
        model.weight.fill_(2.0)
    pid = os.fork()
    if pid == 0:  # the child is killed at its kill_at-th rename, as by `kill -9`
        calls = []
        real = os.replace

        def replace(a, b):
            calls.append(a)
            if len(calls) == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            real(a, b)
        os.replace = replace
        train.save_checkpoint(tmp_path, model, state(2))
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status)
    weights, _, step = train.checkpoint_pair(tmp_path)
    fresh = torch.nn.Linear(3, 2)
    assert train.resume(tmp_path, fresh, torch.optim.AdamW(fresh.parameters()), scaler, 0) == step
    assert step in (1, 2) and torch.all(fresh.weight == float(step))  # the weights of that very step


def test_resume_without_a_checkpoint_starts_over(synth, tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main(CSIA + ["--synth_root", str(synth), "--out", str(run), "--max-steps", "2",
                              "--ckpt_every", "100"]) == 0
    for name in ("model.safetensors", "state.pt"):  # as if killed before its first checkpoint
        (run / name).unlink()
    assert train.main(["--resume", str(run), "--max-steps", "2"]) == 0
    assert "no checkpoint yet" in capsys.readouterr().out
    assert [r["step"] for r in _log(run)] == [1, 2]  # a fresh log, not 1, 2, 1, 2


def test_sweep_status_says_how_far_each_run_got(synth, straight, tmp_path, capsys):
    import shutil
    root = tmp_path / "runs"
    shutil.copytree(straight, root / "csia-lvsa-s200-tau60-seed0")  # a started row of Tab. 3 (its CSIA)
    assert tables.main(["--sweep", "babelrs-table3", "--status", "--runs", str(root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("ft-generic-off-seed0") and out[0].endswith("not started")
    assert "started: step 6, checkpoint at 6, ETA 0 min" in out[1]
