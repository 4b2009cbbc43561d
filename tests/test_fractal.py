"""The formula-driven stand-ins (train.py --stage fractal) and the multi-seed sweeps."""
import json

import pytest
import torch

import babelrs
import datasets
import detection
import tables
import train


def test_fractal_images_are_drawn_from_the_index_alone():
    systems = datasets.ifs_categories(5, seed=3)
    assert systems.shape == (5, 4, 2, 3)
    linear = systems[..., :2]
    assert (torch.linalg.matrix_norm(linear, ord=2) < 1).all()  # contractive: the attractor exists
    assert ((systems.abs().sum((2, 3)) > 0).sum(1) >= 2).all()  # at least two maps each
    a, b = datasets.FractalImages(systems, 6, 32, seed=1), datasets.FractalImages(systems, 6, 32, seed=1)
    assert torch.equal(a[7]["images"], b[7]["images"]) and not torch.equal(a[7]["images"], a[8]["images"])
    test = datasets.FractalImages(systems, 6, 32, seed=1, split="test")
    assert not torch.equal(a[0]["images"], test[0]["images"])  # held-out instances: another stream
    img = datasets.render_fractals(systems, torch.Generator().manual_seed(0), 32)
    assert img.dtype == torch.uint8 and img.shape == (5, 3, 32, 32)


def test_fractal_stage_learns_and_writes_loadable_weights(tmp_path):
    # the ResNet-18: 4 categories, chance 25 %; after 60 steps the held-out accuracy is far above it (86 % here)
    run = tmp_path / "r18"
    assert train.main(["--stage", "fractal", "--classes", "4", "--image_size", "32", "--batch_size", "32",
                       "--steps", "60", "--lr", "1e-3", "--test_batches", "4", "--out", str(run)]) == 0
    acc = json.loads((run / "accuracy.json").read_text())
    assert acc["held_out_top1"] > 0.6 and acc["chance"] == 0.25, acc
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["machine"]["threads"] == torch.get_num_threads() and cfg["machine"]["torch"] == torch.__version__
    assert cfg["machine"]["deterministic"]
    # torchvision names without fc, loaded by the detector's backbone (and the embedding trunk)
    weights = str(run / "resnet18.safetensors")
    backbone = detection.ResNetBackbone("resnet18", weights, frozen_bn=True)
    from safetensors.torch import load_file
    state = load_file(weights)
    assert not any(k.startswith("fc.") for k in state)
    assert torch.equal(backbone.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])
    # the ViT: InternViT names, loaded strictly by the tiny csia ViT (positions resized to its grid)
    assert train.main(["--stage", "fractal", "--model", "vit", "--classes", "3", "--image_size", "32",
                       "--batch_size", "8", "--steps", "2", "--test_batches", "1", "--out", str(tmp_path / "vit")]) == 0
    babelrs.load_vit_weights(babelrs.ViT(64, 4, 4, 8, 128), str(tmp_path / "vit" / "vit.safetensors"))


def test_a_stand_in_is_shipped_in_half_precision_and_never_built_at_first_use(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "standin", train.standin.real)
    monkeypatch.setattr(train, "STANDINS", str(tmp_path / "weights"))
    try:
        train.standin("fractal", "vit")
        raise AssertionError("a missing stand-in must be an error")
    except datasets.DatasetError as e:  # names the file and the command that builds it
        assert "fractal-vit.safetensors" in str(e) and "--stage fractal --preset vit --ship" in str(e)
    assert not (tmp_path / "weights").exists()  # nothing was built
    assert train.main(["--stage", "fractal", "--preset", "vit", "--classes", "3", "--image_size", "32", "--batch_size",
                       "8", "--steps", "3", "--test_batches", "1", "--out", str(tmp_path / "run"), "--ship"]) == 0
    path = train.standin("fractal", "vit")
    assert path == str(tmp_path / "weights" / "fractal-vit.safetensors")
    from safetensors.torch import load_file
    assert all(v.dtype == torch.float16 for v in load_file(path).values())
    record = json.loads((tmp_path / "weights" / "fractal-vit.json").read_text())
    import hashlib
    assert record["sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert record["command"] == "python train.py --stage fractal --preset vit --ship" and len(record["first_losses"]) == 3
    babelrs.load_vit_weights(babelrs.ViT(64, 4, 4, 16, 192), path)  # half precision loads into the float32 ViT
    assert train.standin("", "vit") == "" and train.standin("my.pth", "resnet18") == "my.pth"


def test_the_shipped_stand_ins_rebuild_their_first_steps(tmp_path):
    """Each shipped stand-in's first 3 losses, rebuilt now from its recorded settings, agree with its record."""
    import pathlib
    for model in train.STANDIN_PRESETS:
        record_path = pathlib.Path(train.STANDINS) / f"fractal-{model}.json"
        assert record_path.exists(), f"{record_path}: the shipped stand-in's record is missing"
        record = json.loads(record_path.read_text())
        cfg = train.FractalConfig(**dict(record["settings"], max_steps=3, out=str(tmp_path / model), ckpt_every=1000))
        assert train.fractal_stage(cfg) == 0
        losses = [json.loads(line)["loss"] for line in (tmp_path / model / "log.jsonl").read_text().splitlines()][:3]
        assert losses == pytest.approx(record["first_losses"], abs=1e-4), model


def test_sweeps_run_every_row_per_seed():
    runs = tables.seeded_runs(tables.sweep_runs("mutdet-table2", "tiny", dict(sam=[], mutdet=[], finetune=[], csia=[],
                                                                               weights=[])), 3)
    folders = [f for f, _ in runs]
    assert folders.count("sam") == 1 and len(folders) == 1 + 3 * 5
    assert folders[1:6] == ["pre-detreg-seed0", "pre-mutdet-seed0", "ft-none-data1.0-seed0", "ft-detreg-data1.0-seed0",
                            "ft-mutdet-data1.0-seed0"]  # seed-major: a cut sweep has whole seeds
    argv = dict(runs)["ft-mutdet-data1.0-seed2"]
    assert argv[argv.index("--init") + 1] == "{runs}/pre-mutdet-seed2" and argv[-2:] == ["--seed", "2"]
    pre = dict(runs)["pre-mutdet-seed1"]
    assert pre[pre.index("--data") + 1] == "{runs}/sam"  # the shared cache keeps its name
