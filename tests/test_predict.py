"""eval.py --predict: full scenes cut into patches, detected, merged once per object; drawings,
DOTA Task1 files and the server zip; the modality of a multi-modal run."""
import json
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import babelrs
import datasets
import eval as ev
import mutdet
import rotated_ops as ro

# objects (cx, cy, w, h, θ) placed across the patch borders of a 2000 x 1500 scene cut 1024 / 200:
# windows start at x = 0, 824, 976 and y = 0, 476
OBJECTS = [(1010, 300, 80, 30, 0.0),       # across x = 1024 (the end of the first column of patches)
           (900, 500, 60, 40, 0.5),        # inside the overlap of four patches
           (1500, 1000, 100, 24, -0.3),    # across y = 1024
           (200, 200, 50, 50, 0.0),        # inside one patch only
           (1840, 700, 70, 30, 1.2),       # across x = 1848
           (600, 1030, 90, 20, 0.2)]       # across y = 1024, near the middle of a patch


def _scene():
    canvas = Image.new("L", (2000, 1500), 0)
    draw = ImageDraw.Draw(canvas)
    boxes = ro.regularize_obb(torch.tensor(OBJECTS, dtype=torch.float64))
    for k, poly in enumerate(ro.obb2poly(boxes).numpy()):
        draw.polygon([tuple(p) for p in poly.reshape(4, 2)], fill=20 + 10 * k)
    grey = np.asarray(canvas)
    areas = {20 + 10 * k: int((grey == 20 + 10 * k).sum()) for k in range(len(OBJECTS))}
    return np.repeat(grey[..., None], 3, axis=2), boxes, areas


def _exact_detector(areas):
    """A stand-in detector that is exact on each patch: each grey level is one object; its box is
    the mask's minimum-area rectangle and its score the visible fraction of the object."""
    def detect(patches):
        out = []
        for p in patches:
            grey = p[..., 0].astype(int)
            dets = [[], []]
            for level, full in areas.items():
                mask = (grey == level) & (p[..., 1] == p[..., 0])
                if mask.sum() < 4:
                    continue
                box = mutdet.mask_to_obb(mask).double().numpy()
                dets[(level // 10) % 2].append(np.r_[box, mask.sum() / full])
            out.append([np.asarray(d, np.float64).reshape(-1, 6) for d in dets])
        return out
    return detect


def test_scene_objects_across_patch_borders_are_detected_once():
    image, boxes, areas = _scene()
    patches = ev.cut_scene(image, 1024, 200)
    assert [(x, y) for x, y, _ in patches] == [(0, 0), (0, 476), (824, 0), (824, 476), (976, 0), (976, 476)]
    assert all(p.shape == (1024, 1024, 3) for _, _, p in patches)
    calls = []
    dets = ev.detect_scene(_exact_detector(areas), image, 1024, 200, num_classes=2, batch_size=4,
                           on_batch=calls.append)
    assert calls == [4, 2]
    found = torch.from_numpy(np.concatenate(dets)[:, :5])
    assert len(found) == len(OBJECTS)  # each object once after merging, although most lie in several patches
    iou = ro.box_iou_rotated(found, boxes)
    assert (iou.max(0).values > 0.9).all() and (iou.max(1).values > 0.9).all()
    assert np.allclose(np.concatenate(dets)[:, 5], 1.0)  # the whole view of each object won


def test_task1_files_round_trip_through_dets(tmp_path):
    image, boxes, areas = _scene()
    dets = ev.detect_scene(_exact_detector(areas), image, 1024, 200, num_classes=2)
    ev.write_dota_task1(tmp_path / "dets", {"scene": dets}, ["even", "odd"])
    ann = tmp_path / "ann"
    (ann / "images").mkdir(parents=True)
    Image.fromarray(image).save(ann / "images" / "scene.png")
    labels = ["even" if ((20 + 10 * k) // 10) % 2 == 0 else "odd" for k in range(len(OBJECTS))]
    datasets.write_dota_txt(ann / "labelTxt" / "scene.txt", ro.obb2poly(boxes).numpy(), labels)
    assert ev.main(["--dets", str(tmp_path / "dets"), "--ann", str(ann), "--metric", "area"]) == 0


def _run(tmp_path, modalities=("rgb",), image_size=128, dec_layers=1):
    torch.manual_seed(0)
    sources = [dict(modality=m, classes=["ship", "plane"], box_type="obb", image_size=image_size, test="") for m in modalities]
    args = dict(backbone="resnet18", resnet="", frozen_bn=False, dim=32, heads=2, levels=4, points=2, enc_layers=1,
                dec_layers=dec_layers, ffn=32, dropout=0.0, num_queries=10, num_dn_queries=0, gn_groups=8)
    model = babelrs.build_detector(sources=[dict(modality=s["modality"], classes=s["classes"], box_type="obb")
                                            for s in sources], **args)
    run = tmp_path / "run"
    run.mkdir()
    from safetensors.torch import save_file
    save_file(model.state_dict(), str(run / "model.safetensors"))
    (run / "model.json").write_text(json.dumps(dict(args, sources=sources)))
    return run


def test_predict_writes_drawings_task1_and_zip(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ev, "TASK1_SCORE", 0.0)  # an untrained model scores about 0.01 (the focal prior)
    image, _, _ = _scene()
    (tmp_path / "imgs").mkdir()
    Image.fromarray(image[:700, :900]).save(tmp_path / "imgs" / "scene.png")
    Image.fromarray(image[:100, :100]).save(tmp_path / "imgs" / "small.jpg")
    run = _run(tmp_path)
    out = tmp_path / "pred"
    assert ev.main(["--run", str(run), "--predict", str(tmp_path / "imgs"), "--out", str(out), "--patch", "512",
                    "--gap", "100", "--zip", "--score", "0.0"]) == 0
    assert (out / "scene.png").exists() and Image.open(out / "scene.png").size == (900, 700)
    assert (out / "small.png").exists()
    names = sorted(zipfile.ZipFile(out / "submission.zip").namelist())
    assert names == ["Task1_plane.txt", "Task1_ship.txt"]
    rows = (out / "Task1_ship.txt").read_text().split("\n")[0].split()
    assert rows[0] in ("scene", "small") and len(rows) == 10
    assert "2 images" in capsys.readouterr().out


def test_predict_names_the_modalities_of_a_multi_modal_run(tmp_path, capsys):
    run = _run(tmp_path, ("sar", "rgb"))
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "a.png")
    assert ev.main(["--run", str(run), "--predict", str(tmp_path / "a.png"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "sar, rgb" in err and "--modality" in err and len(err.strip().splitlines()) == 1
    assert ev.main(["--run", str(run), "--predict", str(tmp_path / "a.png"), "--out", str(tmp_path / "o"),
                    "--modality", "rgb"]) == 0
    assert ev.main(["--run", str(run), "--predict", str(tmp_path / "missing.png")]) == 2


def test_test_time_views_map_back_exactly(tmp_path):
    """--tta flip,rot90,scale: every view of the scene, detected by the exact stand-in detector, maps its
    boxes back onto the true ones (angles included), and merging keeps each object once."""
    image, boxes, areas = _scene()
    views = ev.parse_tta("flip,rot90,scale=0.5/1.0")
    assert [k for k, _ in views] == ["none", "hflip", "vflip", "rot90", "rot90", "rot90", "scale"]
    for kind, value in views[:6]:  # each exact view alone gives the true boxes back
        dets = ev.detect_scene_tta(_exact_detector(areas), image, 1024, 200, 2, [(kind, value)])
        found = torch.from_numpy(np.concatenate(dets)[:, :5])
        iou = ro.box_iou_rotated(found, boxes)
        assert len(found) == len(OBJECTS) and (iou.max(1).values > 0.9).all(), kind
    merged = torch.from_numpy(np.concatenate(ev.detect_scene_tta(_exact_detector(areas), image, 1024, 200, 2,
                                                                 views[:6]))[:, :5])
    assert len(merged) == len(OBJECTS)  # six views of each object, merged into one
    assert (ro.box_iou_rotated(merged, boxes).max(0).values > 0.9).all()
    with pytest.raises(ev.datasets.DatasetError, match="none of flip"):
        ev.parse_tta("mirror")


def test_predict_with_test_time_views(tmp_path, capsys):
    run = _run(tmp_path)
    Image.fromarray(np.zeros((64, 80, 3), np.uint8)).save(tmp_path / "a.png")
    assert ev.main(["--run", str(run), "--predict", str(tmp_path / "a.png"), "--out", str(tmp_path / "o"),
                    "--tta", "flip,rot90"]) == 0
    assert (tmp_path / "o" / "Task1_ship.txt").exists()


def test_attention_points_follow_the_reference_box(tmp_path):
    """--attention K: with the last layer's sampling offsets set to (P, 0) for every point, each point
    must sit at the middle of its reference box's +w edge (the offset's frame is the box's own, turned
    by its angle); with zero offsets, at the box's centre. Weights sum to 1 over a head's L x P points."""
    run = _run(tmp_path, dec_layers=2)
    model, sources = ev.build_run_model(run)
    g = torch.Generator().manual_seed(1)
    image = (torch.rand(70, 100, 3, generator=g) * 255).to(torch.uint8).numpy()  # non-square: padded map
    attn = model.heads["rgb"].decoder[-1].cross_attn
    P = attn.points
    with torch.no_grad():
        attn.sampling_offsets.weight.zero_()
        attn.sampling_offsets.bias.copy_(torch.tensor([float(P), 0.0]).repeat(attn.heads * attn.levels * P))
    att = ev.attention_of(model, "rgb", image, 128, k=3)
    assert att["points"].shape == (3, attn.heads, attn.levels, P, 2) and att["corners"].shape == (3, 4, 2)
    assert torch.allclose(att["weights"].sum((2, 3)), torch.ones(3, attn.heads), atol=1e-5)
    edge_middle = (att["corners"][:, 1] + att["corners"][:, 2]) / 2  # corners tl, tr, br, bl: tr-br is the +w edge
    assert torch.allclose(att["points"], edge_middle[:, None, None, None].expand_as(att["points"]), atol=1e-3)
    assert not torch.allclose(edge_middle, att["corners"].mean(1), atol=1e-3)  # a real offset, not the centre
    with torch.no_grad():
        attn.sampling_offsets.bias.zero_()
    att0 = ev.attention_of(model, "rgb", image, 128, k=3)
    assert torch.allclose(att0["points"], att0["corners"].mean(1)[:, None, None, None].expand_as(att0["points"]), atol=1e-3)
    assert torch.equal(att0["queries"], att["queries"])  # the last layer's offsets do not change which queries score highest


def test_predict_draws_attention(tmp_path):
    run = _run(tmp_path)
    Image.fromarray(np.zeros((64, 80, 3), np.uint8)).save(tmp_path / "a.png")
    assert ev.main(["--run", str(run), "--predict", str(tmp_path / "a.png"), "--out", str(tmp_path / "o"),
                    "--attention", "2"]) == 0
    assert Image.open(tmp_path / "o" / "a_attention.png").size == (768, 614)  # a small image is drawn at 768 px
