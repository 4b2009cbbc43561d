"""Proposal sources without SAM (--proposals random | selective): Felzenszwalb segmentation on cases
worked by hand, selective search on drawn shapes (boxes checked with shapely), random boxes against
the statistics they draw from, and the sam stage writing the same cache from each source."""
import json
import math

import numpy as np
import pytest
import shapely
import torch
from PIL import Image, ImageDraw

import datasets
import mutdet
import train


def grey_row(values):
    return np.repeat(np.asarray(values, np.float64)[None, :, None], 3, axis=2)  # (1, W, 3)


@pytest.mark.parametrize("k, segments", [(5, [0, 1, 2, 2]), (20, [0, 0, 1, 1]), (40, [0, 0, 1, 1]), (70, [0, 0, 0, 0])])
def test_felzenszwalb_merge_rule_by_hand(k, segments):
    """Pixels 0, 10, 30, 31 (grey, so |ΔI| = √3·Δ): edges √3, 10√3, 20√3 in that order.
    k = 5: only the √3 edge passes τ = k/|C|; k = 20: 10√3 = 17.3 <= 20 also merges, while 20√3 = 34.6 >
    min(17.3 + 10, 1.7 + 10); k = 40: 34.6 > min(17.3 + 20, 1.7 + 20) = 21.7 (the smaller threshold
    decides: the larger, 37.3, would merge); k = 70: 34.6 <= min(17.3 + 35, 1.7 + 35) = 36.7, one segment (Eq. 4)."""
    labels = mutdet.felzenszwalb(grey_row([0, 10, 30, 31]), k=k, sigma=0.0, min_size=1)
    assert labels[0].tolist() == segments


def test_felzenszwalb_flat_shapes_and_min_size():
    image = np.zeros((40, 60, 3), np.uint8)
    image[5:15, 5:25] = (200, 30, 30)
    image[20:35, 30:55] = (30, 200, 30)
    image[22:25, 5:8] = (30, 30, 200)  # 9 px
    labels = mutdet.felzenszwalb(image, k=10, sigma=0.0, min_size=1)
    assert labels.max() + 1 == 4
    for sl in (np.s_[5:15, 5:25], np.s_[20:35, 30:55], np.s_[22:25, 5:8]):
        assert len(np.unique(labels[sl])) == 1 and (labels == labels[sl][0, 0]).sum() == labels[sl].size
    assert mutdet.felzenszwalb(image, k=10, sigma=0.0, min_size=10).max() + 1 == 3  # the 9-px square joins a neighbour


def test_selective_search_finds_drawn_shapes():
    im = Image.new("RGB", (96, 96), (90, 90, 90))
    d = ImageDraw.Draw(im)
    d.rectangle([48, 0, 95, 95], fill=(150, 150, 110))  # two grounds: only the last region made spans the image
    d.rectangle([10, 12, 39, 25], fill=(230, 40, 40))  # pixels x 10..39, y 12..25
    tilt = [(60, 50), (85, 65), (77, 78), (52, 63)]
    d.polygon(tilt, fill=(40, 40, 230))
    boxes = mutdet.selective_search(np.asarray(im), k=20, sigma=0.5, min_size=20, seed=0)
    assert len(boxes) == len({tuple(np.round(b.numpy(), 3)) for b in boxes}) and (boxes[:, 3] >= 2).all()
    # the rectangle: its pixel centres span 29 x 13
    assert any(torch.allclose(b, torch.tensor([24.5, 18.5, 29.0, 13.0, 0.0], dtype=torch.float64), atol=1e-6) for b in boxes)
    # the tilted shape: some box overlaps its polygon at IoU > 0.7 (exact polygons)
    ref = shapely.Polygon(tilt)
    ious = [ref.intersection(p).area / ref.union(p).area
            for p in (shapely.Polygon(c) for c in mutdet.ro.obb_corners(boxes).numpy())]
    assert max(ious) > 0.7
    # ranking (§3.3): the whole image is the last region made, rank 1 x U(0, 1), so it comes early
    positions = [next(i for i, b in enumerate(mutdet.selective_search(np.asarray(im), k=20, sigma=0.5, min_size=20, seed=s))
                      if b[2] > 90 and b[3] > 90) for s in range(12)]
    assert np.mean(positions) < 3 < len(boxes) / 2
    assert torch.equal(boxes, mutdet.selective_search(np.asarray(im), k=20, sigma=0.5, min_size=20, seed=0))
    assert len(mutdet.selective_search(np.asarray(im), k=20, sigma=0.5, min_size=20, max_boxes=3)) == 3


def test_random_proposals_follow_the_statistics():
    stats = dict(counts=torch.tensor([2, 6]), sides=torch.tensor([[0.5, 0.25], [0.125, 0.0625]], dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    draws = [mutdet.random_proposals(stats, 100, 200, g) for _ in range(400)]
    assert {len(b) for b in draws} == {2, 6} and abs(np.mean([len(b) for b in draws]) - 4) < 0.3
    b = torch.cat(draws)
    sides = {tuple(s) for s in b[:, 2:4].tolist()}
    assert sides == {(100.0, 50.0), (25.0, 12.5)}  # scaled by the longer side, 200
    assert (b[:, 0] >= 0).all() and (b[:, 0] <= 200).all() and (b[:, 1] >= 0).all() and (b[:, 1] <= 100).all()
    assert (b[:, 4] >= -math.pi / 2).all() and (b[:, 4] < math.pi / 2).all() and b[:, 4].std() > 0.8  # uniform: π/√12


def test_sam_stage_from_each_source(tmp_path, capsys):
    synth = datasets.make_synthetic(tmp_path / "synth", n_train=3, n_test=1, size=64, max_objects=2, modalities=("rgb",))
    common = ["--stage", "sam", "--resnet", "", "--data", f"rgb:{synth / 'rgb'}", "--image_size", "64", "--crop", "16",
              "--pca_dim", "4", "--clusters", "2"]
    assert train.main(common + ["--proposals", "selective", "--ss_k", "50", "--out", str(tmp_path / "ss")]) == 0
    assert train.main(common + ["--proposals", "random", "--out", str(tmp_path / "rnd")]) == 2
    assert "--proposals_like" in capsys.readouterr().err and not (tmp_path / "rnd").exists()
    argv = common + ["--proposals", "random", "--proposals_like", str(tmp_path / "ss"), "--out", str(tmp_path / "rnd")]
    assert train.main(argv) == 0
    ss, rnd = (json.loads((tmp_path / r / "manifest.json").read_text()) for r in ("ss", "rnd"))
    assert [i["name"] for i in ss["images"]] == [i["name"] for i in rnd["images"]] and ss["classes"] == rnd["classes"]
    stats = mutdet.proposal_statistics(tmp_path / "ss")
    assert sorted(stats["counts"].tolist()) == sorted(i["boxes"] for i in ss["images"])
    assert all(i["boxes"] in stats["counts"].tolist() for i in rnd["images"])
    data = mutdet.PseudoLabels(tmp_path / "rnd")  # the same cache format: the mutdet stage reads it
    assert len(data[0]["boxes"]) == len(data[0]["embeds"]) > 0
    # a rerun draws the same boxes (seeded per image), so a resumed cache is the one a straight run writes
    first = (tmp_path / "rnd" / "raw" / f"{rnd['images'][0]['name']}.safetensors").read_bytes()
    (tmp_path / "rnd" / "raw" / f"{rnd['images'][0]['name']}.safetensors").unlink()
    assert train.main(["--resume", str(tmp_path / "rnd")]) == 0
    assert (tmp_path / "rnd" / "raw" / f"{rnd['images'][0]['name']}.safetensors").read_bytes() == first
