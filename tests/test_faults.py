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
def synth(tmp_path_factory):
    return datasets.make_synthetic(tmp_path_factory.mktemp("synth"))


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
