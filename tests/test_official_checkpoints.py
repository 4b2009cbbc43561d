"""Released mmrotate checkpoints (ARS-DETR, MutDet) load into our detector through the key map.

No released file is at hand here, so the checkpoints are built (random values) from the names and
shapes of every tensor of the official detectors, recorded by building them from their own configs
with mmcv / mmdet / mmrotate (`tests/record_official_fixtures.py --only state_dicts`;
`fixtures/official_state_dicts.json`): ARS-DETR 0d96c5e `dn_arw_arm_arcsl_rdetr_r50_dota.py` (the
released 73.42 AP50), MutDet 097ce90's DOTA pre-training and its DIOR-R fine-tuning. They load into
the presets that claim these settings, as `train.py --init` builds them and as `eval.py --weights`
reads the architecture off the file.
"""
import dataclasses
import json
from pathlib import Path

import pytest
import torch

import babelrs
import detection
import mutdet
import train

RECORD = json.loads((Path(__file__).parent / "fixtures" / "official_state_dicts.json").read_text())["detectors"]
DOTA = train.datasets.DOTA_V1_CLASSES
DIOR = train.datasets.CLASS_SETS["dior-r"]


def official_names(detector: str) -> dict:
    """{official name: shape} of every tensor of a recorded official detector."""
    return {k: tuple(v) for k, v in RECORD[detector]["tensors"].items()}


def _checkpoint(path, names):
    g = torch.Generator().manual_seed(0)

    def value(name, shape):  # random, with BatchNorm statistics that a trained network could have
        last = name.split(".")[-1]
        if last == "num_batches_tracked":
            return torch.tensor(5)
        if last == "running_var":
            return torch.rand(shape, generator=g) + 0.5
        return torch.randn(shape, generator=g) * 0.1
    state = {k: value(k, shape) for k, shape in names.items()}
    torch.save({"state_dict": state, "meta": {"epoch": 36}}, path)
    return state


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """{recorded detector: (path of its checkpoint, its state)}, written once for the module."""
    folder = tmp_path_factory.mktemp("released")
    return {name: (str(folder / f"{name}.pth"), _checkpoint(folder / f"{name}.pth", official_names(name)))
            for name in RECORD}


def _preset_model(preset: str, classes: list, modalities=("rgb",)):
    """The detector `train.py --preset PRESET --init FILE` builds before loading FILE."""
    cfg = dataclasses.replace(train.FINETUNE_PRESETS[preset], resnet="")
    return babelrs.build_detector(**train.model_args(cfg, [dict(modality=m, classes=classes, box_type="obb")
                                                           for m in modalities]))


def _listed(out: str, kind: str) -> set:
    return {line.split(": ", 1)[1] for line in out.splitlines() if line.startswith(f"  {kind}: ")}


def test_released_ars_detr_loads_every_tensor_through_init_and_weights(released, capsys):
    import eval as ev
    path, official = released["ars-detr-dota"]
    model = _preset_model("ars-detr-dota", DOTA, modalities=("rgb", "ir"))
    mutdet.load_official(model, path, detection.read_weights(path))
    out = capsys.readouterr().out
    assert "an mmrotate ARS-DETR checkpoint" in out and "0 start fresh" in out
    unused = _listed(out, "dropped (unused officially)")  # every tensor not loaded is named, and only these
    assert unused == ({k for k in official if k.endswith("num_batches_tracked")}
                      | {k for k in official if ".angle_head." in k or ".pos_trans" in k}
                      | {"bbox_head.transformer.level_embeds rows 4..4"})
    t = "bbox_head.transformer."
    head = model.heads["ir"]
    assert torch.equal(head.encoder[5].ffn.net[3].weight, official[t + "encoder.layers.5.ffns.0.layers.1.weight"])
    assert torch.equal(head.decoder[5].norm3.bias, official[t + "decoder.layers.5.norms.2.bias"])
    assert torch.equal(head.decoder[0].cross_attn.sampling_offsets.weight,
                       official[t + "decoder.layers.0.attentions.1.sampling_offsets.weight"])
    assert torch.equal(head.level_embed, official[t + "level_embeds"][:4])
    assert torch.equal(head.cls_branches[6].bias, official["bbox_head.cls_branches.6.bias"])
    assert torch.equal(model.neck.extra[0][1].weight, official["neck.extra_convs.0.gn.weight"])
    assert torch.equal(model.backbone.layer4[2].bn3.running_var if hasattr(model.backbone, "layer4")
                       else model.backbone.stages[3][2].bn3.running_var, official["backbone.layer4.2.bn3.running_var"])
    weights_model, sources = ev.build_weights_model(path, "ars-detr-dota")  # eval.py --weights: no preset model
    assert sources[0]["classes"] == list(DOTA) and sources[0]["image_size"] == 1024
    mine = {k: v for k, v in model.state_dict().items() if not k.startswith("heads.ir.")}
    theirs = weights_model.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_mutdet_fine_tuned_on_dior_loads_into_the_paper_preset(released, capsys):
    import eval as ev
    path, official = released["mutdet-finetune-dior"]
    model = _preset_model("paper", DIOR)
    mutdet.load_official(model, path, detection.read_weights(path))
    out = capsys.readouterr().out
    assert "an mmrotate ARS-DETR checkpoint" in out and "0 start fresh" in out
    assert _listed(out, "dropped (unused officially)") == ({k for k in official if k.endswith("num_batches_tracked")}
                                                           | {"bbox_head.transformer.level_embeds rows 4..4"})
    assert torch.equal(model.heads["rgb"].label_embedding.weight, official["bbox_head.label_embedding.weight"])
    weights_model, sources = ev.build_weights_model(path, "paper")
    assert sources[0]["classes"] == list(DIOR) and sources[0]["image_size"] == 800
    assert all(torch.equal(v, weights_model.state_dict()[k]) for k, v in model.state_dict().items())


def test_mutdet_pretraining_checkpoint_drops_its_modules_by_name(released, capsys):
    """MutDet's DOTA pre-training (2 + 2 layers, 256 pseudo-classes, the enhancement and the siamese
    head) into the DIOR-R fine-tuning preset (6 + 6), as the official `load_from` does."""
    path, official = released["mutdet-pretrain-dota"]
    model = _preset_model("paper", DIOR)
    mutdet.load_official(model, path, detection.read_weights(path))
    out = capsys.readouterr().out
    assert "MutDet / DETReg-row pre-training" in out
    dropped, fresh = _listed(out, "dropped"), _listed(out, "start fresh")
    assert {"enhancement.layers.2.mlp.0.weight", "feature_embed.2.weight", "patch_enc_decode.2.weight",
            "detector.heads.pre.label_embedding.weight"} <= dropped
    assert "heads.rgb.cls_branches.0.weight" in fresh and "heads.rgb.decoder.5.norm1.weight" in fresh
    assert "heads.rgb.encoder.5.self_attn.value_proj.weight" in fresh
    assert not any(k.startswith(("backbone.", "neck.")) for k in fresh)  # the frozen backbone and the neck carry over
    # by name, the pre-training's encoder-proposal branch (index 2 of 2 layers) lands in decoder layer 3
    assert torch.equal(model.heads["rgb"].reg_branches[2][4].weight, official["bbox_head.reg_branches.2.4.weight"])
    assert torch.equal(model.heads["rgb"].decoder[1].self_attn.in_proj_weight,
                       official["bbox_head.transformer.decoder.layers.1.attentions.0.attn.in_proj_weight"])


def test_a_missing_unknown_or_mismatched_tensor_is_a_one_line_error(released):
    path, official = released["ars-detr-dota"]
    model = _preset_model("ars-detr-dota", DOTA)
    state = dict(official)
    del state["bbox_head.transformer.decoder.layers.1.norms.0.weight"]
    with pytest.raises(ValueError, match="missing heads.rgb.decoder.1.norm1.weight"):
        mutdet.load_official(model, path, state)
    with pytest.raises(ValueError, match="bbox_head.something_new.weight"):
        mutdet.load_official(model, path, dict(official, **{"bbox_head.something_new.weight": torch.zeros(2, 2)}))
    state = dict(official, **{f"bbox_head.cls_branches.{i}.{p}": torch.zeros((5, 256) if p == "weight" else (5,))
                              for i in range(7) for p in ("weight", "bias")})  # another label space
    with pytest.raises(ValueError, match=r"shape heads.rgb.cls_branches.0.weight \(bbox_head.cls_branches.0.weight in the file\): \(5, 256\) in the file, \(15, 256\) here"):
        mutdet.load_official(model, path, state)
    wide = dict(official, **{"neck.convs.0.conv.weight": torch.zeros(256, 256, 1, 1)})  # an R-18's C3 width
    with pytest.raises(ValueError) as e:
        mutdet.load_official(model, path, wide)
    assert "shape neck.convs.0.0.weight (neck.convs.0.conv.weight in the file): (256, 256, 1, 1) in the file, (256, 512, 1, 1) here" in str(e.value)
    assert "\n" not in str(e.value)


def test_a_released_checkpoint_scores_and_predicts_without_a_run_folder(released, tmp_path, capsys, monkeypatch):
    """`eval.py --weights FILE --preset ars-detr-dota`: the architecture read off the official names and
    shapes, the preset's size and DOTA's class order; scored on a split beside the published 73.42, or
    used for prediction; a checkpoint of another class count is refused in one line."""
    import numpy as np
    from PIL import Image

    import datasets
    import eval as ev
    ckpt = released["ars-detr-dota"][0]
    monkeypatch.setitem(ev.RELEASED["ars-detr-dota"], "image_size", 64)  # the R-50 at 1024 px is slow here
    split = tmp_path / "dota" / "val"
    (split / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((96, 96, 3), np.uint8)).save(split / "images" / "p1.png")
    datasets.write_dota_txt(split / "labelTxt" / "p1.txt", np.array([[10, 10, 50, 10, 50, 30, 10, 30.0]]), ["ship"])
    capsys.readouterr()
    assert ev.main(["--weights", ckpt, "--preset", "ars-detr-dota", "--data", f"rgb:{tmp_path / 'dota'}"]) == 0
    assert "against 73.42" in capsys.readouterr().out
    out = tmp_path / "pred"
    assert ev.main(["--weights", ckpt, "--preset", "ars-detr-dota", "--predict", str(split / "images"),
                    "--out", str(out)]) == 0
    assert (out / "Task1_plane.txt").exists() and (out / "p1.png").exists()
    capsys.readouterr()
    assert ev.main(["--weights", ckpt, "--preset", "paper", "--predict", str(split / "images")]) == 2
    err = capsys.readouterr().err
    assert "15 classes, while --preset paper scores 20" in err and len(err.strip().splitlines()) == 1
