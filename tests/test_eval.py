import math

import numpy as np
import pytest

import eval as ev
import tables
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


def _fake_run(root, name, config, metrics=None, losses=(3.0, 2.0, 1.0)):
    """A run folder as train.py leaves it: config.json, log.jsonl (NaN for a diverged step), metrics.json."""
    import json
    run = root / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(config))
    (run / "log.jsonl").write_text("".join(json.dumps(dict(step=i + 1, loss=l, grad_norm=1.0)) + "\n"
                                           for i, l in enumerate(losses)))
    if metrics is not None:
        (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def _babelrs_metrics(scale):
    sources = {m: dict(ap50=scale * a, map=scale * b) for m, a, b in (("sar", 0.8, 0.5), ("rgb", 0.6, 0.3), ("ir", 0.7, 0.4))}
    return dict(sources=sources, overall_ap50=scale * 0.65, overall_map=scale * 0.35,
                h_map=ev.h_map({m: r["map"] for m, r in sources.items()}))


def test_tables_label_rows_from_their_pre_training(tmp_path):
    csia = _fake_run(tmp_path, "csia-sum", dict(merge="sum", steps=400, max_steps=0, tau=120.0))
    tuned = _fake_run(tmp_path, "ft-a", dict(init=str(csia), amp="off"), _babelrs_metrics(1.0))
    scratch = _fake_run(tmp_path, "ft-b", dict(init="", amp="fp16"), None, losses=(3.0, float("nan")))
    t5 = tables.format_table_runs("babelrs-table5", [tuned])
    assert "| (b) element-wise sum | 35.00 | " in t5["markdown"]
    assert f"| {100 * 3 / (1 / 0.5 + 1 / 0.3 + 1 / 0.4):.2f} |" in t5["markdown"]  # H-mAP by hand
    assert "| (d) LVSA + shared projector | 51.57 | 53.02 |" in t5["markdown"]  # the paper's row below ours
    t4 = tables.format_table_runs("babelrs-table4", [tuned, scratch])
    assert "| random init (diverged) | NaN | NaN | NaN | 2 |" in t4["markdown"]  # exploded at step 2
    t3 = tables.format_table_runs("babelrs-table3", [tuned])["markdown"]
    assert "| CSIA, (b) element-wise sum | 65.00 / 35.00 | 80.00 / 50.00 | 60.00 / 30.00 | 70.00 / 40.00 |" in t3
    f6 = tables.format_table_runs("babelrs-fig6", [tuned])["csv"].splitlines()
    assert f6[1].startswith("ours,CSIA, (b) element-wise sum,0,400,120,35,")  # seed 0
    with pytest.raises(ev.datasets.DatasetError, match="no config.json"):
        tables.format_table_runs("babelrs-table5", [tmp_path / "nowhere"])


def test_mutdet_table_rows(tmp_path):
    pre = {"DETReg": dict(enhance=False, siamese=True, align=True, embed_loss="l1", pseudo_classes=1, dn_align=False),
           "DETReg + DN alignment": dict(enhance=False, siamese=True, align=True, embed_loss="l1", pseudo_classes=1),
           "MutDet": dict(enhance=True, siamese=True, align=True, embed_loss="infonce", pseudo_classes=0),
           "MutDet (no siamese)": dict(enhance=True, siamese=False, align=True, embed_loss="infonce", pseudo_classes=0)}
    runs = [_fake_run(tmp_path, "ft-none", dict(init=""), dict(sources=dict(rgb=dict(
        classes=["ship", "plane"], voc07_ap50=0.5, voc07_ap75=0.2, per_class=dict(voc07_ap50=dict(ship=0.4, plane=0.6))))))]
    for i, (label, cfg) in enumerate(pre.items()):
        run = _fake_run(tmp_path, f"pre{i}", cfg)
        runs.append(_fake_run(tmp_path, f"ft{i}", dict(init=str(run)), dict(sources=dict(rgb=dict(
            classes=["ship", "plane"], voc07_ap50=0.6 + i / 10, voc07_ap75=0.3, per_class=dict(voc07_ap50=dict(ship=0.5, plane=None)))))))
    md = tables.format_table_runs("mutdet-table2", runs)["markdown"]
    assert "| | ship | plane | AP50 | AP75 |" in md and "| random init | 40.00 | 60.00 | 50.00 | 20.00 |" in md
    assert "| DETReg | 50.00 | NaN | 60.00 | 30.00 |" in md and "| MutDet | 50.00 | NaN | 80.00 | 30.00 |" in md
    assert "| DETReg + DN alignment | 50.00 | NaN | 70.00 | 30.00 |" in md  # runs from before the switch
    assert "| MutDet (no siamese) |" in md and "| MutDet | 75.1 | 60.5 |" not in md and "70.70 | 51.20 |" in md


def test_plots_mark_diverged_runs(tmp_path):
    runs = [_fake_run(tmp_path, "ok", dict(init="", amp="fp16")),
            _fake_run(tmp_path, "boom", dict(init="", amp="fp16"), losses=(3.0, 2.5, float("nan")))]
    tables.plot_curves(runs, tmp_path / "c.png", ("loss", "grad_norm"), window=2)
    tables.plot_survival(runs, tmp_path / "s.png")
    facts = [tables.run_facts(r) for r in runs]
    assert [f["diverged"] for f in facts] == [False, True] and [f["steps"] for f in facts] == [3, 3]
    mut = _fake_run(tmp_path, "pre", dict(enhance=True))
    (mut / "log.jsonl").write_text("".join(_jsonl(dict(step=i, loss=1.0, p_loss_cls=1.0 / i, loss_cls=2.0 / i,
                                                        p_loss_embed=0.5, p_enc_loss_embed=0.4)) for i in range(1, 6)))
    assert [p.name for p in tables.plot_runs([mut], tmp_path / "figs")] == ["mutdet_terms_pre.png"]
    assert all((tmp_path / n).stat().st_size > 1000 for n in ("c.png", "s.png", "figs/mutdet_terms_pre.png"))


def _jsonl(record):
    import json
    return json.dumps(record) + "\n"


def test_fig6_picks_the_two_sweeps(tmp_path):
    # steps sweep at τ 120 (100, 200, 400) and τ sweep at 400 steps (0, 120); a Tab. 5 row and an
    # unscored run stay out
    grid = [(100, 120.0, 0.2), (200, 120.0, 0.4), (400, 120.0, 0.6), (400, 0.0, 0.5)]
    runs = []
    for steps, tau, scale in grid:
        csia = _fake_run(tmp_path, f"csia-{steps}-{tau:g}", dict(merge="lvsa", steps=steps, max_steps=0, tau=tau))
        runs.append(_fake_run(tmp_path, f"ft-{steps}-{tau:g}", dict(init=str(csia)), _babelrs_metrics(scale)))
    sum_ = _fake_run(tmp_path, "csia-sum", dict(merge="sum", steps=800, max_steps=0, tau=120.0))
    runs.append(_fake_run(tmp_path, "ft-sum", dict(init=str(sum_)), _babelrs_metrics(1.0)))
    unscored = _fake_run(tmp_path, "csia-900", dict(merge="lvsa", steps=900, max_steps=0, tau=120.0))
    runs.append(_fake_run(tmp_path, "ft-900", dict(init=str(unscored))))
    series = tables.fig6_series([tables.run_facts(r) for r in runs])
    h = {s: 100 * _babelrs_metrics(s)["h_map"] for _, _, s in grid}
    assert series["steps"][0] == 120.0 and [p[0] for p in series["steps"][1]] == [100, 200, 400]
    assert series["steps"][1][0][1:] == pytest.approx((100 * 0.2 * 0.35, h[0.2]))
    assert series["tau"][0] == 400 and [p[0] for p in series["tau"][1]] == [0.0, 120.0]
    assert series["tau"][1][0][2] == pytest.approx(h[0.5])
    assert tables.fig6_series([tables.run_facts(runs[0])]) == {}  # one point is no sweep
    written = tables.plot_runs(runs[:4], tmp_path / "figs")
    assert tmp_path / "figs" / "fig6.png" in written and (tmp_path / "figs" / "fig6.png").stat().st_size > 1000


def test_newcomer_errors_and_labels(tmp_path, capsys):
    # --dets: a missing folder, a labelTxt folder given directly, labels without their images
    ann = tmp_path / "split"
    datasets_mod = ev.datasets
    datasets_mod.write_dota_txt(ann / "labelTxt" / "a.txt", np.array([[10, 10, 50, 10, 50, 30, 10, 30.0]]), ["ship"])
    assert ev.main(["--dets", str(tmp_path / "nowhere"), "--ann", str(ann)]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "dets").mkdir()
    (tmp_path / "dets" / "Task1_ship.txt").write_text("a 0.9 10 10 50 10 50 30 10 30\n")
    assert ev.main(["--dets", str(tmp_path / "dets"), "--ann", str(ann / "labelTxt")]) == 0  # no images needed
    out = capsys.readouterr().out
    assert "AP in %" in out and "100.00" in out
    (tmp_path / "empty").mkdir()
    assert ev.main(["--dets", str(tmp_path / "empty"), "--ann", str(ann)]) == 2  # no Task1 file of any class
    assert "no Task1_<class>.txt" in capsys.readouterr().err
    # --run on a csia run says what --run takes
    csia = _fake_run(tmp_path, "csia", dict(stage="csia", merge="lvsa", steps=10, max_steps=0, tau=1.0))
    assert ev.main(["--run", str(csia)]) == 2
    err = capsys.readouterr().err
    assert "a csia run" in err and "--stage finetune --init" in err and len(err.strip().splitlines()) == 1
    # --table: a pre-training run is refused by name, one run is "1 run", a ViT table names a ResNet row
    pre = _fake_run(tmp_path, "pre", dict(stage="mutdet", enhance=True))
    assert tables.main(["--table", "mutdet-table2", str(pre)]) == 2
    assert "a mutdet run; tables take fine-tuning runs" in capsys.readouterr().err
    r18 = _fake_run(tmp_path, "r18", dict(init="", backbone="resnet18"), _babelrs_metrics(1.0))
    assert tables.main(["--table", "babelrs-table3", str(r18), "--out", str(tmp_path / "t3.md")]) == 0
    md = (tmp_path / "t3.md").read_text()
    assert "(1 run; AP in %)" in md and "| random init, ResNet-18 |" in md and not (tmp_path / "t3.md.md").exists()
    # Fig. 7 only for AMP runs; a run cut by --max-steps is not drawn as a survivor
    amp = _fake_run(tmp_path, "amp", dict(init="", amp="fp16", max_steps=3))
    assert (tmp_path / "figs" / "loss_grad_norm.png") in tables.plot_runs([amp], tmp_path / "figs")
    assert tables.run_facts(amp)["max_steps"] == 3


def test_paired_verdicts_by_hand():
    from scipy import stats
    # differences 10, 9, 13: mean 10.67, SD 2.08, SE 1.20, t = 8.87 with 2 df: p = 0.0125 -> holds
    v = tables.paired_verdict({0: 40.0, 1: 42.0, 2: 44.0}, {0: 30.0, 1: 33.0, 2: 31.0})
    assert v["verdict"] == "holds" and v["n"] == 3 and abs(v["mean"] - 32 / 3) < 1e-9 and v["agree"] == 3
    assert abs(v["se"] - np.std([10, 9, 13], ddof=1) / np.sqrt(3)) < 1e-9
    assert v["p"] == pytest.approx(stats.ttest_rel([40, 42, 44], [30, 33, 31]).pvalue, rel=1e-9)
    assert v["p"] == pytest.approx(0.01248, abs=5e-5)
    assert v["ci"] == pytest.approx((32 / 3 - 4.302653 * v["se"], 32 / 3 + 4.302653 * v["se"]), rel=1e-6)  # t_0.975,2
    assert v["mde"] == pytest.approx((4.302653 + 1.060660) * v["se"], rel=1e-5)  # + t_0.8,2
    assert tables.paired_verdict({0: 30.0, 1: 33.0, 2: 31.0}, {0: 40.0, 1: 42.0, 2: 44.0})["verdict"] == "reversed"
    # differences +2, -1, +1: t = 0.76, p = 0.53
    w = tables.paired_verdict({0: 2.0, 1: 0.0, 2: 1.0}, {0: 0.0, 1: 1.0, 2: 0.0})
    assert w["verdict"] == "not separable" and w["agree"] == 2
    # the old 2-SE rule's false alarm: differences 3, 1, 2 give mean 2 > 2 SE (1.15) but p = 0.074
    assert tables.paired_verdict({0: 3.0, 1: 1.0, 2: 2.0}, {0: 0.0, 1: 0.0, 2: 0.0})["verdict"] == "not separable"
    # pairs are by seed: seed 3 of one row alone does not count; one common seed separates nothing
    assert tables.paired_verdict({0: 5.0, 3: 9.0}, {0: 1.0})["verdict"] == "not separable (one seed)"


def test_holm_correction_by_hand():
    """p = 0.01, 0.04, 0.03 over one table: Holm's adjusted p are 3 x 0.01 = 0.03, then max(0.03,
    2 x 0.03) = 0.06 and max(0.06, 1 x 0.04) = 0.06: only the first ordering stands."""
    vs = [dict(p=p, mean=1.0, se=1.0) for p in (0.01, 0.04, 0.03)]
    tables.holm(vs)
    assert [v["p_adjusted"] for v in vs] == pytest.approx([0.03, 0.06, 0.06])
    assert [v["verdict"] for v in vs] == ["holds", "not separable", "not separable"]


def test_tables_over_seeds(tmp_path):
    def mutdet_metrics(ap50, ap75):
        return dict(sources=dict(rgb=dict(classes=["ship"], voc07_ap50=ap50, voc07_ap75=ap75,
                                          per_class=dict(voc07_ap50=dict(ship=ap50)))))
    detreg = _fake_run(tmp_path, "pre-detreg", dict(enhance=False, siamese=True, align=True, embed_loss="l1",
                                                    pseudo_classes=1, dn_align=False))
    mut = _fake_run(tmp_path, "pre-mutdet", dict(enhance=True, siamese=True, align=True, embed_loss="infonce",
                                                 pseudo_classes=0))
    runs = []
    for seed, (none, d, m) in enumerate(((0.40, 0.50, 0.45), (0.42, 0.53, 0.44), (0.41, 0.55, 0.47))):
        runs += [_fake_run(tmp_path, f"ft-none-seed{seed}", dict(init="", resnet="fractal", seed=seed),
                           mutdet_metrics(none, 0.1)),
                 _fake_run(tmp_path, f"ft-detreg-seed{seed}", dict(init=str(detreg), seed=seed), mutdet_metrics(d, 0.1)),
                 _fake_run(tmp_path, f"ft-mutdet-seed{seed}", dict(init=str(mut), seed=seed), mutdet_metrics(m, 0.1))]
    runs.append(_fake_run(tmp_path, "ft-mutdet-seed3", dict(init=str(mut), seed=3)))  # not finished
    table = tables.format_table_runs("mutdet-table2", runs)
    md = table["markdown"]
    assert "mean ± std over 3 seeds" in md
    assert "| FractalDB stand-in | 41.00 ± 1.00 | 41.00 ± 1.00 | 10.00 ± 0.00 |" in md  # 40, 42, 41
    assert "| MutDet (1 seed not finished) | 45.33 ± 1.53 |" in md
    # paired t-tests, 2 df: MutDet - DETReg -5, -9, -8 (p = 0.026); DETReg - none 10, 11, 14 (p = 0.0104);
    # MutDet - none 5, 2, 6 (mean 4.33, SE 1.20, p = 0.069); AP75 all equal (p = 1). Holm over the 6:
    # 6 x 0.0104 = 0.063 > 0.05 and 5 x 0.026 = 0.129, so none stands, however large the first two look
    assert "Holm-corrected at 5 %" in md
    assert "- DETReg > FractalDB stand-in (AP50): **not separable** (p = 0.0627, Holm), difference +11.67" in md
    assert "- MutDet > DETReg (AP50): **not separable** (p = 0.129, Holm), difference -7.33, 95 % CI [-12.50, -2.16]" in md
    assert "- MutDet > FractalDB stand-in (AP50): **not separable**" in md and "3 of 3 seeds agree in sign" in md
    assert "- MutDet > DETReg (AP75): **not separable**" in md
    assert [v["verdict"] for v in table["verdicts"]][:3] == ["not separable"] * 3
    # one ordering alone is not corrected: DETReg > none holds at p = 0.0104
    assert tables.paired_verdict(*[{k: v[1] for k, v in table["groups"][r]["seeds"].items()}
                                   for r in ("ft-detreg", "ft-none")])["verdict"] == "holds"
    csv = table["csv"].splitlines()
    assert csv[0] == "source,row,seed,ship,AP50,AP75" and len(csv) == 1 + 9  # every finished seed, one line each
    assert "ours,MutDet,2,47,47,10" in csv
    tables.plot_table_bars("mutdet-table2", table, tmp_path / "bars.png")
    assert (tmp_path / "bars.png").stat().st_size > 5000


def test_rotated_coco_ap_by_hand_and_against_pycocotools():
    """Rotated COCO-style AP: a case known by hand, and pycocotools' COCOeval itself on axis-aligned
    boxes (where rotated IoU is box IoU), difficult ground truth as crowd regions included."""
    # one class, two ground truths; detection 1 exact, detection 2 at IoU 0.72 with the second
    gt = np.array([[20.0, 20, 10, 10, 0], [60, 60, 10, 10, 0]])
    shift = 10 - 144 / 17.2  # IoU (10 - s) * 10 / (200 - (10 - s) * 10) = 0.72
    dets = [[np.array([[20.0, 20, 10, 10, 0, 0.9], [60 + shift, 60, 10, 10, 0, 0.8]])]]
    r = ev.rotated_coco_ap(dets, [dict(boxes=gt, labels=np.array([0, 0]), difficult=np.zeros(2, bool))])
    # IoU 0.5..0.70: both found, AP 1; 0.75..0.95: recall stops at 1/2, so 51 of 101 recall points have precision 1
    assert r["ap"][:5, 0] == pytest.approx(1.0) and r["ap"][5:, 0] == pytest.approx(51 / 101)
    assert r["map"] == pytest.approx((5 + 5 * 51 / 101) / 10) and r["ap50"] == 1.0
    # pycocotools on random axis-aligned scenes of 3 classes
    g = np.random.default_rng(0)
    annots, dets = [], []
    for _ in range(6):
        n = g.integers(1, 6)
        boxes = np.c_[g.uniform(20, 200, (n, 2)), g.uniform(8, 40, (n, 2)), np.zeros(n)]
        labels = g.integers(0, 3, n)
        annots.append(dict(boxes=boxes, labels=labels, difficult=g.random(n) < 0.2))
        per = []
        for c in range(3):
            base = boxes[labels == c]
            near = base + np.c_[g.normal(0, 3, (len(base), 4)), np.zeros(len(base))]
            noise = np.c_[g.uniform(20, 200, (3, 2)), g.uniform(8, 40, (3, 2)), np.zeros(3)]
            d = np.r_[near, noise]
            per.append(np.c_[d, g.random(len(d))])
        dets.append(per)
    ours, ref = ev.rotated_coco_ap(dets, annots, 3), ev.coco_bbox_map(dets, annots, 3)
    assert ours["map"] == pytest.approx(ref["map"], abs=1e-9) and ours["ap75"] == pytest.approx(ref["ap75"], abs=1e-9)
    assert np.allclose(ours["ap"].mean(0), ref["ap"], atol=1e-9, equal_nan=True)


def test_confusion_matrix_by_hand():
    """Two ground truths (classes 0, 1) and three detections above the score: a hit, the class-1 object
    detected as class 0 (a confusion), and a false alarm; a difficult ground truth counts nowhere."""
    gt = np.array([[20.0, 20, 10, 10, 0], [60, 60, 10, 10, 0], [100, 100, 10, 10, 0]])
    annots = [dict(boxes=gt, labels=np.array([0, 1, 1]), difficult=np.array([False, False, True]))]
    dets = [[np.array([[20.0, 20, 10, 10, 0, 0.9], [60, 60, 10, 10, 0, 0.8]]),  # class 0: a hit, a confusion
             np.array([[150.0, 150, 10, 10, 0, 0.7], [40, 40, 10, 10, 0, 0.1]])]]  # class 1: a false alarm, one too weak
    m = ev.confusion_matrix(dets, annots, 2, 0.5, 0.3)
    assert m.tolist() == [[1, 0, 0], [1, 0, 0], [0, 1, 0]]  # rows gt 0, gt 1, background; columns det 0, det 1, bg
    r = ev.eval_rbbox_map(dets, annots, (0.5,), curves=True)
    recall, precision = r["pr"][0, 0]
    assert recall.tolist() == [1.0, 1.0] and precision.tolist() == [1.0, 0.5]


def test_the_pilot_picks_the_shortest_length_that_doubling_no_longer_moves(tmp_path):
    """Tiny protocol v3's rule: the shortest L where doubling moves the primary metric by less than its
    seed SD at L; a row still rising at its longest length is labelled so."""
    runs = []
    for L, base in ((144, 10.0), (288, 20.0), (576, 20.5), (1152, 20.6)):  # SD 1 at each length
        for seed in range(3):
            m = dict(overall_map=(base + seed) / 100, h_map=(base + seed) / 200)
            runs.append(_fake_run(tmp_path, f"pilot-babelrs-{L}-seed{seed}", dict(stage="finetune", seed=seed), m))
    for L, base in ((200, 10.0), (400, 20.0), (800, 30.0), (1600, 40.0)):
        for seed in range(3):
            m = dict(sources=dict(rgb=dict(voc07_ap50=(base + seed) / 100, voc07_ap75=base / 200)))
            runs.append(_fake_run(tmp_path, f"pilot-mutdet-{L}-seed{seed}", dict(stage="finetune", seed=seed), m))
    md, csv = tables.format_pilot(runs)
    assert "| 144 | 3 | 11.00 ± 1.00 | 5.50 ± 0.50 | +10.00 (not less than the SD 1.00) |" in md
    assert "| 288 | 3 | 21.00 ± 1.00 |" in md and "+0.50 (less than the SD 1.00)" in md
    assert "Length for the tables: **288** steps" in md
    assert "Length for the tables: **1600** steps, still rising" in md
    assert len(csv.strip().splitlines()) == 1 + 24 and "babelrs,576,2,22.5000,11.2500" in csv


def test_the_10pct_table_keeps_its_per_class_ap_in_the_csv(tmp_path):
    """The 10 % table shows data %, AP50 and AP75 as the paper does; its CSV also carries the AP50 of
    every class of every seed, so that a degenerate row (one class carrying the mean) can be seen."""
    def metrics(ship, car):
        return dict(sources=dict(rgb=dict(classes=["ship", "car"], voc07_ap50=(ship + car) / 2, voc07_ap75=0.1,
                                          per_class=dict(voc07_ap50=dict(ship=ship, car=car)))))
    runs = [_fake_run(tmp_path, f"ft-none-data0.1-seed{s}", dict(init="", resnet="fractal", seed=s, data_fraction=0.1),
                      metrics(0.8, c)) for s, c in enumerate((0.0, 0.1))]
    table = tables.format_table_runs("mutdet-10pct", runs)
    csv = table["csv"].splitlines()
    assert csv[0] == "source,row,seed,data %,AP50,AP75,AP50 ship,AP50 car"
    assert "ours,FractalDB stand-in,0,10,40,10,80,0" in csv and "ours,FractalDB stand-in,1,10,45,10,80,10" in csv
    assert all(line.count(",") == csv[0].count(",") for line in csv)  # the paper's rows padded to the same columns
    head = next(line for line in table["markdown"].splitlines() if line.startswith("| "))
    assert "ship" not in head and "AP50" in head and "AP75" in head


def test_the_checks_keep_every_seed_in_a_csv(tmp_path):
    """`--sweep tiny-checks` writes, beside its verdicts, every seed's value of every column of both
    checks (the ViT rows with Tab. 3's columns, the ResNet-18 rows with Tab. 2's)."""
    def mutdet(ap50):
        return dict(sources=dict(rgb=dict(classes=["ship"], voc07_ap50=ap50, voc07_ap75=0.1,
                                          per_class=dict(voc07_ap50=dict(ship=ap50)))))
    runs = []
    for seed in range(2):
        runs += [_fake_run(tmp_path, f"ft-generic-off-seed{seed}", dict(init="fractal", seed=seed, amp="off"),
                           _babelrs_metrics(1.0 + seed / 10)),
                 _fake_run(tmp_path, f"ft-random-off-seed{seed}", dict(init="", seed=seed, amp="off"), _babelrs_metrics(0.5)),
                 _fake_run(tmp_path, f"ft-none-data1.0-seed{seed}", dict(init="", resnet="fractal", seed=seed), mutdet(0.4)),
                 _fake_run(tmp_path, f"ft-random-data1.0-seed{seed}", dict(init="", resnet="", seed=seed), mutdet(0.3))]
    text, csv = tables.format_tiny_checks(runs)
    lines = csv.splitlines()
    assert lines[0] == "check,row,seed,column,value"
    assert len(lines) == 1 + 2 * 2 * 9 + 2 * 2 * 3  # ViT: 9 columns; ResNet-18: ship, AP50, AP75
    assert "vit,ft-generic-off,1,Overall AP50,71.5" in lines and "resnet18,ft-random-data1.0,0,AP50,30" in lines
    assert "ViT: stand-in > random init (H-mAP)" in text
    # the ViT gate alone (`--rows ft-generic-off ft-random-off`, before the BabelRS tables): no ResNet-18 rows yet
    text, csv = tables.format_tiny_checks([r for r in runs if "-off-" in r.name])
    assert len(csv.splitlines()) == 1 + 2 * 2 * 9 and "ViT: stand-in > random init (H-mAP)" in text
    assert "ResNet-18: stand-in" not in text


def test_the_tables_wait_for_the_pilot_and_take_its_lengths(tmp_path, monkeypatch):
    """Protocol v3: a tiny table's fine-tuning rows run the pilot's length as the pilot ran it; without
    the committed pilot (or while it is undecided) a tiny table refuses in one line naming the command."""
    extra = dict(csia=[], finetune=[], sam=[], mutdet=[], weights=[])
    t3 = dict(tables.sweep_runs("babelrs-table3", "tiny", extra))
    pilot = dict(tables.sweep_runs("tiny-pilot", "tiny", extra))
    assert t3["ft-generic-off"][:-2] == ["--stage", "finetune", "--preset", "babelrs-tiny", "--ckpt_every", "48",
                                         "--image_size", "192", "--synth_root", "data/synthsoi-v3"] \
        + tables.pilot_schedule("babelrs", 144) and set(pilot["pilot-babelrs-144"]) <= set(t3["ft-generic-off"])
    t2 = dict(tables.sweep_runs("mutdet-table2", "tiny", extra))
    assert t2["ft-none-data1.0"][-6:-2] == ["--lr_steps", "120.6", "--max-steps", "1600"]  # still rising: the longest
    assert "data/synthsoi-v3" in t2["sam"] and "data/synthsoi-v3" in t2["pre-mutdet"]
    ten = dict(tables.sweep_runs("mutdet-10pct", "tiny", extra))["ft-none-data0.1"]
    assert ten[ten.index("--epochs"):ten.index("--epochs") + 6] == ["--epochs", "1600", "--lr_steps", "1440",
                                                                     "--max-steps", "1600"]
    # the rule itself: undecided while a doubling lacks two paired seeds
    assert tables.choose_length({144: {0: 1.0, 1: 2.0}, 288: {0: 9.0}}, (144, 288)) == (None, "not decided")
    assert tables.choose_length({144: {0: 1.0, 1: 2.0}, 288: {0: 1.5, 1: 2.1}}, (144, 288)) == (144, "stable")
    monkeypatch.setattr(tables, "TINY_V3_PILOT", str(tmp_path / "none.csv"))
    with pytest.raises(SystemExit, match="python tables.py --sweep tiny-pilot"):
        tables.sweep_runs("babelrs-table3", "tiny", extra)
    (tmp_path / "none.csv").write_text("row,steps,seed,primary,second\nbabelrs,144,0,1.0,0\n")
    with pytest.raises(SystemExit, match="has not decided its length yet"):
        tables.pilot_length("babelrs")


def test_the_babelrs_tables_wait_for_the_vit_gate_and_refuse_a_failed_one(tmp_path, monkeypatch, capsys):
    """Protocol v3: a BabelRS tiny table runs only once the checks' committed CSV shows the stand-in beating
    random init on H-mAP over 5 seeds (a paired t-test); missing, short or failed, the sweep refuses in one
    line, before generating data; the MutDet tables and the checks themselves do not wait."""
    path = tmp_path / "tiny-checks.csv"
    monkeypatch.setattr(tables, "TINY_V3_CHECKS", str(path))

    def checks(generic, random):
        lines = ["check,row,seed,column,value"] + [f"vit,{row},{k},{column},{v + (column == 'Overall AP50')}"
                                                   for row, values in (("ft-generic-off", generic), ("ft-random-off", random))
                                                   for k, v in enumerate(values) for column in ("H-mAP", "Overall AP50")]
        path.write_text("\n".join(lines) + "\n")
    sweep = ["--sweep", "babelrs-table5", "--runs", str(tmp_path / "runs")]
    with pytest.raises(SystemExit, match="wait for the ViT gate's part 3.*--sweep tiny-checks --rows ft-generic-off"):
        tables.main(sweep)
    checks([20, 21, 19, 22, 20], [10, 11, 9])  # 3 paired seeds of 5
    with pytest.raises(SystemExit, match="wait for the ViT gate"):
        tables.vit_gate()
    checks([20, 21, 19, 22, 20], [20.5, 20.1, 19.8, 21.0, 21.2])  # +0.06 H-mAP: not separable
    with pytest.raises(SystemExit, match=r"failed its gate .*not separable.*so the BabelRS tables are not run"):
        tables.main(sweep)
    assert not (tmp_path / "runs").exists() and not list(tmp_path.glob("data*"))
    checks([20, 21, 19, 22, 20], [10, 12, 9, 11, 10.5])
    tables.vit_gate()  # holds: no refusal
    path.unlink()
    assert tables.main(sweep + ["--dry-run", "--seeds", "1"]) == 0  # what it would run is still shown
    capsys.readouterr()

    class Generating(Exception):
        pass

    def generate(*args, **kwargs):
        raise Generating
    monkeypatch.setattr(tables.datasets, "make_synthetic", generate)
    for other in ("mutdet-table2", "tiny-checks"):  # past the gate's place without it
        with pytest.raises(Generating):
            tables.main(["--sweep", other, "--runs", str(tmp_path / "runs")])
