"""Training that meets a fault: a non-finite loss stops at its step with a checkpoint of the
last finite state and names the term; a checkpoint that cannot be written (a full disk) leaves the
previous one loadable and stops in one line; a second process on the same run folder is refused."""
import errno
import json
import math

import pytest
import torch

import babelrs
import datasets
import train

CSIA = ["--stage", "csia", "--vit", "", "--image_size", "32", "--vocab_size", "400", "--llm_dim", "32",
        "--llm_layers", "1", "--llm_ffn", "64", "--max-steps", "5"]


@pytest.fixture(scope="module")
def synth(synthsoi):  # read only: the session's SynthSOI
    return synthsoi


def test_a_non_finite_loss_stops_with_the_last_finite_state(synth, tmp_path, monkeypatch, capsys):
    real = babelrs.CSIA.forward

    def poisoned(self, *args, step=0, **kwargs):  # the loss of the third step goes NaN
        out = real(self, *args, step=step, **kwargs)
        return dict(out, loss=out["loss"] * float("nan")) if step == 2 else out
    monkeypatch.setattr(babelrs.CSIA, "forward", poisoned)
    run = tmp_path / "run"
    assert train.main(CSIA + ["--synth_root", str(synth), "--out", str(run), "--ckpt_every", "1000"]) == train.EXIT_NONFINITE
    err = capsys.readouterr().err
    assert "step 3: non-finite loss_align" in err and f"python train.py --resume {run}" in err
    weights, _, step = train.checkpoint_pair(run)
    assert step == 2  # the state before the poisoned step, although no regular checkpoint was due
    from safetensors.torch import load_file
    assert all(torch.isfinite(v).all() for v in load_file(str(weights)).values())
    monkeypatch.setattr(babelrs.CSIA, "forward", real)
    assert train.main(["--resume", str(run)]) == 0
    log = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4, 5] and all(math.isfinite(r["loss"]) for r in log)


def test_a_failed_checkpoint_write_keeps_the_previous_one(synth, tmp_path, monkeypatch, capsys):
    import safetensors.torch
    real, calls = safetensors.torch.save_file, []

    def disk_full(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)
    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    run = tmp_path / "run"
    status = train.main(CSIA + ["--synth_root", str(synth), "--out", str(run), "--ckpt_every", "2"])
    err = capsys.readouterr().err
    assert status == train.EXIT_WRITE_FAILED and "the checkpoint of step 4 could not be written" in err
    assert "the one of step 2 stays loadable" in err and "Traceback" not in err
    assert train.checkpoint_pair(run)[2] == 2 and not list(run.glob("*.tmp"))
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    assert train.main(["--resume", str(run)]) == 0 and train.checkpoint_pair(run)[2] == 5


def test_a_second_process_on_one_run_folder_is_refused(synth, tmp_path, capsys):
    run = tmp_path / "run"
    with datasets.folder_lock(run, wait=False):  # another process holds it
        assert train.main(CSIA + ["--synth_root", str(synth), "--out", str(run)]) == train.EXIT_BAD_DATA
    err = capsys.readouterr().err
    assert "in use by another process" in err and len(err.strip().splitlines()) == 1 and not run.exists()
    assert train.main(CSIA + ["--synth_root", str(synth), "--out", str(run), "--max-steps", "1"]) == 0  # free again


def test_a_dying_rank_stops_the_others_and_the_run_resumes(tmp_path):
    """DDP with a rank killed (`kill -9`) mid-run: the other rank and torchrun stop within a stated time
    (60 s here; gloo fails the collective whose peer is gone, torchrun tears the group down) instead of
    hanging, and the run resumes from its last checkpoint in one process (accumulation 2 = 2 ranks)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    synth = datasets.make_synthetic(tmp_path / "synth", n_train=8, n_test=1, size=64, max_objects=2)
    run = tmp_path / "ddp"
    argv = ["--stage", "finetune", "--resnet", "", "--image_size", "64", "--dim", "32", "--heads", "2", "--enc_layers",
            "1", "--dec_layers", "1", "--ffn", "32", "--num_queries", "10", "--num_dn_queries", "4", "--gn_groups", "8",
            "--batch_size", "2", "--global_batch", "4", "--eval", "false", "--data", f"rgb:{synth / 'rgb'}",
            "--max-steps", "400", "--ckpt_every", "2"]
    torchrun = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                                 "29519", str(root / "train.py")] + argv + ["--out", str(run)], cwd=root,
                                env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 180
        while not (train.checkpoint_pair(run) or (None, None, 0))[2] >= 4:  # a few steps with checkpoints
            assert time.time() < deadline and torchrun.poll() is None, "the DDP run did not start"
            time.sleep(0.5)
        workers = []
        for proc in Path("/proc").iterdir():
            try:
                env = (proc / "environ").read_bytes().split(b"\0")
                if proc.name.isdigit() and b"RANK=1" in env and b"LOCAL_RANK=1" in env and str(run).encode() in (
                        proc / "cmdline").read_bytes():
                    workers.append(int(proc.name))
            except OSError:
                continue
        assert len(workers) == 1
        os.kill(workers[0], signal.SIGKILL)
        t0 = time.time()
        status = torchrun.wait(timeout=60)
        stopped = time.time() - t0
    finally:
        if torchrun.poll() is None:
            os.killpg(torchrun.pid, signal.SIGKILL)
    print(f"\n  the DDP run stopped {stopped:.1f} s after rank 1 was killed (exit {status})")
    assert status != 0 and stopped < 60
    step = train.checkpoint_pair(run)[2]
    assert step >= 4 and train.main(["--resume", str(run), "--max-steps", str(step + 2)]) == 0
    assert train.checkpoint_pair(run)[2] == step + 2
