import math

import numpy as np
import pytest

import eval as ev
from conftest import random_boxes, shapely_iou


def _devkit_voc_eval(dets, annots, c, thr, use_07, strict):
    """The DOTA devkit's `voc_eval` loop, transcribed: one detection at a time, shapely IoU."""
    npos = sum(int(((a["labels"] == c) & ~a["difficult"]).sum()) for a in annots)
    rows = [(i, d) for i, per in enumerate(dets) for d in np.asarray(per[c]).reshape(-1, 6)]
    rows.sort(key=lambda r: -r[1][5])  # Python's sort is stable
    matched = [np.zeros(int((a["labels"] == c).sum()), bool) for a in annots]
    tp, fp = np.zeros(len(rows)), np.zeros(len(rows))
    for k, (i, d) in enumerate(rows):
        gts = annots[i]["boxes"][annots[i]["labels"] == c]
        diff = annots[i]["difficult"][annots[i]["labels"] == c]
        ovmax = -math.inf
        if len(gts):
            ious = shapely_iou(d[None, :5], gts)[0]
            jmax, ovmax = int(np.argmax(ious)), ious.max()
        if (ovmax > thr) if strict else (ovmax >= thr):
            if not diff[jmax]:
                if not matched[i][jmax]:
                    tp[k], matched[i][jmax] = 1, True
                else:
                    fp[k] = 1
        else:
            fp[k] = 1
    fp, tp = np.cumsum(fp), np.cumsum(tp)
    rec = tp / npos
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    if use_07:
        return sum((prec[rec >= t].max() if (rec >= t).any() else 0) for t in np.arange(0.0, 1.1, 0.1)) / 11
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])


def _random_dataset(seed, n_images=12, n_classes=3):
    rng = np.random.default_rng(seed)
    dets, annots = [], []
    for i in range(n_images):
        n = rng.integers(0, 8)
        gts = random_boxes(n, canvas=200, seed=seed * 100 + i, min_side=8, max_side=50).numpy()
        labels = rng.integers(0, n_classes, n)
        annots.append(dict(boxes=gts, labels=labels, difficult=rng.random(n) < 0.2))
        per = []
        for c in range(n_classes):
            src = gts[labels == c]
            jitter = src + rng.normal(0, [3, 3, 3, 3, 0.1], src.shape) if len(src) else src
            extra = random_boxes(rng.integers(0, 4), canvas=200, seed=seed * 100 + 50 + i * 7 + c,
                                 min_side=8, max_side=50).numpy()
            boxes = np.concatenate([jitter, jitter[:1], extra])  # a duplicate of the first match
            scores = np.round(rng.random(len(boxes)), 1)  # coarse scores: many ties
            per.append(np.concatenate([boxes, scores[:, None]], 1))
        dets.append(per)
    return dets, annots


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("metric,strict", [("area", False), ("11point", True), ("11point", False)])
def test_matches_devkit_loop(seed, metric, strict):
    dets, annots = _random_dataset(seed)
    thrs = (0.3, 0.5, 0.75)
    res = ev.eval_rbbox_map(dets, annots, thrs, metric, strict)
    for t, thr in enumerate(thrs):
        for c in range(3):
            npos = sum(int(((a["labels"] == c) & ~a["difficult"]).sum()) for a in annots)
            if npos == 0:
                assert math.isnan(res["ap"][t, c])
                continue
            want = _devkit_voc_eval(dets, annots, c, thr, metric == "11point", strict)
            assert res["ap"][t, c] == pytest.approx(want, abs=1e-12)
    assert res["mean"] == pytest.approx(np.mean(res["map"]))


def _box(x, y, s=10.0):
    return [x, y, s, s, 0.0]


def test_hand_computed_cases():
    # one class, two images. GT: two boxes in image 0, one difficult in image 1.
    annots = [dict(boxes=np.array([_box(0, 0), _box(100, 0)]), labels=np.array([0, 0]), difficult=np.array([False, False])),
              dict(boxes=np.array([_box(0, 0)]), labels=np.array([0]), difficult=np.array([True]))]
    dets = [[np.array([_box(0, 0) + [0.9], _box(0, 0) + [0.8], _box(300, 0) + [0.7]])],  # TP, duplicate FP, FP
            [np.array([_box(0, 0) + [0.95]])]]  # on the difficult GT: ignored
    res = ev.eval_rbbox_map(dets, annots, (0.5,), "area")
    # ranked: ignored, TP (rec .5, prec 1), FP, FP -> area AP = 0.5
    assert res["ap"][0, 0] == pytest.approx(0.5)
    res11 = ev.eval_rbbox_map(dets, annots, (0.5,), "11point")
    assert res11["ap"][0, 0] == pytest.approx(6 / 11)  # precision 1 for t = 0 .. 0.5
    # a recall of exactly 3/10 does not reach the devkit's 0.30000000000000004
    assert ev.voc_ap(np.array([0.1, 0.2, 0.3]), np.array([1.0, 1.0, 1.0]), "11point") == pytest.approx(3 / 11)
    # IoU exactly at the threshold: matched with >=, not with the devkit's strict >
    half = [dict(boxes=np.array([[0.0, 0.0, 20.0, 10.0, 0.0]]), labels=np.array([0]), difficult=np.array([False]))]
    det = [[np.array([[5.0, 0.0, 10.0, 10.0, 0.0, 1.0]])]]  # IoU = 0.5
    assert ev.eval_rbbox_map(det, half, (0.5,))["ap"][0, 0] == pytest.approx(1.0)
    assert ev.eval_rbbox_map(det, half, (0.5,), strict=True)["ap"][0, 0] == pytest.approx(0.0)


def test_classes_without_ground_truth_are_nan_and_skipped():
    annots = [dict(boxes=np.array([_box(0, 0)]), labels=np.array([1]), difficult=np.array([False]))]
    dets = [[np.array([_box(0, 0) + [0.9]]), np.array([_box(0, 0) + [0.9]]), np.zeros((0, 6))]]
    res = ev.eval_rbbox_map(dets, annots, (0.5, 0.75))
    assert np.isnan(res["ap"][:, 0]).all() and np.isnan(res["ap"][:, 2]).all()
    assert np.allclose(res["ap"][:, 1], 1.0) and np.allclose(res["map"], 1.0)
    assert res["num_gts"].tolist() == [0, 1, 0] and res["num_dets"].tolist() == [1, 1, 0]


def test_h_map_and_overall():
    # BabelRS Table 2: 3 / (1/63.30 + 1/46.96 + 1/51.32) = 53.02
    assert ev.h_map({"sar": 63.30, "rgb": 46.96, "ir": 51.32}) == pytest.approx(53.02, abs=0.005)
    assert ev.h_map({"sar": 0.0, "rgb": 0.5}) == 0.0
    per = {"sar": {"ship": 0.6, "car": 0.2}, "rgb": {"ship": 0.4, "x": float("nan")}}
    assert ev.overall_map(per) == pytest.approx(0.4)


def test_coco_map_perfect_and_shifted():
    annots = [dict(boxes=np.array([[50.0, 50.0, 40.0, 20.0, 0.0], [150.0, 60.0, 30.0, 30.0, 0.0]]),
                   labels=np.array([0, 1]), difficult=np.array([False, False]))]
    perfect = [[np.array([[50.0, 50.0, 40.0, 20.0, 0.0, 0.9]]), np.array([[150.0, 60.0, 30.0, 30.0, 0.0, 0.8]])]]
    r = ev.coco_bbox_map(perfect, annots)
    assert r["map"] == pytest.approx(1.0) and r["ap50"] == pytest.approx(1.0)
    # shifting class 1 by 10 px: IoU = 20*30 / (2*900 - 600) = 0.5 -> AP50 1, AP@[.5:.95] 0.1
    shifted = [[perfect[0][0], np.array([[160.0, 60.0, 30.0, 30.0, 0.0, 0.8]])]]
    r = ev.coco_bbox_map(shifted, annots)
    assert r["ap"][1] == pytest.approx(0.1) and r["ap50_per_class"][1] == pytest.approx(1.0)
    assert r["map"] == pytest.approx(0.55)


def test_task1_roundtrip_and_cli(tmp_path, capsys):
    import datasets
    import rotated_ops as ro
    import torch
    split = tmp_path / "val"
    (split / "images").mkdir(parents=True)
    from PIL import Image
    boxes = np.array([[40.0, 40.0, 30.0, 12.0, 0.3], [100.0, 80.0, 20.0, 20.0, 0.0]])
    for name in ("A", "B"):
        Image.new("RGB", (128, 128)).save(split / "images" / f"{name}.png")
        datasets.write_dota_txt(split / "labelTxt" / f"{name}.txt", ro.obb2poly(torch.from_numpy(boxes)).numpy(),
                                ["plane", "ship"], [False, False])
    dets = {"A": [np.array([[40.0, 40.0, 30.0, 12.0, 0.3, 0.9]]), np.array([[100.0, 80.0, 20.0, 20.0, 0.0, 0.8]])],
            "B": [np.array([[40.0, 40.0, 30.0, 12.0, 0.3, 0.7]]), np.zeros((0, 6))]}
    ev.write_dota_task1(tmp_path / "dets", dets, ["plane", "ship"])
    back = ev.read_dota_task1(tmp_path / "dets", ["plane", "ship"])
    assert np.allclose(back["A"][0], dets["A"][0], atol=1e-2) and len(back["B"][1]) == 0
    assert ev.main(["--dets", str(tmp_path / "dets"), "--ann", str(split), "--iou", "0.5", "0.75"]) == 0
    out = capsys.readouterr().out
    assert "plane" in out and "100.00" in out and "54.55" in out  # ship: recall 1/2, 11-point AP 6/11
    (tmp_path / "dets" / "Task1_ship.txt").write_text("A 0.5 1 2 3\n")
    assert ev.main(["--dets", str(tmp_path / "dets"), "--ann", str(split)]) == 2
    assert "Task1_ship.txt:1" in capsys.readouterr().err
