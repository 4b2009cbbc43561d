"""Metrics of both papers, DOTA result files, and a command line.

- `eval_rbbox_map`: rotated VOC AP (area or 11-point) at any list of IoU thresholds, with the DOTA
  devkit's greedy matching and difficult handling (MutDet: VOC07 11-point AP50 / AP75; BabelRS:
  area AP at 0.50:0.05:0.95 for DOTA and DroneVehicle).
- `coco_bbox_map`: COCO box AP through pycocotools (BabelRS's SAR metric).
- `h_map`, `overall_map`: BabelRS Sec. 3.4: the harmonic mean of the per-modality mAPs and the mean
  over the union of all modalities' categories.
- DOTA Task1 result files (`Task1_<class>.txt`), written and read.

- `evaluate_run`: scores a train.py run folder on the test split of each of its sources.

- `format_table_runs`: the papers' tables (BabelRS Tab. 2-5, Fig. 6; MutDet Tab. 2, 10 % data) over
  run folders, beside the published numbers (`PAPER`); `plot_runs`: the figures (BabelRS Fig. 2, 4,
  7; MutDet's loss terms; detections drawn on an image).

Command line: `python eval.py --run DIR` scores a run and writes `DIR/metrics.json`;
`python eval.py --table NAME RUN... [--out FILE]` prints a table as Markdown (and writes FILE.md,
FILE.csv); `python eval.py --plot RUN... [--out DIR] [--image PATH]` draws the figures;
`python eval.py --dets DIR --ann DIR [--metric 11point|area] [--iou 0.5 0.75]` scores DOTA Task1
files against a DOTA (or DIOR-R) annotation folder.
"""
import argparse
import contextlib
import io
import re
import sys
from pathlib import Path

import numpy as np
import torch

import datasets
import rotated_ops as ro

COCO_IOUS = tuple(np.round(np.arange(0.5, 0.96, 0.05), 2))  # 0.50:0.05:0.95


# ---------------------------------------------------------------------------------------------
# Rotated VOC AP
# ---------------------------------------------------------------------------------------------

def voc_ap(recall: np.ndarray, precision: np.ndarray, metric: str = "area") -> float:
    """AP from a precision/recall curve, as the DOTA devkit's `voc_ap`.

    "area": VOC2010+ all-point interpolation (precision envelope, summed over recall steps).
    "11point": VOC07, the mean of the best precision at recall >= t for t = 0, 0.1, ..., 1; the
    thresholds come from `np.arange(0., 1.1, 0.1)` as in the devkit and mmrotate, so 0.3, 0.6 and
    0.7 are a hair above their decimal values (a recall of exactly 3/10 does not reach "0.3").
    """
    if metric == "11point":
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            p = precision[recall >= t]
            ap += (p.max() if p.size else 0.0) / 11.0
        return float(ap)
    if metric != "area":
        raise ValueError(f"metric must be 'area' or '11point', got {metric!r}")
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope
    i = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def _best_gt_per_detection(det_boxes, det_keys, gt_boxes, gt_keys):
    """For each detection, the highest-IoU ground truth with the same key (image, class).

    Returns (ovmax (D,), argmax (D,) index into the ground truths, -1 where there is none).
    Ties go to the first ground truth in input order, as `np.argmax` in the devkit.
    """
    D = len(det_keys)
    ovmax, best = np.zeros(D), np.full(D, -1, dtype=np.int64)
    if D == 0 or len(gt_keys) == 0:
        return ovmax, best
    order = np.argsort(gt_keys, kind="stable")
    sorted_keys = gt_keys[order]
    start = np.searchsorted(sorted_keys, det_keys, side="left")
    count = np.searchsorted(sorted_keys, det_keys, side="right") - start  # (D,)
    det_idx = np.repeat(np.arange(D), count)  # all (detection, same-key ground truth) pairs
    offsets = np.arange(len(det_idx)) - np.repeat(np.cumsum(count) - count, count)
    gt_idx = order[np.repeat(start, count) + offsets]
    if len(det_idx) == 0:
        return ovmax, best
    iou = ro.box_iou_rotated(torch.from_numpy(det_boxes[det_idx]), torch.from_numpy(gt_boxes[gt_idx]),
                             aligned=True).numpy()  # (pairs,); disjoint pairs are skipped inside
    # per detection: the largest IoU, first ground truth (in input order) on ties
    rank_in_input = gt_idx.astype(np.float64)
    o = np.lexsort((rank_in_input, -iou, det_idx))  # by detection, then IoU desc, then input order
    first = np.ones(len(o), dtype=bool)
    first[1:] = det_idx[o][1:] != det_idx[o][:-1]
    ovmax[det_idx[o][first]] = iou[o][first]
    best[det_idx[o][first]] = gt_idx[o][first]
    return ovmax, best


def eval_rbbox_map(dets, annots, iou_thrs=(0.5,), metric="area", strict=False) -> dict:
    """Rotated VOC mAP with the DOTA devkit's greedy matching.

    Args:
        dets: dets[i][c] is a (K, 6) array [cx, cy, w, h, θ, score] for image i and class c.
        annots: annots[i] = dict(boxes (N, 5), labels (N,) int, difficult (N,) bool).
        iou_thrs: IoU thresholds (T of them).
        metric: "area" (VOC2010+) or "11point" (VOC07, the DOTA Task1 and MutDet metric).
        strict: match when IoU > thr (the devkit's `dota_evaluation_task1.py`) instead of the
            default IoU >= thr (mmrotate's `eval_rbbox_map`).
    Returns:
        dict(ap (T, C) with NaN for classes without a non-difficult ground truth, map (T,) the mean
        over the other classes, mean = the mean of map over thresholds, num_gts (C,), num_dets (C,)).

    Matching, per class: detections of all images by decreasing score (stable: ties keep image
    order, then input order); each takes its highest-IoU ground truth in its image (matched or not,
    difficult or not); above the threshold it is a true positive if that ground truth is free and
    not difficult, ignored (neither TP nor FP) if it is difficult, and a false positive if it is
    already taken; below the threshold it is a false positive. Since the chosen ground truth does
    not depend on earlier matches, "free" means "no earlier detection chose it above the
    threshold", which lets all thresholds and images be scored at once.
    """
    if len(dets) != len(annots):
        raise ValueError(f"dets ({len(dets)} images) and annots ({len(annots)} images) differ in length")
    num_classes = max([len(d) for d in dets] + [0])
    for a in annots:
        if len(a["labels"]):
            num_classes = max(num_classes, int(np.max(a["labels"])) + 1)
    thrs = np.asarray(iou_thrs, dtype=np.float64)
    T = len(thrs)
    ap = np.full((T, num_classes), np.nan)
    num_gts, num_dets = np.zeros(num_classes, np.int64), np.zeros(num_classes, np.int64)

    # flatten ground truths and detections with their (image, class) keys
    gt_boxes, gt_keys, gt_diff = [], [], []
    for i, a in enumerate(annots):
        boxes = np.asarray(a["boxes"], np.float64).reshape(-1, 5)
        labels = np.asarray(a["labels"], np.int64).reshape(-1)
        diff = np.asarray(a.get("difficult", np.zeros(len(labels), bool)), bool).reshape(-1)
        gt_boxes.append(boxes)
        gt_keys.append(i * num_classes + labels)
        gt_diff.append(diff)
    gt_boxes = np.concatenate(gt_boxes) if gt_boxes else np.zeros((0, 5))
    gt_keys = np.concatenate(gt_keys) if gt_keys else np.zeros(0, np.int64)
    gt_diff = np.concatenate(gt_diff) if gt_diff else np.zeros(0, bool)
    d_boxes, d_scores, d_keys, d_class = [], [], [], []
    for i, per_class in enumerate(dets):
        for c, d in enumerate(per_class):
            d = np.asarray(d, np.float64).reshape(-1, 6)
            d_boxes.append(d[:, :5])
            d_scores.append(d[:, 5])
            d_keys.append(np.full(len(d), i * num_classes + c, np.int64))
            d_class.append(np.full(len(d), c, np.int64))
    d_boxes = np.concatenate(d_boxes) if d_boxes else np.zeros((0, 5))
    d_scores = np.concatenate(d_scores) if d_scores else np.zeros(0)
    d_keys = np.concatenate(d_keys) if d_keys else np.zeros(0, np.int64)
    d_class = np.concatenate(d_class) if d_class else np.zeros(0, np.int64)

    ovmax, best = _best_gt_per_detection(d_boxes, d_keys, gt_boxes, gt_keys)
    gt_class = gt_keys % num_classes if num_classes else gt_keys
    for c in range(num_classes):
        npos = int(np.sum((gt_class == c) & ~gt_diff))
        num_gts[c] = npos
        sel = np.nonzero(d_class == c)[0]
        num_dets[c] = len(sel)
        if npos == 0:
            continue
        sel = sel[np.argsort(-d_scores[sel], kind="stable")]  # by decreasing score, ties in input order
        ov, gt = ovmax[sel], best[sel]
        for t, thr in enumerate(thrs):
            hit = (ov > thr) if strict else (ov >= thr)
            hit &= gt >= 0
            difficult = hit & gt_diff[np.maximum(gt, 0)]
            claim = hit & ~difficult
            first = np.zeros(len(sel), dtype=bool)  # first claim of each ground truth
            if claim.any():
                idx = np.nonzero(claim)[0]
                _, first_pos = np.unique(gt[idx], return_index=True)
                first[idx[first_pos]] = True
            tp = first.astype(np.float64)
            fp = (~first & ~difficult).astype(np.float64)
            tp, fp = np.cumsum(tp), np.cumsum(fp)
            recall = tp / npos
            precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
            ap[t, c] = voc_ap(recall, precision, metric)
    valid = num_gts > 0
    mean_ap = np.nanmean(ap[:, valid], axis=1) if valid.any() else np.full(T, np.nan)
    return dict(ap=ap, map=mean_ap, mean=float(np.mean(mean_ap)), num_gts=num_gts, num_dets=num_dets)


# ---------------------------------------------------------------------------------------------
# COCO box AP (horizontal boxes)
# ---------------------------------------------------------------------------------------------

def coco_bbox_map(dets, annots, num_classes=None, max_dets=100) -> dict:
    """COCO box AP through pycocotools, for horizontal-box data (SARDet-50K in BabelRS).

    Args:
        dets, annots: as `eval_rbbox_map`; oriented boxes are replaced by their enclosing
            horizontal boxes. Difficult ground truths become COCO `iscrowd` (ignored) regions.
        max_dets: detections per image (COCO's 100).
    Returns:
        dict(map = AP@[.5:.95], ap50, ap75, ap (C,) per-class AP@[.5:.95] with NaN for classes
        without ground truth, ap50_per_class (C,)).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if num_classes is None:
        num_classes = max([len(d) for d in dets] + [int(np.max(a["labels"])) + 1 for a in annots if len(a["labels"])] + [1])
    images, anns, results = [], [], []
    for i, a in enumerate(annots):
        images.append(dict(id=i + 1))
        boxes = ro.obb2hbb(torch.as_tensor(np.asarray(a["boxes"], np.float64).reshape(-1, 5))).numpy()
        diff = np.asarray(a.get("difficult", np.zeros(len(boxes), bool)), bool).reshape(-1)
        for b, l, d in zip(boxes, np.asarray(a["labels"]).reshape(-1), diff):
            w, h = b[2] - b[0], b[3] - b[1]
            anns.append(dict(id=len(anns) + 1, image_id=i + 1, category_id=int(l) + 1, bbox=[b[0], b[1], w, h],
                             area=float(w * h), iscrowd=int(d)))
        for c, d in enumerate(dets[i] if i < len(dets) else []):
            d = np.asarray(d, np.float64).reshape(-1, 6)
            hb = ro.obb2hbb(torch.from_numpy(d[:, :5])).numpy()
            for b, s in zip(hb, d[:, 5]):
                results.append(dict(image_id=i + 1, category_id=c + 1, bbox=[b[0], b[1], b[2] - b[0], b[3] - b[1]],
                                    score=float(s)))
    gt = COCO()
    gt.dataset = dict(images=images, annotations=anns, categories=[dict(id=c + 1) for c in range(num_classes)])
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        if not results:
            return dict(map=0.0, ap50=0.0, ap75=0.0, ap=np.full(num_classes, np.nan), ap50_per_class=np.full(num_classes, np.nan))
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "bbox")
        ev.params.maxDets = [1, 10, max_dets]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    prec = ev.eval["precision"]  # (T iou, R recall, K class, A area, M maxdets)

    def per_class(p):  # mean over recall points of valid entries
        out = np.full(num_classes, np.nan)
        for k in range(num_classes):
            v = p[..., k]
            v = v[v > -1]
            if v.size:
                out[k] = v.mean()
        return out

    return dict(map=float(ev.stats[0]), ap50=float(ev.stats[1]), ap75=float(ev.stats[2]),
                ap=per_class(prec[:, :, :, 0, -1]), ap50_per_class=per_class(prec[0, :, :, 0, -1]))


# ---------------------------------------------------------------------------------------------
# BabelRS summary metrics
# ---------------------------------------------------------------------------------------------

def h_map(per_modality: dict) -> float:
    """BabelRS Sec. 3.4: H-mAP = |M| / Σ_m 1/mAP_m, the harmonic mean of per-modality mAPs; 0 if any is 0."""
    values = [float(v) for v in per_modality.values()]
    if not values:
        raise ValueError("h_map needs at least one modality")
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def overall_map(per_class_ap: dict) -> float:
    """BabelRS's "Overall" mAP: the mean AP over the union of all modalities' categories.

    Args:
        per_class_ap: {modality: {class name: AP}}; a category of one modality is distinct from a
            namesake in another (SOI-Det keeps 'Ship' (DOTA) apart from 'ship' (SAR)); NaN entries
            (no ground truth) are skipped. Equals the class-count-weighted mean of the modalities' mAPs.
    """
    values = [v for per_class in per_class_ap.values() for v in per_class.values() if np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


# ---------------------------------------------------------------------------------------------
# DOTA Task1 result files
# ---------------------------------------------------------------------------------------------

def write_dota_task1(out_dir, dets_by_image: dict, classes) -> list:
    """Write `Task1_<class>.txt` files: `<image> <score> x1 y1 x2 y2 x3 y3 x4 y4` per detection.

    Args:
        dets_by_image: {image name: list over classes of (K, 6) [cx, cy, w, h, θ, score]}.
    Returns the written paths.
    """
    out_dir = Path(out_dir)
    paths = []
    for c, name in enumerate(classes):
        lines = []
        for image, per_class in sorted(dets_by_image.items()):
            d = np.asarray(per_class[c], np.float64).reshape(-1, 6)
            polys = ro.obb2poly(torch.from_numpy(d[:, :5])).numpy()
            lines += [f"{image} {s:.6f} " + " ".join(f"{v:.2f}" for v in p) for p, s in zip(polys, d[:, 5])]
        path = out_dir / f"Task1_{name}.txt"
        datasets.atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))
        paths.append(path)
    return paths


def read_dota_task1(det_dir, classes) -> dict:
    """Read `Task1_<class>.txt` files back into {image: list over classes of (K, 6) arrays}.

    Each quadrilateral becomes its minimum-area le90 rectangle (`poly2obb`), as mmrotate does.
    A missing class file means no detections of that class.
    """
    det_dir = Path(det_dir)
    found = {}
    for c, name in enumerate(classes):
        path = det_dir / f"Task1_{name}.txt"
        if not path.exists():
            continue
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            tokens = line.split()
            if not tokens:
                continue
            if len(tokens) != 10:
                raise datasets.DatasetError(f"{path}:{n}: expected '<image> <score> x1 y1 ... x4 y4', got {len(tokens)} tokens")
            try:
                values = [float(t) for t in tokens[1:]]
            except ValueError:
                raise datasets.DatasetError(f"{path}:{n}: non-numeric score or coordinate") from None
            found.setdefault(tokens[0], [[] for _ in classes])[c].append(values)
    out = {}
    for image, per_class in found.items():
        arrays = []
        for rows in per_class:
            rows = np.asarray(rows, np.float64).reshape(-1, 9)
            boxes = ro.poly2obb(torch.from_numpy(rows[:, 1:])).numpy()
            arrays.append(np.concatenate([boxes, rows[:, :1]], axis=1))
        out[image] = arrays
    return out


# ---------------------------------------------------------------------------------------------
# Scoring a run folder (eval.py --run DIR)
# ---------------------------------------------------------------------------------------------

def config_stage(cfg: dict) -> str:
    """The stage of a run's config.json (configs written before it held the stage: by their fields)."""
    if "stage" in cfg:
        return cfg["stage"]
    return "csia" if "merge" in cfg else "mutdet" if "enhance" in cfg else "sam" if "points_per_side" in cfg else "finetune"


def _stage_of(run: Path) -> str:
    """The stage that wrote a run folder, "" without a config.json."""
    import json
    path = Path(run) / "config.json"
    return config_stage(json.loads(path.read_text())) if path.exists() else ""


def build_run_model(run: Path, device="cpu"):
    """Rebuild a run's detector from its model.json and load model.safetensors. The model files
    are imported here only, so that the metrics above need nothing but rotated_ops and datasets."""
    import json

    from safetensors.torch import load_file

    import babelrs
    run = Path(run)
    stage = _stage_of(run)
    if stage in ("csia", "mutdet", "sam"):
        what = {"csia": "a csia run (a ViT and a language model)", "mutdet": "a mutdet pre-training run",
                "sam": "a sam cache"}[stage]
        raise datasets.DatasetError(f"{run}: {what}, not a detector: --run scores and --predict runs fine-tuning "
                                    f"runs; fine-tune from it first (python train.py --stage finetune --init {run})")
    for name in ("model.json", "model.safetensors"):
        if not (run / name).exists():
            raise datasets.DatasetError(f"{run}: not a finished fine-tuning run (no {name}; --run takes the folder of "
                                        "train.py --stage finetune)")
    args = json.loads((run / "model.json").read_text())
    sources = args["sources"]
    kwargs = {k: v for k, v in args.items() if k != "sources"}
    kwargs["resnet"] = ""  # the trained weights replace the initial ones
    model = babelrs.build_detector(sources=[dict(modality=s["modality"], classes=s["classes"], box_type=s["box_type"])
                                            for s in sources], **kwargs)
    model.load_state_dict(load_file(str(run / "model.safetensors")))
    return model.to(device).eval(), sources


@torch.no_grad()
def predict_split(model, split, modality: str, image_size: int, device="cpu", batch_size: int = 4, progress=True):
    """Detections of `model` on every image of a split: list over images of a list over classes of
    (K, 6) arrays [cx, cy, w, h, θ, score] in original pixels, and the matching annotations."""
    tf = datasets.Compose([datasets.Resize(image_size), datasets.Normalize()])
    num_classes = len(split.classes)
    dets, annots = [], []
    index = range(0, len(split), batch_size)
    if progress:
        from tqdm import tqdm
        index = tqdm(index, desc=f"scoring {modality}", leave=False)
    for start in index:
        items = [tf(split[i]) for i in range(start, min(start + batch_size, len(split)))]
        sizes = [tuple(it["image"].shape[-2:]) for it in items]
        batch = datasets.collate(items)
        results = model.predict(batch["images"].to(device), batch["masks"].to(device), [modality] * len(items),
                                sizes, [it["scale"] for it in items])
        for r in results:
            boxes, scores, labels = r["boxes"].cpu().double().numpy(), r["scores"].cpu().double().numpy(), r["labels"].cpu().numpy()
            dets.append([np.concatenate([boxes[labels == c], scores[labels == c, None]], 1) for c in range(num_classes)])
    for s in split.samples:
        annots.append(dict(boxes=s.boxes, labels=s.labels, difficult=s.difficult))
    return dets, annots


def score_source(dets, annots, classes, box_type: str) -> dict:
    """Both papers' metrics of one source.

    - obb: rotated VOC area AP at 0.50:0.05:0.95 (BabelRS's DOTA / DroneVehicle numbers) gives
      AP50, AP75 and mAP per class; hbb: COCO box AP (BabelRS's SAR numbers).
    - the MutDet protocol, VOC07 11-point AP50 and AP75 (on the le90 boxes; for hbb sources the
      boxes are axis-aligned, so this is horizontal IoU).
    """
    out = dict(classes=list(classes), box_type=box_type)
    if box_type == "hbb":
        c = coco_bbox_map(dets, annots, num_classes=len(classes))
        per_map, per_50 = c["ap"], c["ap50_per_class"]
        r75 = eval_rbbox_map(dets, annots, (0.75,), "area")
        out.update(ap50=c["ap50"], ap75=c["ap75"], map=c["map"])
        per_75 = r75["ap"][0]
    else:
        r = eval_rbbox_map(dets, annots, COCO_IOUS, "area")
        per_50, per_75, per_map = r["ap"][0], r["ap"][5], r["ap"].mean(axis=0)  # NaN stays NaN
        out.update(ap50=float(r["map"][0]), ap75=float(r["map"][5]), map=float(r["mean"]))
    voc07 = eval_rbbox_map(dets, annots, (0.5, 0.75), "11point")
    out["voc07_ap50"], out["voc07_ap75"] = float(voc07["map"][0]), float(voc07["map"][1])

    def named(values):
        return {name: (float(v) if np.isfinite(v) else None) for name, v in zip(classes, values)}

    out["per_class"] = dict(ap50=named(per_50), ap75=named(per_75), map=named(per_map),
                            voc07_ap50=named(voc07["ap"][0]), voc07_ap75=named(voc07["ap"][1]))
    return out


def evaluate_model(model, sources: list, device="cpu", batch_size: int = 4, progress=True) -> dict:
    """Score a detector on the test split of each source (dicts with modality, classes, box_type,
    test, image_size, as stored in a run's model.json). With several modalities, add BabelRS's
    overall mAP (mean over the union of classes) and H-mAP (harmonic mean of per-modality
    mAP@[.5:.95]); the same two over AP50."""
    was_training = model.training
    model.eval()
    metrics = dict(sources={})
    for s in sources:
        split = datasets.load_detection_split(s["test"], s["modality"], s["classes"])
        dets, annots = predict_split(model, split, s["modality"], s["image_size"], device, batch_size, progress)
        metrics["sources"][s["modality"]] = dict(score_source(dets, annots, s["classes"], s["box_type"]),
                                                 test=s["test"], images=len(split))
    model.train(was_training)
    per_mod = metrics["sources"]
    if len(per_mod) > 1:
        def per_class(key):
            return {m: {k: (np.nan if v is None else v) for k, v in r["per_class"][key].items()} for m, r in per_mod.items()}
        metrics["overall_map"] = overall_map(per_class("map"))
        metrics["overall_ap50"] = overall_map(per_class("ap50"))
        metrics["h_map"] = h_map({m: r["map"] for m, r in per_mod.items()})
        metrics["h_ap50"] = h_map({m: r["ap50"] for m, r in per_mod.items()})
    return metrics


def evaluate_run(run, device="cpu", batch_size: int = 4) -> dict:
    """Score a run folder's checkpoint (`evaluate_model`), write metrics.json into it and print a table."""
    import json
    run = Path(run)
    model, sources = build_run_model(run, device)
    metrics = evaluate_model(model, sources, device, batch_size)
    datasets.atomic_write_text(run / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    print(format_run_metrics(metrics))
    return metrics


# ---------------------------------------------------------------------------------------------
# Detecting on any image and on full scenes (eval.py --run RUN --predict PATH ...)
# ---------------------------------------------------------------------------------------------

PATCH_PADDING = (104, 116, 124)  # mmrotate's split padding value
TASK1_SCORE = 0.05  # detections kept in the Task1 files (MutDet / mmrotate test_cfg score_thr)


def image_files(paths: list) -> list:
    """The images named by `paths` (files, or folders read non-recursively), in order."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix.lower() in datasets.IMAGE_EXTS)
        elif p.is_file():
            files.append(p)
        else:
            raise datasets.DatasetError(f"{p}: no such image or folder (from --predict)")
    if not files:
        raise datasets.DatasetError(f"no images ({', '.join(datasets.IMAGE_EXTS)}) in {' '.join(map(str, paths))}")
    return files


def cut_scene(image: np.ndarray, size: int, gap: int) -> list:
    """An (H, W, 3) image as patches, as the splitting code cuts it (`datasets.sliding_windows`,
    padded with PATCH_PADDING past the border); an image no larger than `size` stays whole.
    Returns [(x, y, patch (h, w, 3))]."""
    H, W = image.shape[:2]
    if max(H, W) <= size:
        return [(0, 0, image)]
    out = []
    for x1, y1, _, _ in datasets.sliding_windows(W, H, size, gap):
        x, y = int(x1), int(y1)
        patch = np.empty((size, size, 3), np.uint8)
        patch[:] = PATCH_PADDING
        crop = image[y:y + size, x:x + size]
        patch[:crop.shape[0], :crop.shape[1]] = crop
        out.append((x, y, patch))
    return out


def detect_scene(detect, image: np.ndarray, size: int, gap: int, num_classes: int, batch_size: int = 4,
                 iou_thr: float = 0.1, on_batch=None) -> list:
    """Detections on a whole image: cut into patches (`cut_scene`), `detect(list of patches)` ->
    per patch a list over classes of (K, 6) [cx, cy, w, h, θ, score] in patch pixels, shifted back
    and merged with class-wise rotated NMS (`datasets.merge_patch_detections`, IoU 0.1 as the DOTA
    devkit). Returns a list over classes of (K, 6) arrays in image pixels."""
    patches = cut_scene(image, size, gap)
    found = {}
    for start in range(0, len(patches), batch_size):
        chunk = patches[start:start + batch_size]
        for (x, y, _), dets in zip(chunk, detect([p for _, _, p in chunk])):
            found[datasets.patch_name("scene", 1, x, y)] = dets
        if on_batch is not None:
            on_batch(len(chunk))
    if len(patches) == 1:  # a whole image: nothing to merge
        return [np.asarray(d, np.float64).reshape(-1, 6) for d in next(iter(found.values()))]
    return datasets.merge_patch_detections(found, iou_thr)["scene"] if found else [np.zeros((0, 6))] * num_classes


def run_detector(model, modality: str, image_size: int, device="cpu"):
    """`detect` for `detect_scene`: a run's model on a list of (h, w, 3) uint8 patches, each resized
    as at test time (longer side `image_size`)."""
    tf = datasets.Compose([datasets.Resize(image_size), datasets.Normalize()])
    num_classes = len(model.heads[modality].cls_branches[0].bias)

    @torch.no_grad()
    def detect(patches):
        items = [tf(dict(image=torch.from_numpy(p).permute(2, 0, 1).contiguous(), boxes=torch.zeros(0, 5),
                         labels=torch.zeros(0, dtype=torch.long), difficult=torch.zeros(0, dtype=torch.bool)))
                 for p in patches]
        batch = datasets.collate(items)
        results = model.predict(batch["images"].to(device), batch["masks"].to(device), [modality] * len(items),
                                [tuple(it["image"].shape[-2:]) for it in items], [it["scale"] for it in items])
        out = []
        for r in results:
            boxes, scores = r["boxes"].cpu().double().numpy(), r["scores"].cpu().double().numpy()
            labels = r["labels"].cpu().numpy()
            out.append([np.concatenate([boxes[labels == c], scores[labels == c, None]], 1) for c in range(num_classes)])
        return out
    return detect


def draw_detections(image: np.ndarray, dets: list, classes: list, path, score_thr: float = 0.3) -> int:
    """Oriented boxes with class names and scores (score >= score_thr) drawn on the image at its
    own resolution; lines and labels scale with the image (1 px per 1000 px of its longer side), so
    a 4000 x 4000 scene stays readable. Returns the number of boxes drawn."""
    from PIL import Image, ImageDraw, ImageFont
    import matplotlib
    canvas = Image.fromarray(image).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    scale = max(1, round(max(image.shape[:2]) / 1000))
    font = ImageFont.load_default(size=10 * scale)
    palette = matplotlib.colormaps["tab10"]
    drawn = 0
    for c, d in enumerate(dets):
        d = np.asarray(d, np.float64).reshape(-1, 6)
        d = d[d[:, 5] >= score_thr]
        colour = tuple(int(255 * v) for v in palette(c % 10)[:3])
        for box, poly in zip(d, ro.obb2poly(torch.from_numpy(d[:, :5])).numpy()):
            pts = [tuple(p) for p in poly.reshape(4, 2)]
            draw.line(pts + pts[:1], fill=colour, width=scale)
            label = f"{classes[c]} {box[5]:.2f}"
            x, y = min(p[0] for p in pts), min(p[1] for p in pts)
            left, top, right, bottom = draw.textbbox((0, 0), label, font=font)  # the label sits above the box
            w, h = right - left, bottom - top
            draw.rectangle((x, y - h - 2 * scale, x + w + 2 * scale, y), fill=colour)
            draw.text((x + scale - left, y - h - scale - top), label, fill=(255, 255, 255), font=font)
            drawn += 1
    tmp = Path(path).with_suffix(".tmp.png")
    canvas.save(tmp)
    tmp.replace(path)
    return drawn


def predict_images(run, paths: list, out, modality: str = "", score_thr: float = 0.3, patch: int = 0, gap: int = 200,
                   make_zip: bool = False, device="cpu", batch_size: int = 4) -> dict:
    """`eval.py --run RUN --predict PATH...`: detect on every image (large ones cut into patches of
    the run's training size, or `patch`, with `gap`, and merged), write `<image>.png` drawings and,
    for the whole set, DOTA Task1 files `Task1_<class>.txt` (detections with score >= TASK1_SCORE),
    with `make_zip` also `submission.zip` for the DOTA evaluation server."""
    from tqdm import tqdm
    model, sources = build_run_model(run, device)
    modalities = [s["modality"] for s in sources]
    if not modality and len(modalities) == 1:
        modality = modalities[0]
    if modality not in modalities:
        raise datasets.DatasetError(f"{run}: --modality {modality or '(none)'}: this run detects "
                                    f"{', '.join(modalities)}; choose one with --modality")
    src = sources[modalities.index(modality)]
    size = patch or src["image_size"]
    files = image_files(paths)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    detect = run_detector(model, modality, src["image_size"], device)
    from PIL import Image

    def patches(path):  # from the image header: the progress bar knows the whole job before it starts
        try:
            with Image.open(path) as im:
                w, h = im.size
        except OSError as e:
            raise datasets.DatasetError(f"{path}: cannot read image ({e.__class__.__name__})") from None
        return len(datasets.sliding_windows(w, h, size, gap)) if max(w, h) > size else 1
    bar = tqdm(total=sum(patches(f) for f in files), unit="patch", desc=f"predict {modality}")
    by_image, drawn = {}, 0
    for i, f in enumerate(files):
        image = datasets.load_image(f)
        dets = detect_scene(detect, image, size, gap, len(src["classes"]), batch_size, on_batch=bar.update)
        by_image[f.stem] = [d[d[:, 5] >= TASK1_SCORE] for d in dets]
        drawn += draw_detections(image, dets, src["classes"], out / f"{f.stem}.png", score_thr)
        bar.set_postfix(images=f"{i + 1}/{len(files)}")
    bar.close()
    task1 = write_dota_task1(out, by_image, src["classes"])
    summary = dict(images=len(files), detections=int(sum(len(d) for v in by_image.values() for d in v)),
                   drawn=drawn, task1=[str(p) for p in task1])
    if make_zip:
        import zipfile
        tmp = out / "submission.zip.tmp"
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
            for p in task1:
                z.write(p, p.name)
        tmp.replace(out / "submission.zip")
        summary["zip"] = str(out / "submission.zip")
    return summary


def format_run_metrics(metrics: dict) -> str:
    """Per class and per modality AP50 / AP75 / mAP (and the VOC07 11-point numbers), then the summary."""
    cols = ("ap50", "ap75", "map", "voc07_ap50", "voc07_ap75")
    header = f"{'AP in %':<26}" + "".join(f"{c:>11}" for c in cols)
    lines = []
    for m, r in metrics["sources"].items():
        lines += [f"{m} ({r['box_type']}, {r['images']} test images)", header]
        for name in r["classes"]:
            vals = [r["per_class"][c][name] for c in cols]
            lines.append(f"  {name:<24}" + "".join(f"{v * 100:11.2f}" if v is not None else f"{'-':>11}" for v in vals))
        lines.append(f"  {'mean':<24}" + "".join(f"{r[c] * 100:11.2f}" for c in cols))
    if "h_map" in metrics:  # BabelRS Tab. 2: AP@50 / mAP overall and per modality, then H-mAP
        mods = list(metrics["sources"])
        lines.append("")
        lines.append(f"{'Overall':>15}" + "".join(f"{m:>15}" for m in mods) + f"{'H-mAP':>9}")
        cells = [f"{metrics['overall_ap50'] * 100:.2f} / {metrics['overall_map'] * 100:.2f}"]
        cells += [f"{metrics['sources'][m]['ap50'] * 100:.2f} / {metrics['sources'][m]['map'] * 100:.2f}" for m in mods]
        lines.append("".join(f"{c:>15}" for c in cells) + f"{metrics['h_map'] * 100:9.2f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The papers' tables (eval.py --table NAME RUN...): our runs beside the published numbers
# ---------------------------------------------------------------------------------------------

# Published numbers, in percent, in each table's column order. Sources: BabelRS (arXiv 2603.01758)
# Tab. 2-5 and Fig. 6 (read off the vector figure); MutDet (arXiv 2407.09920) Tab. 2, from the
# official repository's .github/images/Results_on_DIOR_DOTA.png. NaN: the run diverged under AMP.
NAN = float("nan")
PAPER = {
    "babelrs-table2": dict(cite="BabelRS Tab. 2, SOI-Det test (ConvNeXt-T baselines from SM3Det; BabelRS ViT-L)", rows={
        "Simple Joint Training": (77.56, 47.05, 84.11, 53.46, 76.37, 45.18, 73.28, 44.99, 47.57),
        "DA": (79.76, 48.37, 84.93, 53.86, 78.47, 46.23, 77.43, 48.21, 49.23),
        "UniDet": (79.55, 48.47, 84.70, 53.81, 78.28, 46.49, 77.17, 47.99, 49.24),
        "Uncertainty loss": (79.99, 48.79, 84.81, 53.43, 78.73, 46.94, 77.96, 48.78, 49.57),
        "SM3Det": (80.68, 50.20, 89.94, 60.64, 77.88, 46.47, 77.99, 48.87, 51.31),
        "BabelRS": (81.32, 51.57, 91.70, 63.30, 77.73, 46.96, 79.63, 51.32, 53.02)}),
    "babelrs-table3": dict(cite="BabelRS Tab. 3, SOI-Det test, ViT-L pre-trainings, same fine-tuning", rows={
        "CLIP": (65.21, 36.12, 72.70, 42.00, 62.67, 33.56, 63.83, 36.74, 37.12),
        "MAE": (72.36, 42.84, 70.64, 39.48, 73.35, 43.43, 71.46, 45.11, 42.54),
        "BEiT": (76.50, 44.59, 81.90, 50.10, 76.39, 43.14, 70.34, 42.35, 44.94),
        "BEiTv2": (77.63, 44.67, 78.50, 46.70, 78.01, 43.36, 75.48, 46.14, 45.35),
        "DINOv2": (74.79, 45.02, 72.74, 41.38, 76.53, 46.23, 72.04, 45.74, 44.34),
        "RemoteCLIP": (66.37, 37.17, 73.90, 43.30, 63.57, 34.36, 65.74, 38.27, 38.30),
        "SatMAE": (74.49, 42.51, 79.70, 47.90, 73.86, 40.84, 70.12, 41.07, 43.03),
        "ScaleMAE": (74.09, 42.52, 78.80, 46.50, 73.22, 41.01, 71.07, 42.30, 43.15),
        "BabelRS": (81.32, 51.57, 91.70, 63.30, 77.73, 46.96, 79.63, 51.32, 53.02)}),
    # iterations: where each run exploded in Fig. 2 (MAE: Fig. 7, 16.8 % of its 33,468-iteration axis);
    # runs that finished the schedule have all 33,468 (Fig. 7)
    "babelrs-table4": dict(cite="BabelRS Tab. 4 (AMP fine-tuning), iterations from Fig. 2 / Fig. 7", rows={
        "MAE": (NAN, NAN, NAN, 5600), "BEiTv2": (NAN, NAN, NAN, 10400), "DINOv2": (NAN, NAN, NAN, 17100),
        "ScaleMAE": (NAN, NAN, NAN, 4300), "CLIP": (64.58, 35.62, 36.68, 33468),
        "RemoteCLIP": (65.97, 36.82, 37.72, 33468), "SatMAE": (70.49, 39.45, 40.00, 33468),
        "BEiT": (75.74, 43.82, 44.35, 33468), "BabelRS": (79.13, 50.17, 51.52, 33468)}),
    "babelrs-table5": dict(cite="BabelRS Tab. 5, merge strategies (Fig. 5), SOI-Det", rows={
        "Baseline (last layer only)": (49.33, 50.67), "(a) concat": (50.25, 51.60), "(b) element-wise sum": (50.31, 51.55),
        "(c) per-layer projectors + LVSA": (49.88, 50.92), "(d) LVSA + shared projector": (51.57, 53.02)}),
    "babelrs-fig6": dict(cite="BabelRS Fig. 6 (read off the figure): left pre-training steps (τ 6k), right τ (20k steps, AMP)",
                         rows={**{f"steps {k}k": (k * 1000, 6000, m, h) for k, m, h in (
                             (2, 50.98, 52.39), (4, 51.18, 52.63), (6, 50.40, 51.63), (8, 50.70, 51.81), (10, 51.01, 52.11),
                             (12, 51.23, 52.66), (14, 51.20, 52.70), (16, 51.22, 52.74), (18, 51.35, 52.83),
                             (20, 51.57, 53.02), (22, 51.58, 52.88), (24, 51.25, 52.79))},
                               **{f"τ {t}k (AMP)": (20000, t * 1000, m, h) for t, m, h in (
                                   (0, 48.69, 50.03), (2, 49.23, 50.67), (4, 49.47, 50.81), (6, 49.61, 50.95),
                                   (8, 49.55, 50.89), (10, 49.69, 50.83))}}),
    "mutdet-table2": dict(cite="MutDet Tab. 2, DIOR-R test, ARS-DETR R-50 (VOC07 11-point AP)", classes=(
        "APL", "APO", "BF", "BC", "BR", "CH", "DAM", "ESA", "ETS", "GF", "GTF", "HA", "OP", "SH", "STA", "STO", "TC",
        "TS", "VE", "WM"), rows={
        "-": (67.3, 52.0, 75.7, 81.7, 41.6, 77.1, 36.2, 80.8, 71.7, 73.8, 78.2, 35.5, 56.7, 84.5, 66.0, 72.9, 81.3, 59.0,
              50.2, 71.8, 65.7, 45.7),
        "UP-DETR": (68.1, 54.7, 77.6, 81.9, 42.5, 78.5, 33.9, 82.9, 73.8, 78.5, 78.3, 43.4, 55.4, 85.6, 69.1, 73.3, 81.0,
                    61.0, 50.5, 71.7, 67.1, 48.4),
        "AlignDet": (67.6, 53.4, 73.4, 81.2, 40.4, 77.1, 38.4, 81.1, 71.6, 73.4, 78.1, 35.8, 54.7, 84.6, 69.7, 73.2, 80.7,
                     59.7, 49.6, 71.5, 65.8, 45.8),
        "DETReg": (69.0, 55.5, 75.7, 82.4, 45.4, 78.6, 35.6, 81.7, 72.4, 78.8, 78.2, 46.1, 57.7, 87.6, 71.5, 76.0, 81.3,
                   60.6, 52.9, 72.1, 67.9, 49.1),
        "MutDet": (75.1, 60.5, 78.8, 84.7, 45.4, 81.2, 39.6, 85.7, 77.0, 78.0, 81.9, 52.1, 57.8, 88.2, 78.8, 77.4, 84.7,
                   60.2, 54.2, 72.4, 70.7, 51.2)}),
    "mutdet-10pct": dict(cite="MutDet abstract: with 10% of DIOR-R, MutDet is +6.1 AP50 above DETReg (absolute "
                              "values not published)", rows={}),
}
TABLES = tuple(PAPER)
MERGE_NAMES = {"last": "Baseline (last layer only)", "concat": "(a) concat", "sum": "(b) element-wise sum",
               "per-layer": "(c) per-layer projectors + LVSA", "lvsa": "(d) LVSA + shared projector"}


def read_log(run) -> list:
    """log.jsonl of a run as a list of dicts (a non-finite loss is stored as NaN)."""
    import json
    path = Path(run) / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def run_facts(run) -> dict:
    """What a table needs to know about a fine-tuning run: its metrics (None when it did not
    finish), the steps it trained, whether it diverged, and what it started from, read from its
    config.json and that of its --init run (a csia or mutdet run, or other ViT weights)."""
    import json
    run = Path(run)
    if not (run / "config.json").exists():
        raise datasets.DatasetError(f"{run}: not a run folder (no config.json)")
    cfg = json.loads((run / "config.json").read_text())
    if _stage_of(run) != "finetune":
        raise datasets.DatasetError(f"{run}: a {_stage_of(run)} run; tables take fine-tuning runs (each one's --init "
                                    "names its pre-training)")
    steps = [r for r in read_log(run) if "loss" in r]
    facts = dict(run=run.name, seed=cfg.get("seed", 0), row=seed_group(run.name), amp=cfg.get("amp", "off"), data_fraction=cfg.get("data_fraction", 1.0),
                 max_steps=cfg.get("max_steps", 0), backbone=cfg.get("backbone", ""),
                 steps=steps[-1]["step"] if steps else 0,
                 diverged=bool(steps) and not np.isfinite(steps[-1]["loss"]),
                 metrics=json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").exists() else None,
                 init="random", label="random init")
    init = cfg.get("init", "")
    init_cfg = Path(init) / "config.json"
    if init == "fractal" or (not init and cfg.get("backbone") != "vit" and cfg.get("resnet") == "fractal"):
        facts.update(init="fractal", label="FractalDB stand-in")  # generic pre-training alone (train.standin)
    if init == "fractal":
        pass
    elif init and init_cfg.exists():
        icfg = json.loads(init_cfg.read_text())
        if "merge" in icfg:  # a csia run
            facts.update(init="csia", merge=icfg["merge"], csia_steps=icfg["max_steps"] or icfg["steps"],
                         tau=icfg["tau"], label="BabelRS (CSIA + LVSA)" if icfg["merge"] == "lvsa" else
                         f"CSIA, {MERGE_NAMES[icfg['merge']]}")
        elif "enhance" in icfg:  # a mutdet run: DETReg's row or MutDet (with its switches)
            detreg = not icfg["enhance"] and icfg["embed_loss"] == "l1" and icfg["pseudo_classes"] == 1
            off = [n for n in ("enhance", "siamese", "align") if not icfg[n]]
            label = "DETReg" if detreg else "MutDet" + (f" (no {', no '.join(off)})" if off else "") + \
                (", L1" if icfg["embed_loss"] == "l1" and not detreg else "")
            if detreg and icfg.get("dn_align", True):  # runs before the DN switch existed aligned their DN queries
                label += " + DN alignment"
            facts.update(init="mutdet", label=label)
    elif init:
        facts.update(init=cfg.get("vit_family", "weights"), label={"clip": "CLIP", "dinov2": "DINOv2"}.get(
            cfg.get("vit_family"), Path(init).name))
    return facts


def _cells(name: str, f: dict, classes=()) -> list:
    """Our numbers (percent) of one run in the column order of table `name`."""
    m = f["metrics"]
    if name in ("babelrs-table2", "babelrs-table3"):
        if m is None:
            return [NAN] * 9
        src = m["sources"]
        per = [src[mod][k] if mod in src else NAN for mod in ("sar", "rgb", "ir") for k in ("ap50", "map")]
        return [100 * v for v in [m.get("overall_ap50", NAN), m.get("overall_map", NAN)] + per + [m.get("h_map", NAN)]]
    if name == "babelrs-table4":
        vals = [NAN] * 3 if m is None else [100 * m.get(k, NAN) for k in ("overall_ap50", "overall_map", "h_map")]
        return vals + [f["steps"]]
    if name == "babelrs-table5":
        return [NAN] * 2 if m is None else [100 * m.get(k, NAN) for k in ("overall_map", "h_map")]
    if name == "babelrs-fig6":
        scores = [NAN] * 2 if m is None else [100 * m.get(k, NAN) for k in ("overall_map", "h_map")]
        tau = f.get("tau", NAN)
        return [f.get("csia_steps", NAN), int(tau) if float(tau).is_integer() else tau] + scores
    # MutDet: VOC07 11-point AP50 per class, then AP50 and AP75 (one source)
    r = next(iter(m["sources"].values())) if m else None
    if name == "mutdet-10pct":
        return [100 * f["data_fraction"]] + ([NAN] * 2 if r is None else [100 * r["voc07_ap50"], 100 * r["voc07_ap75"]])
    ap = {} if r is None else r["per_class"]["voc07_ap50"]
    per = [100 * ap[c] if ap.get(c) is not None else NAN for c in classes]
    return per + ([NAN] * 2 if r is None else [100 * r["voc07_ap50"], 100 * r["voc07_ap75"]])


def _columns(name: str, classes=()) -> list:
    """Column headers of table `name`; in Tab. 2/3 pairs of columns are shown as "AP50 / mAP" cells."""
    if name in ("babelrs-table2", "babelrs-table3"):
        return [f"{d} {k}" for d in ("Overall", "SAR", "RGB", "IR") for k in ("AP50", "mAP")] + ["H-mAP"]
    if name == "babelrs-table4":
        return ["AP50", "mAP", "H-mAP", "iterations"]
    if name == "babelrs-table5":
        return ["mAP", "H-mAP"]
    if name == "babelrs-fig6":
        return ["CSIA steps", "τ", "mAP", "H-mAP"]
    if name == "mutdet-10pct":
        return ["data %", "AP50", "AP75"]
    return list(classes) + ["AP50", "AP75"]


def _markdown(columns, rows, paired: bool) -> str:
    def fmt(v):
        if isinstance(v, str):
            return v
        if isinstance(v, int):  # iterations, steps, τ
            return str(v)
        if not np.isfinite(v):
            return "NaN"
        return f"{v:.0f}" if float(v).is_integer() and abs(v) >= 100 else f"{v:.2f}"
    if paired:  # "AP50 / mAP" cells as in BabelRS Tab. 2/3
        heads = [columns[i].rsplit(" ", 1)[0] for i in range(0, len(columns) - 1, 2)] + [columns[-1]]
        rows = [(label, [f"{fmt(v[i])} / {fmt(v[i + 1])}" for i in range(0, len(v) - 1, 2)] + [fmt(v[-1])])
                for label, v in rows]
        columns = [h + (" AP50 / mAP" if h != "H-mAP" else "") for h in heads]
    lines = ["| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += ["| " + label + " | " + " | ".join(fmt(v) for v in vals) + " |" for label, vals in rows]
    return "\n".join(lines)


def seed_group(folder: str) -> str:
    """The row a run folder belongs to: its name without the `-seed<k>` of `train.py --sweep --seeds`."""
    return re.sub(r"-seed\d+$", "", folder)


def row_key(name: str, f: dict) -> str:
    """Which of the paper's rows a run stands for, in ORDERINGS's terms."""
    if f["init"] == "csia":
        return f["merge"] if name == "babelrs-table5" else "csia"
    if f["init"] == "mutdet":
        return f["label"]  # DETReg, MutDet; an ablation row is named by its switches and is not compared
    return {"fractal": "none", "random": "random"}.get(f["init"], f["init"])  # generic pre-training is "none"


# The papers' orderings each table tests: (better row, worse row, column). BabelRS Tab. 3: BabelRS is
# above every generic pre-training; Tab. 5: (d) is best and every merge beats the last layer alone;
# MutDet Tab. 2: MutDet > DETReg > no pre-training, in AP50 and AP75; 10 %: MutDet > DETReg (+6.1 AP50).
ORDERINGS = {
    "babelrs-table3": [("csia", "none", "H-mAP"), ("csia", "none", "Overall mAP")],
    "babelrs-table5": [("lvsa", m, "H-mAP") for m in ("last", "concat", "sum", "per-layer")]
                      + [(m, "last", "H-mAP") for m in ("concat", "sum", "per-layer")],
    "mutdet-table2": [(a, b, c) for c in ("AP50", "AP75") for a, b in (("MutDet", "DETReg"), ("DETReg", "none"),
                                                                        ("MutDet", "none"))],
    "mutdet-10pct": [("MutDet", "DETReg", "AP50"), ("MutDet", "none", "AP50"), ("DETReg", "none", "AP50")],
}


def paired_verdict(a: dict, b: dict) -> dict:
    """Does row a beat row b? `a`, `b`: {seed: value}. Paired over the seeds both have: the mean
    difference is separable when it exceeds twice its standard error (std of the differences / sqrt n);
    then the ordering holds (a > b) or is reversed. One common seed cannot separate anything."""
    seeds = sorted(set(a) & set(b))
    d = np.array([a[k] - b[k] for k in seeds], float)
    d = d[np.isfinite(d)]
    if len(d) < 2:
        return dict(n=len(d), mean=float(d.mean()) if len(d) else NAN, se=NAN, verdict="not separable (one seed)")
    mean, se = float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))
    verdict = "not separable" if abs(mean) <= 2 * se else "holds" if mean > 0 else "reversed"
    return dict(n=len(d), mean=mean, se=se, verdict=verdict)


def format_table_runs(name: str, runs: list) -> dict:
    """Table `name` over run folders, ours first, then the paper's rows: dict(markdown, csv, groups).

    Runs of one row with several seeds (`<row>-seed<k>` folders) make one line: mean ± standard
    deviation over the seeds in every cell. Under the table, each of the paper's orderings (ORDERINGS)
    is marked holds / reversed / not separable (paired_verdict). The CSV keeps every seed's value."""
    if name not in PAPER:
        raise datasets.DatasetError(f"--table {name}: choose one of {', '.join(TABLES)}")
    facts = [run_facts(r) for r in runs]
    paired = name in ("babelrs-table2", "babelrs-table3")
    classes = ()
    if name == "mutdet-table2":
        done = [f["metrics"] for f in facts if f["metrics"]]
        classes = next(iter(done[0]["sources"].values()))["classes"] if done else ()
    columns = _columns(name, classes)
    groups = {}  # row folder -> dict(label, key, seeds {seed: cells})
    for f in facts:
        label = {"babelrs-table2": f["row"], "babelrs-table5": MERGE_NAMES.get(f.get("merge"), f["label"]),
                 "babelrs-fig6": f"{f['label']}" + (" (AMP)" if f["amp"] != "off" else "")}.get(name, f["label"])
        if name.startswith("babelrs") and f["backbone"] in ("resnet18", "resnet50"):  # a ViT table: say so
            label += {"resnet18": ", ResNet-18", "resnet50": ", ResNet-50"}[f["backbone"]]
        g = groups.setdefault(f["row"], dict(label=label, name=label, key=row_key(name, f), seeds={},
                                             missing=[]))
        if f["metrics"] is None:
            g["missing"].append("diverged" if f["diverged"] else "unfinished")
            if name != "babelrs-table4":  # Tab. 4 keeps a diverged run: its iterations are the result
                continue
        g["seeds"][f["seed"]] = _cells(name, f, classes)
    for g in groups.values():  # say why a row is empty or has fewer seeds
        if g["missing"] and (not g["seeds"] or name == "babelrs-table4"):
            g["label"] += f" ({g['missing'][0]})"
        elif g["missing"]:
            g["label"] += f" ({len(g['missing'])} seed{'s' if len(g['missing']) > 1 else ''} not finished)"
    names = [g["name"] for g in groups.values()]
    for row, g in groups.items():  # two rows of one kind (a longer schedule, say): tell them apart by folder
        if names.count(g["name"]) > 1:
            g["label"] = g["label"].replace(g["name"], f"{g['name']} [{row}]", 1)
            g["name"] = f"{g['name']} [{row}]"
    seeds = sorted({k for g in groups.values() for k in g["seeds"]})
    many = len(seeds) > 1
    ours = []
    for g in groups.values():
        values = np.array(list(g["seeds"].values()), float) if g["seeds"] else np.full((1, len(columns)), NAN)
        mean = values.mean(0)
        if many:
            std = values.std(0, ddof=1) if len(values) > 1 else np.full(len(columns), NAN)
            cells = [_mean_std(m, sd, len(values)) for m, sd in zip(mean, std)]
        else:  # one seed: the cells as they are (iterations and steps stay integers)
            cells = next(iter(g["seeds"].values())) if g["seeds"] else [NAN] * len(columns)
        label = g["label"] + (f" ({len(values)} seed{'s' if len(values) != 1 else ''})"
                              if many and len(values) != len(seeds) else "")
        ours.append((label, cells))
    paper = PAPER[name]
    head = f"**{name}**, ours ({len(runs)} run{'s' if len(runs) != 1 else ''}"
    head += f"; mean ± std over {len(seeds)} seeds" if many else ""
    text = [head + "; AP in %)", "", _markdown(columns, ours, paired), ""]
    verdicts = []
    by_key = {g["key"]: g for g in groups.values()}
    for a, b, col in ORDERINGS.get(name, []):
        if a not in by_key or b not in by_key or col not in columns:
            continue
        c = columns.index(col)
        v = paired_verdict({k: x[c] for k, x in by_key[a]["seeds"].items()},
                           {k: x[c] for k, x in by_key[b]["seeds"].items()})
        v.update(better=by_key[a]["name"], worse=by_key[b]["name"], column=col)
        verdicts.append(v)
    if verdicts:
        text += [f"The paper's orderings (paired over seeds; separable when the mean difference exceeds 2 standard "
                 f"errors):", ""]
        text += [f"- {v['better']} > {v['worse']} ({v['column']}): **{v['verdict']}**, difference "
                 f"{v['mean']:+.2f}" + (f" ± {v['se']:.2f} (SE, {v['n']} seeds)" if np.isfinite(v["se"]) else "")
                 for v in verdicts]
        text += [""]
    if len(seeds) == 1:
        text += [f"One seed ({seeds[0]}): no spread, and no verdicts on the paper's orderings.", ""]
    text += [f"Paper: {paper['cite']}"]
    if paper["rows"]:
        text += ["", _markdown(_columns(name, paper.get("classes", ())), list(paper["rows"].items()), paired)]
    csv = ["source,row,seed," + ",".join(columns)]
    csv += [f"ours,{g['name']},{k},{','.join(f'{v:.4g}' for v in vals)}"
            for g in groups.values() for k, vals in sorted(g["seeds"].items())]
    if "classes" not in paper:  # the same columns: the paper's rows go into the same file
        csv += [f"paper,{label},,{','.join(f'{v:.4g}' for v in vals)}" for label, vals in paper["rows"].items()]
    return dict(markdown="\n".join(text) + "\n", csv="\n".join(csv) + "\n", groups=groups, verdicts=verdicts,
                columns=columns)


def format_tiny_checks(runs: list) -> str:
    """`train.py --sweep tiny-checks`: what the stand-ins give over random init, and whether doubling
    the fine-tuning steps moves a row more than its seeds do (docs/tiny-protocol.md)."""
    vit = format_table_runs("babelrs-table3", [r for r in runs if Path(r).name.startswith(("ft-generic", "ft-random-off"))])
    r18 = format_table_runs("mutdet-table2", [r for r in runs if "-data" in Path(r).name])
    text = ["**tiny-checks**: the stand-ins against random init on the same steps, and a doubled schedule", "",
            "ViT (babelrs-tiny, SAR + RGB + IR, AP in %):", "", vit["markdown"].split("\n\n")[1], "",
            "ResNet-18 (the tiny finetune preset on SynthSOI-RGB, VOC07 AP in %):", "",
            r18["markdown"].split("\n\n")[1], ""]

    def per_seed(table, row, column):
        g = table["groups"].get(row)
        c = table["columns"].index(column)
        return {} if g is None else {k: v[c] for k, v in g["seeds"].items()}

    lines = []
    for table, better, worse, column, what in (
            (vit, "ft-generic-off", "ft-random-off", "H-mAP", "ViT: stand-in > random init"),
            (vit, "ft-generic-off", "ft-random-off", "Overall AP50", "ViT: stand-in > random init"),
            (r18, "ft-none-data1.0", "ft-random-data1.0", "AP50", "ResNet-18: stand-in > random init")):
        v = paired_verdict(per_seed(table, better, column), per_seed(table, worse, column))
        lines.append(f"- {what} ({column}): **{v['verdict']}**, difference {v['mean']:+.2f}"
                     + (f" ± {v['se']:.2f} (SE, {v['n']} seeds)" if np.isfinite(v["se"]) else ""))
    for column in ("Overall AP50", "H-mAP"):
        short, long = per_seed(vit, "ft-generic-off", column), per_seed(vit, "ft-generic-off-long", column)
        if short and long:
            v = paired_verdict(long, short)
            spread = float(np.std(list(short.values()), ddof=1)) if len(short) > 1 else NAN
            moved = "less" if abs(v["mean"]) < spread else "more"
            lines.append(f"- ViT stand-in row, 2x the fine-tuning steps ({column}): moves it by {v['mean']:+.2f} "
                         f"({v['verdict']}), {moved} than the seed spread (std {spread:.2f})")
    return "\n".join(text + lines) + "\n"


def _mean_std(mean: float, std: float, n: int) -> str:
    if not np.isfinite(mean):
        return "NaN"
    if float(mean).is_integer() and abs(mean) >= 100 and (not np.isfinite(std) or std == 0):  # iterations, steps
        return str(int(mean))
    return f"{mean:.2f}" + (f" ± {std:.2f}" if n > 1 and np.isfinite(std) else "")


# ---------------------------------------------------------------------------------------------
# Figures (eval.py --plot RUN...)
# ---------------------------------------------------------------------------------------------

def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Moving average that keeps a trailing NaN (a run that diverged ends in NaN)."""
    if len(y) < window or window <= 1:
        return y
    kernel = np.ones(window) / window
    return np.concatenate([y[:window - 1], np.convolve(y, kernel, mode="valid")])


def plot_curves(runs: list, path, keys=("loss",), window: int = 10, title: str = "") -> None:
    """One panel per log key (training loss: BabelRS Fig. 4; loss and grad_norm under AMP: Fig. 7),
    one line per run; a run that diverged ends with a cross at its last finite step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 3.8), squeeze=False)
    for run in runs:
        log = [r for r in read_log(run) if "loss" in r]
        steps = np.array([r["step"] for r in log])
        for ax, key in zip(axes[0], keys):
            y = np.array([r.get(key, np.nan) for r in log], dtype=float)
            finite = np.isfinite(y)
            line, = ax.plot(steps[finite], _smooth(y[finite], window), lw=1.2, label=Path(run).name)
            if len(y) and not finite[-1] and finite.any():
                ax.plot(steps[finite][-1], _smooth(y[finite], window)[-1], "x", color=line.get_color(), ms=9, mew=2)
    for ax, key in zip(axes[0], keys):
        ax.set_xlabel("iteration")
        ax.set_ylabel(key.replace("_", " ") + (f" ({window}-step moving average)" if window > 1 else ""))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_survival(runs: list, path, facts=None) -> None:
    """BabelRS Fig. 2: the iterations each run trained before its loss went non-finite (a cross)
    or the schedule ended. `facts`: the runs' `run_facts`, when the caller has them already."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    facts = facts or [run_facts(r) for r in runs]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(facts) + 1.6))
    for i, f in enumerate(facts):
        stopped = not f["diverged"] and f["max_steps"] and f["steps"] >= f["max_steps"]  # cut, not survived
        ax.barh(i, f["steps"], color="tab:red" if f["diverged"] else "tab:gray" if stopped else "tab:blue",
                alpha=0.8, hatch="//" if stopped else None)
        if f["diverged"]:
            ax.plot(f["steps"], i, "x", color="black", ms=10, mew=2)
    ax.set_yticks(range(len(facts)), [f"{f['label']}, {f['amp'] if f['amp'] != 'off' else 'fp32'} ({f['run']})"
                                      for f in facts], fontsize=8)
    ax.set_xlabel("fine-tuning iterations")
    amp = {f["amp"] for f in facts} - {"off"}
    fig.suptitle(("iterations survived under " + "/".join(sorted(amp)) if amp else "iterations trained (no AMP)")
                 + "\nx: non-finite loss; hatched grey: stopped by --max-steps, not a survival",
                 fontsize=10)  # over the labels too
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


MUTDET_TERMS = {"classification": "loss_cls", "L1 box": "loss_bbox", "GIoU": "loss_giou", "angle": "loss_angle",
                "alignment (decoder)": "loss_embed", "alignment (DN)": "dn_loss_embed"}


def plot_mutdet_terms(run, path, window: int = 10) -> None:
    """MutDet's pre-training loss terms (its Fig. 4): one panel per term, the enhanced branch (`p_`)
    beside the auxiliary siamese branch, last decoder layer; the enhanced encoder's alignment too."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    log = [r for r in read_log(run) if "loss" in r]
    steps = np.array([r["step"] for r in log])
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, (title, key) in zip(axes.flat, MUTDET_TERMS.items()):
        for prefix, name in (("p_", "enhanced"), ("", "siamese")):
            y = np.array([r.get(prefix + key, np.nan) for r in log], dtype=float)
            if np.isfinite(y).any():
                ax.plot(steps, _smooth(y, window), lw=1.2, label=name)
        if key == "loss_embed" and any("p_enc_loss_embed" in r for r in log):
            ax.plot(steps, _smooth(np.array([r["p_enc_loss_embed"] for r in log]), window), lw=1.2, label="enhanced encoder")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(f"MutDet pre-training loss terms: {Path(run).name}")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_detections(run, path, image: str = "", modality: str = "", score_thr: float = 0.3, device="cpu") -> None:
    """A run's oriented detections (score >= score_thr, solid) drawn on an image with class names:
    `image` a file, or by default the first test image of the run's first (or `modality`) source,
    whose ground truth is drawn dashed beside them."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    model, sources = build_run_model(run, device)
    src = next((s for s in sources if s["modality"] == modality), sources[0]) if modality else sources[0]
    if image:
        item = dict(image=torch.from_numpy(datasets.load_image(image)).permute(2, 0, 1).contiguous(),
                    boxes=torch.zeros(0, 5), labels=torch.zeros(0, dtype=torch.long),
                    difficult=torch.zeros(0, dtype=torch.bool))
        name = Path(image).name
    else:
        split = datasets.load_detection_split(src["test"], src["modality"], src["classes"])
        item, name = split[0], split.samples[0].name
    shown = item["image"].permute(1, 2, 0).numpy()
    x = datasets.Compose([datasets.Resize(src["image_size"]), datasets.Normalize()])(item)
    batch = datasets.collate([x])
    with torch.no_grad():
        r = model.predict(batch["images"].to(device), batch["masks"].to(device), [src["modality"]],
                          [tuple(x["image"].shape[-2:])], [x["scale"]])[0]
    keep = r["scores"] >= score_thr
    fig, ax = plt.subplots(figsize=(7, 7))
    ax.imshow(shown)
    colours = plt.get_cmap("tab10")
    for box, label in zip(item["boxes"].double(), item["labels"].tolist()):  # ground truth, dashed
        poly = ro.obb2poly(box[None])[0].view(4, 2).numpy()
        ax.add_patch(plt.Polygon(poly, fill=False, ec=colours(label % 10), lw=1.0, ls="--"))
    for box, score, label in zip(r["boxes"][keep].cpu().double(), r["scores"][keep].tolist(), r["labels"][keep].tolist()):
        poly = ro.obb2poly(box[None])[0].view(4, 2).numpy()
        ax.add_patch(plt.Polygon(poly, fill=False, ec=colours(label % 10), lw=1.5))
        ax.text(poly[0, 0], poly[0, 1], f"{src['classes'][label]} {score:.2f}", color="white", fontsize=7,
                bbox=dict(fc=colours(label % 10), ec="none", pad=1, alpha=0.8))
    ax.set_title(f"{Path(run).name}: {name}, {int(keep.sum())} detections with score >= {score_thr} (solid), "
                 f"{len(item['boxes'])} ground truth (dashed)", fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def fig6_series(facts: list) -> dict:
    """BabelRS Fig. 6's two sweeps among scored runs fine-tuned from LVSA csia runs: "steps" holds
    (CSIA steps, mAP, H-mAP) at the τ shared by most step counts, "tau" holds (τ, mAP, H-mAP) at the
    step count shared by most τ values; each sorted, in percent; a sweep of fewer than 2 points is left out."""
    pts = {(f["csia_steps"], f["tau"]): (100 * f["metrics"]["overall_map"], 100 * f["metrics"]["h_map"])
           for f in facts if f.get("merge") == "lvsa" and f["metrics"]}
    series = {}
    for name, fixed, varied in (("steps", 1, 0), ("tau", 0, 1)):
        groups = {}
        for key, (m, h) in pts.items():
            groups.setdefault(key[fixed], []).append((key[varied], m, h))
        if groups:
            at, rows = max(groups.items(), key=lambda g: len(g[1]))
            if len(rows) >= 2:
                series[name] = (at, sorted(rows))
    return series


def plot_fig6(ours: dict, path) -> None:
    """BabelRS Fig. 6: mAP and H-mAP against the CSIA steps (left) and against τ (right); ours
    (`fig6_series` of our runs) on top, the paper's (eval.PAPER, read off the figure) below, as the
    scales differ by 40 points."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paper = {"steps": (6000, [(v[0], v[2], v[3]) for k, v in PAPER["babelrs-fig6"]["rows"].items() if k.startswith("steps")]),
             "tau": (20000, [(v[1], v[2], v[3]) for k, v in PAPER["babelrs-fig6"]["rows"].items() if k.startswith("τ")])}
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5))
    for row, (who, series) in enumerate((("ours", ours), ("paper", paper))):
        for col, (name, xlabel, fixed) in enumerate((("steps", "CSIA steps", "τ"), ("tau", "τ (annealing steps)", "steps"))):
            ax = axes[row][col]
            if name not in series:
                ax.text(0.5, 0.5, "no sweep among the runs", ha="center", va="center", transform=ax.transAxes)
                ax.set_axis_off()
                continue
            at, pts = series[name]
            x, m, h = zip(*pts)
            ax.plot(x, m, "o-", label="mAP")
            ax.plot(x, h, "s-", label="H-mAP")
            ax.set_title(f"{who}: {fixed} = {at:g}" + (", AMP" if who == "paper" and name == "tau" else ""), fontsize=10)
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle("BabelRS Fig. 6: pre-training steps and annealing duration τ")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


# the column each table's bar figure shows, and the paper's row each of our rows stands for
BAR_COLUMN = {"babelrs-table3": "H-mAP", "babelrs-table5": "H-mAP", "mutdet-table2": "AP50", "mutdet-10pct": "AP50"}
PAPER_ROW = {"babelrs-table5": {k: v for k, v in MERGE_NAMES.items()},
             "mutdet-table2": {"none": "-", "DETReg": "DETReg", "MutDet": "MutDet"}}


def plot_table_bars(name: str, table: dict, path) -> None:
    """One table as bars: ours (mean over seeds, error bar ± one standard deviation, each seed a dot)
    on the left, the paper's rows on the right; its own axis each, as the scales differ."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    column = BAR_COLUMN[name]
    c = table["columns"].index(column)
    groups = list(table["groups"].values())
    paper = PAPER[name]["rows"]
    paper_cols = _columns(name, PAPER[name].get("classes", ()))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw=dict(width_ratios=[1, 1]))
    ax = axes[0]
    for i, g in enumerate(groups):
        vals = np.array([v[c] for v in g["seeds"].values()], float)
        vals = vals[np.isfinite(vals)]
        if not len(vals):
            continue
        ax.bar(i, vals.mean(), yerr=vals.std(ddof=1) if len(vals) > 1 else 0, capsize=4, color="tab:blue", alpha=0.7)
        ax.plot(np.full(len(vals), i) + np.linspace(-0.15, 0.15, len(vals)), vals, "k.", ms=5)
    ax.set_xticks(range(len(groups)), [g["name"] for g in groups], rotation=20, ha="right", fontsize=8)
    seeds = max((len(g["seeds"]) for g in groups), default=0)
    ax.set_title(f"ours (tiny, {seeds} seed{'s' if seeds != 1 else ''}: mean ± std, dots = seeds)", fontsize=9)
    ax.set_ylabel(f"{column} (%)")
    ax.grid(axis="y", alpha=0.3)
    ax = axes[1]
    if paper and column in paper_cols:
        wanted = [PAPER_ROW.get(name, {}).get(g["key"]) for g in groups]
        rows = [r for r in wanted if r in paper] or list(paper)
        ax.bar(range(len(rows)), [paper[r][paper_cols.index(column)] for r in rows], color="tab:gray", alpha=0.7)
        ax.set_xticks(range(len(rows)), rows, rotation=20, ha="right", fontsize=8)
        lo = min(paper[r][paper_cols.index(column)] for r in rows)
        ax.set_ylim(max(0, lo - 5), None)
        ax.set_title(f"paper ({PAPER[name]['cite'].split(',')[0]}; axis from {max(0, lo - 5):.0f})", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    else:
        ax.text(0.5, 0.5, PAPER[name]["cite"], ha="center", va="center", wrap=True, fontsize=9, transform=ax.transAxes)
        ax.set_axis_off()
    fig.suptitle(f"{name}: {column}")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_runs(runs: list, out, image: str = "", device="cpu", score_thr: float = 0.3) -> list:
    """Every figure that applies to the runs given, into folder `out`: training-loss curves (BabelRS
    Fig. 4), loss and gradient norm (Fig. 7) and iterations survived (Fig. 2) for fine-tuning runs,
    Fig. 6 when they sweep the CSIA steps or τ,
    MutDet's loss terms for each mutdet run, and detections for each scored run."""
    import json
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    kinds = {}
    for r in runs:
        if not (Path(r) / "config.json").exists():
            raise datasets.DatasetError(f"{r}: not a run folder (no config.json)")
        kinds[r] = _stage_of(r)
    amp = {r: json.loads((Path(r) / "config.json").read_text()).get("amp", "off") != "off" for r in runs}
    for kind, prefix in (("finetune", ""), ("csia", "csia_")):  # loss scales differ: one figure per stage
        group = [r for r in runs if kinds[r] == kind]
        if group:
            written.append(out / f"{prefix}loss.png")
            plot_curves(group, written[-1], ("loss",), title=f"{kind} training loss")
        if any(amp[r] for r in group):  # Fig. 7: loss and gradient norm of runs trained with AMP
            written.append(out / f"{prefix}loss_grad_norm.png")
            plot_curves(group, written[-1], ("loss", "grad_norm"), title=f"{kind} loss and gradient norm (AMP runs: "
                        + ", ".join(Path(r).name for r in group if amp[r]) + ")")
    tuned = [r for r in runs if kinds[r] == "finetune"]
    facts = [run_facts(r) for r in tuned]
    if tuned:
        plot_survival(tuned, out / "iterations.png", facts)
        written.append(out / "iterations.png")
    fig6 = fig6_series(facts)
    if fig6:  # a steps or τ sweep of CSIA among the runs
        plot_fig6(fig6, out / "fig6.png")
        written.append(out / "fig6.png")
    for r in runs:
        if kinds[r] == "mutdet":
            written.append(out / f"mutdet_terms_{Path(r).name}.png")
            plot_mutdet_terms(r, written[-1])
        if kinds[r] == "finetune" and (Path(r) / "model.safetensors").exists():
            written.append(out / f"detections_{Path(r).name}.png")
            plot_detections(r, written[-1], image, score_thr=score_thr, device=device)
    return written


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def format_table(names, ap, thrs) -> str:
    header = f"{'class':<24}" + "".join(f"{'AP' + str(int(round(t * 100))):>9}" for t in thrs)
    rows = [header, "-" * len(header)]
    for c, name in enumerate(names):
        rows.append(f"{name:<24}" + "".join(f"{ap[t, c] * 100:9.2f}" if np.isfinite(ap[t, c]) else f"{'-':>9}"
                                          for t in range(len(thrs))))
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="a run folder of train.py: score its checkpoint on each source's test split")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="for --run")
    p.add_argument("--dets", help="folder of DOTA Task1_<class>.txt files")
    p.add_argument("--ann", help="annotation folder (DOTA labelTxt/ or annfiles/, or DIOR-R xml) of the scored split")
    p.add_argument("--metric", choices=["area", "11point"], default="11point",
                   help="VOC area AP or VOC07 11-point AP (DOTA Task1, MutDet); default 11point")
    p.add_argument("--iou", type=float, nargs="+", default=[0.5], help="IoU thresholds (default 0.5)")
    p.add_argument("--strict", action="store_true", help="match when IoU > thr, as the DOTA devkit (default >=)")
    p.add_argument("--table", choices=TABLES, help="collect the metrics.json of RUN folders into a paper's table")
    p.add_argument("--plot", action="store_true", help="draw the figures of the RUN folders into --out")
    p.add_argument("runs", nargs="*", metavar="RUN", help="run folders for --table / --plot")
    p.add_argument("--out", default="", help="--table: also write OUT.md and OUT.csv; --plot: folder (default figures)")
    p.add_argument("--image", default="", help="--plot: draw detections on this image (default the first test image)")
    p.add_argument("--predict", nargs="+", metavar="PATH", help="with --run: detect on these images or folders of "
                   "images (any size; large scenes are cut into patches and merged); writes drawings and DOTA "
                   "Task1 files into --out (default predictions)")
    p.add_argument("--modality", default="", help="--predict: the head set of a multi-modal run (rgb, sar or ir)")
    p.add_argument("--score", type=float, default=0.3, help="--predict, --plot: score threshold of the drawn "
                   "detections (default 0.3)")
    p.add_argument("--patch", type=int, default=0, help="--predict: patch size (default the run's training size)")
    p.add_argument("--gap", type=int, default=200, help="--predict: overlap of patches in px (default 200, DOTA)")
    p.add_argument("--zip", action="store_true", help="--predict: also write submission.zip for the DOTA server")
    p.add_argument("--batch", type=int, default=4, help="--predict: patches per forward pass (default 4)")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.predict:
        if not args.run:
            p.error("--predict needs --run RUN (the trained detector)")
        try:
            summary = predict_images(args.run, args.predict, args.out or "predictions", args.modality, args.score,
                                     args.patch, args.gap, args.zip, args.device, args.batch)
        except datasets.DatasetError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"{summary['images']} images, {summary['detections']} detections (score >= {TASK1_SCORE}) in "
              f"{len(summary['task1'])} Task1 files, {summary['drawn']} drawn (score >= {args.score}) in "
              f"{args.out or 'predictions'}" + (f"; {summary['zip']}" if "zip" in summary else ""))
        return 0
    if args.table or args.plot:
        if not args.runs:
            p.error("give the run folders after --table NAME / --plot")
        try:
            if args.table:
                table = format_table_runs(args.table, args.runs)
                print(table["markdown"])
                if args.out:
                    stem = args.out.removesuffix(".md").removesuffix(".csv")
                    datasets.atomic_write_text(f"{stem}.md", table["markdown"])
                    datasets.atomic_write_text(f"{stem}.csv", table["csv"])
            else:
                for path in plot_runs(args.runs, args.out or "figures", args.image, args.device, args.score):
                    print(f"wrote {path}")
        except datasets.DatasetError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    if args.run:
        try:
            evaluate_run(args.run, args.device)
        except datasets.DatasetError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    if not (args.dets and args.ann):
        p.error("give --run DIR, or --dets DIR and --ann DIR")
    try:
        if not Path(args.dets).is_dir():
            raise datasets.DatasetError(f"{args.dets}: no such folder (--dets takes the folder of Task1_<class>.txt files)")
        split = datasets.load_detection_split(args.ann, need_images=False)
        if not any((Path(args.dets) / f"Task1_{c}.txt").exists() for c in split.classes):
            raise datasets.DatasetError(f"{args.dets}: no Task1_<class>.txt file for any class of {args.ann} "
                                        f"({', '.join(split.classes[:5])}, ...)")
        by_image = read_dota_task1(args.dets, split.classes)
        known = {s.name for s in split.samples}
        unknown = sorted(set(by_image) - known)
        if unknown:
            raise datasets.DatasetError(f"{args.dets}: detections for images not in {args.ann}: {unknown[:5]}")
        dets = [by_image.get(s.name, [np.zeros((0, 6))] * len(split.classes)) for s in split.samples]
        annots = [dict(boxes=s.boxes, labels=s.labels, difficult=s.difficult) for s in split.samples]
    except datasets.DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res = eval_rbbox_map(dets, annots, args.iou, args.metric, args.strict)
    print(f"AP in % ({args.metric}), {len(split.samples)} images")
    print(format_table(split.classes, res["ap"], args.iou))
    print(f"{'mAP':<24}" + "".join(f"{m * 100:9.2f}" for m in res["map"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
