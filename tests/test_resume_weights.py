"""A resumed run takes its weights from its own checkpoint, whatever its config's weight fields hold:
each stage at its default tiny preset, the weight fields as the presets set them
("fractal", resolved to stand-in files written here with random weights), stopped by SIGTERM or by
--max-steps, then resumed, gives the straight run's losses; and it does so after the stand-in file
it started from has been deleted. The sam stage resumes by skipping the images it has done."""
import json
import os
import signal
import shutil

import pytest
import torch
from safetensors.torch import save_file

import datasets
import eval as evaluation
import tables
import train

# the stage and preset as the README runs them; only sizes shrink, never a weight field
STAGES = {
    "finetune": ["--stage", "finetune", "--image_size", "64", "--eval", "false"],
    "babelrs-tiny": ["--stage", "finetune", "--preset", "babelrs-tiny", "--image_size", "64", "--eval", "false"],
    "csia": ["--stage", "csia", "--image_size", "32", "--vocab_size", "400", "--llm_dim", "32", "--llm_layers", "1",
             "--llm_ffn", "64"],
    "mutdet": ["--stage", "mutdet", "--image_size", "64", "--dim", "32", "--ffn", "64", "--num_queries", "20",
               "--num_dn_queries", "6"],
}
STEPS = 4


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return datasets.make_synthetic(tmp_path_factory.mktemp("synth"), n_train=4, n_test=1, size=64, max_objects=2)


@pytest.fixture(scope="module")
def sam_cache(synth, tmp_path_factory):
    """A pseudo-label cache of 12 images for the mutdet stage (SAM stand-in, random embedding ResNet)."""
    out = tmp_path_factory.mktemp("sam")
    assert train.main(["--stage", "sam", "--synth_root", str(synth), "--masks", "components", "--resnet", "",
                       "--max-steps", "12", "--pca_dim", "32", "--out", str(out)]) == 0
    return out


@pytest.fixture
def standins(tmp_path, monkeypatch):
    """Stand-in files where `train.standin` looks for them, random weights, written as the fractal
    stage writes them (no build: the conftest guard stays for everything else)."""
    root = tmp_path / "standins"
    root.mkdir()
    for name, preset in train.STANDIN_PRESETS.items():
        torch.manual_seed(0)
        cfg = train.FRACTAL_PRESETS[preset]
        state = train.standin_state(train.fractal_model(cfg), cfg)
        save_file({k: v.half().contiguous() for k, v in state.items()}, str(root / f"fractal-{name}.safetensors"))
    monkeypatch.setattr(train, "STANDINS", str(root))
    monkeypatch.setattr(train, "standin", train.standin.real)
    return root


def _losses(run):
    return [r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in r]


def _signal_at_step_2(monkeypatch):
    """SIGTERM arrives while step 2 runs (through the lr schedule every stage calls each step)."""
    for name in ("lr_at", "cosine_lr"):
        real = getattr(train, name)

        def wrapped(step, *args, real=real):
            if step == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            return real(step, *args)
        monkeypatch.setattr(train, name, wrapped)


@pytest.mark.parametrize("stage", list(STAGES))
def test_resume_at_the_default_tiny_preset_with_its_standin_gone(stage, synth, sam_cache, standins, tmp_path,
                                                                monkeypatch):
    argv = STAGES[stage] + ["--synth_root", str(synth), "--ckpt_every", "1000", "--max-steps", str(STEPS)]
    argv += ["--data", str(sam_cache)] if stage == "mutdet" else []
    assert train.main(argv + ["--out", str(tmp_path / "straight")]) == 0
    cfg = json.loads((tmp_path / "straight" / "config.json").read_text())
    assert "fractal" in (cfg.get("resnet"), cfg.get("init"), cfg.get("vit"))  # the preset's weight field, as run
    # SIGTERM during step 2: a checkpoint at 2, exit 4; then the stand-in it started from is deleted
    with monkeypatch.context() as m:
        _signal_at_step_2(m)
        assert train.main(argv + ["--out", str(tmp_path / "cut")]) == train.EXIT_PREEMPTED
    shutil.rmtree(standins)
    assert train.main(["--resume", str(tmp_path / "cut"), "--max-steps", str(STEPS)]) == 0
    assert _losses(tmp_path / "cut") == pytest.approx(_losses(tmp_path / "straight"), abs=1e-6)


def test_plain_stop_then_resume_with_a_moved_weight_file(synth, standins, tmp_path):
    """`--max-steps 2`, then `--resume --max-steps 4`, after the --resnet file has moved away."""
    moved = tmp_path / "resnet18.safetensors"
    shutil.copy(standins / "fractal-resnet18.safetensors", moved)
    argv = STAGES["finetune"] + ["--synth_root", str(synth), "--ckpt_every", "1000", "--resnet", str(moved)]
    assert train.main(argv + ["--max-steps", str(STEPS), "--out", str(tmp_path / "straight")]) == 0
    assert train.main(argv + ["--max-steps", "2", "--out", str(tmp_path / "part")]) == 0
    moved.unlink()
    assert train.main(["--resume", str(tmp_path / "part"), "--max-steps", str(STEPS)]) == 0
    assert _losses(tmp_path / "part") == pytest.approx(_losses(tmp_path / "straight"), abs=1e-6)
    # every command that reads the config back: scoring, prediction, tables, a sweep's status, --init RUN
    run = tmp_path / "part"
    assert evaluation.main(["--run", str(run)]) == 0 and (run / "metrics.json").exists()
    images = synth / "rgb" / "test" / "images"
    assert evaluation.main(["--run", str(run), "--predict", str(images), "--out", str(tmp_path / "pred")]) == 0
    assert tables.main(["--table", "mutdet-table2", str(run)]) == 0
    assert train.main(argv[:-2] + ["--resnet", "", "--init", str(run), "--max-steps", "1",
                                   "--out", str(tmp_path / "next")]) == 0


def test_sam_stage_rerun_skips_done_images(synth, standins, tmp_path):
    argv = ["--stage", "sam", "--synth_root", str(synth), "--masks", "components", "--clusters", "2", "--pca_dim", "8"]
    assert train.main(argv + ["--out", str(tmp_path / "straight"), "--max-steps", "4"]) == 0
    assert train.main(argv + ["--out", str(tmp_path / "part"), "--max-steps", "2"]) == 0  # 2 of 4 images, stopped
    assert train.main(argv + ["--resume", str(tmp_path / "part"), "--max-steps", "4"]) == 0
    done = [json.loads(l)["image"] for l in (tmp_path / "part" / "log.jsonl").read_text().splitlines()]
    assert len(done) == len(set(done)) == 4  # each image once
    from safetensors.torch import load_file
    for f in sorted((tmp_path / "straight" / "cache").iterdir()):
        a, b = load_file(str(f)), load_file(str(tmp_path / "part" / "cache" / f.name))
        assert torch.equal(a["boxes"], b["boxes"]) and torch.allclose(a["embeds"], b["embeds"], atol=1e-6)


def test_csia_resume_after_its_llm_folder_is_gone(synth, tmp_path):
    """`--llm FOLDER` gives the LM's shape and weights; a continuing run reads the shape it stored and
    the weights from its checkpoint, so the folder may have moved since."""
    import babelrs
    llm = tmp_path / "llm"
    model = babelrs.build_llm("", 400, 32, 1, 4, 2, 64)
    model.save_pretrained(str(llm))
    babelrs.build_tokenizer(["a plane and two ships", "<box>[[1, 2, 3, 4]]</box>"] * 20, 400).save_pretrained(str(llm))
    argv = ["--stage", "csia", "--synth_root", str(synth), "--vit", "", "--image_size", "32", "--llm", str(llm),
            "--ckpt_every", "1000"]
    assert train.main(argv + ["--max-steps", str(STEPS), "--out", str(tmp_path / "straight")]) == 0
    assert train.main(argv + ["--max-steps", "2", "--out", str(tmp_path / "part")]) == 0
    shutil.rmtree(llm)
    assert train.main(["--resume", str(tmp_path / "part"), "--max-steps", str(STEPS)]) == 0
    assert _losses(tmp_path / "part") == pytest.approx(_losses(tmp_path / "straight"), abs=1e-6)


def test_config_records_the_commit_and_every_weight_file(synth, standins, tmp_path):
    """config.json says which code and which weight files (SHA-256) a run started from; a resumed run
    keeps that record although its stand-in has gone since."""
    import hashlib
    argv = STAGES["finetune"] + ["--synth_root", str(synth), "--max-steps", "1", "--out", str(tmp_path / "r")]
    assert train.main(argv) == 0
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    standin = standins / "fractal-resnet18.safetensors"
    assert cfg["weights"]["resnet"] == {str(standin): hashlib.sha256(standin.read_bytes()).hexdigest()}
    assert len(cfg["commit"].removesuffix("+dirty")) in (0, 40)  # 40 hex digits in a checkout
    shutil.rmtree(standins)
    assert train.main(["--resume", str(tmp_path / "r"), "--max-steps", "2"]) == 0
    assert json.loads((tmp_path / "r" / "config.json").read_text())["weights"] == cfg["weights"]
