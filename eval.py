"""Scoring and prediction: the metrics of both papers, DOTA result files, scoring a run, scene
prediction and drawings, and a command line.

- `eval_rbbox_map`: rotated VOC AP (area or 11-point) at any list of IoU thresholds, with the DOTA
  devkit's greedy matching and difficult handling (MutDet: VOC07 11-point AP50 / AP75; BabelRS:
  area AP at 0.50:0.05:0.95 for DOTA and DroneVehicle).
- `coco_bbox_map`: COCO box AP through pycocotools (BabelRS's SAR metric).
- `h_map`, `overall_map`: BabelRS Sec. 3.4: the harmonic mean of the per-modality mAPs and the mean
  over the union of all modalities' categories.
- DOTA Task1 result files (`Task1_<class>.txt`), written and read.
- `evaluate_run`: scores a train.py run folder on the test split of each of its sources.
- `predict_images`: detection on any images (large scenes cut into patches and merged), drawn and
  written as Task1 files; `plot_detections`: a run's detections on one image.
- `attention_of`, `mutdet_attention`, `draw_attention`: where the last decoder layer's rotated
  deformable attention samples, and for MutDet pre-training runs each query's nearest objects.

The papers' tables and figures over run folders are in tables.py.

Command line: `python eval.py --run DIR` scores a run and writes `DIR/metrics.json`;
`python eval.py --run DIR --predict PATH... [--out DIR]` detects on images;
`python eval.py --dets DIR --ann DIR [--metric 11point|area] [--iou 0.5 0.75]` scores DOTA Task1
files against a DOTA (or DIOR-R) annotation folder.

May import: detection, babelrs, mutdet, datasets, rotated_ops (DESIGN.md); never train or tables.
"""
import argparse
import contextlib
import io
import math
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


def eval_rbbox_map(dets, annots, iou_thrs=(0.5,), metric="area", strict=False, curves: bool = False) -> dict:
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
        over the other classes, mean = the mean of map over thresholds, num_gts (C,), num_dets (C,));
        with `curves`, also pr {(t, c): (recall, precision)} arrays along the ranked detections.

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
    pr = {}
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
            if curves:
                pr[t, c] = (recall, precision)
    valid = num_gts > 0
    mean_ap = np.nanmean(ap[:, valid], axis=1) if valid.any() else np.full(T, np.nan)
    out = dict(ap=ap, map=mean_ap, mean=float(np.mean(mean_ap)), num_gts=num_gts, num_dets=num_dets)
    return dict(out, pr=pr) if curves else out


def confusion_matrix(dets, annots, num_classes: int, iou_thr: float = 0.5, score_thr: float = 0.3) -> np.ndarray:
    """(C + 1, C + 1) counts, rows the ground-truth class, columns the detected class, the last row and
    column background: per image, the detections at or above `score_thr` of every class, by decreasing
    score, each take the free non-difficult ground truth of highest IoU >= `iou_thr` whatever its class
    (a hit on the diagonal, a confusion off it); a detection left over is a false alarm (background
    row), a ground truth left over a miss (background column)."""
    C = num_classes
    m = np.zeros((C + 1, C + 1), np.int64)
    for i, a in enumerate(annots):
        keep = ~np.asarray(a.get("difficult", np.zeros(len(a["labels"]), bool)), bool).reshape(-1)
        gt = np.asarray(a["boxes"], np.float64).reshape(-1, 5)[keep]
        gl = np.asarray(a["labels"], np.int64).reshape(-1)[keep]
        d = [np.c_[np.asarray(x, np.float64).reshape(-1, 6), np.full(len(np.asarray(x).reshape(-1, 6)), c)]
             for c, x in enumerate(dets[i] if i < len(dets) else [])]
        d = np.concatenate(d) if d else np.zeros((0, 7))
        d = d[d[:, 5] >= score_thr]
        d = d[np.argsort(-d[:, 5], kind="stable")]
        iou = (ro.box_iou_rotated(torch.from_numpy(d[:, :5]), torch.from_numpy(gt)).numpy()
               if len(d) and len(gt) else np.zeros((len(d), len(gt))))
        taken = np.zeros(len(gt), bool)
        for k in range(len(d)):
            free = np.where(taken, -1.0, iou[k])
            g = int(np.argmax(free)) if len(gt) else -1
            if g >= 0 and free[g] >= iou_thr:
                taken[g] = True
                m[gl[g], int(d[k, 6])] += 1
            else:
                m[C, int(d[k, 6])] += 1
        for g in np.nonzero(~taken)[0]:
            m[gl[g], C] += 1
    return m


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


def rotated_coco_ap(dets, annots, num_classes=None, iou_thrs=COCO_IOUS, max_dets=100) -> dict:
    """COCO-style AP with exact rotated IoU: COCOeval's matching and 101-point interpolation (area
    "all", `max_dets` a class and image), on oriented boxes. ARS-DETR's argument: AP50 hides angle
    errors that AP75 and AP@[.5:.95] show.

    As COCOeval: per image and class, detections by decreasing score each take the unmatched ground
    truth of highest IoU >= the threshold, preferring non-difficult ones; a difficult ground truth
    is COCO's crowd region (IoU is the intersection over the detection's area, it may match many
    detections, and what matches it is ignored). Precision is made monotone and read at recall
    0, 0.01, ..., 1; a class without non-difficult ground truth has no AP (NaN).

    Args:
        dets, annots: as `eval_rbbox_map`.
    Returns:
        dict(ap (T, C), map = AP@[.5:.95] (mean over classes with ground truth), ap50, ap75).
    """
    if num_classes is None:
        num_classes = max([len(d) for d in dets] + [int(np.max(a["labels"])) + 1 for a in annots if len(a["labels"])] + [1])
    thrs = np.asarray(iou_thrs, np.float64)
    rec_thrs = np.linspace(0.0, 1.0, 101)
    ap = np.full((len(thrs), num_classes), np.nan)
    for c in range(num_classes):
        scores, matched, ignored, npig = [], [], [], 0
        for i, a in enumerate(annots):
            labels = np.asarray(a["labels"]).reshape(-1)
            gt = torch.as_tensor(np.asarray(a["boxes"], np.float64).reshape(-1, 5)[labels == c])
            crowd = np.asarray(a.get("difficult", np.zeros(len(labels), bool)), bool).reshape(-1)[labels == c]
            order = np.argsort(crowd, kind="mergesort")  # ignored ground truth last, as COCOeval
            gt, crowd = gt[order], crowd[order]
            npig += int((~crowd).sum())
            d = np.asarray(dets[i][c] if i < len(dets) and c < len(dets[i]) else np.zeros((0, 6)), np.float64).reshape(-1, 6)
            d = d[np.argsort(-d[:, 5], kind="mergesort")][:max_dets]
            if len(d) and len(gt):
                iou = ro.box_iou_rotated(torch.from_numpy(d[:, :5]), gt).numpy()  # (D, G)
                iof = ro.box_iou_rotated(torch.from_numpy(d[:, :5]), gt, mode="iof").numpy()
                iou = np.where(crowd[None], iof, iou)
            else:
                iou = np.zeros((len(d), len(gt)))
            dtm = np.zeros((len(thrs), len(d)), bool)
            dtig = np.zeros((len(thrs), len(d)), bool)
            for t, thr in enumerate(thrs):
                gtm = np.zeros(len(gt), bool)
                for k in range(len(d)):
                    best, m = min(thr, 1 - 1e-10), -1
                    for g in range(len(gt)):
                        if gtm[g] and not crowd[g]:
                            continue
                        if m > -1 and not crowd[m] and crowd[g]:
                            break
                        if iou[k, g] < best:
                            continue
                        best, m = iou[k, g], g
                    if m > -1:
                        dtm[t, k], dtig[t, k], gtm[m] = True, crowd[m], True
            scores.append(d[:, 5])
            matched.append(dtm)
            ignored.append(dtig)
        if npig == 0:
            continue
        s = np.concatenate(scores) if scores else np.zeros(0)
        order = np.argsort(-s, kind="mergesort")
        dtm, dtig = np.concatenate(matched, 1)[:, order], np.concatenate(ignored, 1)[:, order]
        for t in range(len(thrs)):
            tp = np.cumsum(dtm[t] & ~dtig[t])
            fp = np.cumsum(~dtm[t] & ~dtig[t])
            rc = tp / npig
            pr = tp / (tp + fp + np.spacing(1))
            pr = np.maximum.accumulate(pr[::-1])[::-1] if len(pr) else pr  # monotone, as COCOeval
            idx = np.searchsorted(rc, rec_thrs, side="left")
            q = np.where(idx < len(pr), pr[np.minimum(idx, len(pr) - 1)] if len(pr) else 0.0, 0.0)
            ap[t, c] = q.mean()
    valid = ~np.isnan(ap[0])
    mean = lambda x: float(x[valid].mean()) if valid.any() else 0.0  # noqa: E731
    t50, t75 = (int(np.argmin(np.abs(thrs - v))) for v in (0.5, 0.75))
    return dict(ap=ap, map=mean(ap.mean(0)), ap50=mean(ap[t50]), ap75=mean(ap[t75]))


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


def run_stage(run: Path) -> str:
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
    stage = run_stage(run)
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


# The released checkpoints of the presets that claim a paper's setting, scored or used without a run
# folder (eval.py --weights FILE --preset NAME): the test size and class order of the preset of the same
# name in train.py, and the published number to compare with.
DOTA_V1_CLASSES = datasets.DOTA_V1_CLASSES  # the server's Task1 class names
DIOR_R_CLASSES = datasets.CLASS_SETS["dior-r"]  # MutDet 097ce90 configs/Step3_Finetuning/base_settings_DIOR.py, in its order
RELEASED = {
    "ars-detr-dota": dict(image_size=1024, classes=DOTA_V1_CLASSES, metric="voc07_ap50", paper=73.42,
                          cite="ARS-DETR README (0d96c5e), dn_arw_arm_arcsl_rdetr_r50_dota: 73.42 AP50 on the DOTA-v1.0 "
                               "test server"),
    "paper": dict(image_size=800, classes=DIOR_R_CLASSES, metric="voc07_ap50", paper=65.7,
                  cite="MutDet Tab. 2, ARS-DETR R-50 without pre-training: 65.7 AP50 (VOC07) on DIOR-R test"),
}


def build_weights_model(path: str, preset: str, device="cpu"):
    """A detector from a weight file alone (an mmrotate `.pth` of ARS-DETR / MutDet fine-tuning, or a
    `.safetensors` of this project) at a paper preset: the architecture read off the tensors (width,
    layers, FFN, queries, classes, ResNet depth; 8 heads as both papers), the test size and class
    order from RELEASED. Returns (model, sources) as `build_run_model`."""
    import babelrs
    import detection
    import mutdet
    if preset not in RELEASED:
        raise datasets.DatasetError(f"--preset {preset}: --weights takes one of {', '.join(RELEASED)}")
    try:
        state = detection.read_weights(path)
    except (ValueError, FileNotFoundError) as e:
        raise datasets.DatasetError(str(e)) from None
    ours = detection.mmrotate_to_ours(state)[0] if detection.is_mmrotate_state(state) else state
    if not detection.is_mmrotate_state(state):  # our names: the first head set stands for the architecture
        prefix = next((k.split(".")[0] + "." + k.split(".")[1] + "." for k in ours if k.startswith("heads.")), None)
        ours = {("H." + k[len(prefix):] if prefix and k.startswith(prefix) else k): v for k, v in ours.items()}
    try:
        dim = ours["H.level_embed"].shape[1]
        classes_n = ours["H.cls_branches.0.weight"].shape[0]
        arch = dict(dim=dim, heads=8, levels=4, enc_layers=len({k.split(".")[2] for k in ours if k.startswith("H.encoder.")}),
                    dec_layers=len({k.split(".")[2] for k in ours if k.startswith("H.decoder.")}),
                    ffn=ours["H.encoder.0.ffn.net.0.weight"].shape[0], num_queries=ours["H.query_embed.weight"].shape[0],
                    backbone="resnet50" if any(".conv3." in k for k in ours if k.startswith("backbone.")) else "resnet18")
        arch["points"] = ours["H.encoder.0.self_attn.attention_weights.weight"].shape[0] // (arch["heads"] * arch["levels"])
    except KeyError as e:
        raise datasets.DatasetError(f"{path}: not a rotated DETR checkpoint (no {e.args[0]})") from None
    spec = RELEASED[preset]
    names = list(spec["classes"])
    if classes_n != len(names):
        raise datasets.DatasetError(f"{path}: {classes_n} classes, while --preset {preset} scores {len(names)}")
    sources = [dict(modality="rgb", classes=names, box_type="obb", image_size=spec["image_size"], test="")]
    model = babelrs.build_detector(sources=[dict(modality="rgb", classes=names, box_type="obb")], resnet="",
                                   frozen_bn=True, dropout=0.0, num_dn_queries=0, gn_groups=32, **arch)
    try:
        if detection.is_mmrotate_state(state):
            mutdet.load_official(model, path, state)
        else:
            detection.load_init(model, path, {k.replace("H.", "heads.rgb.", 1) if k.startswith("H.") else k: v
                                               for k, v in ours.items()}, strict=False)
    except ValueError as e:
        raise datasets.DatasetError(str(e)) from None
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
        coco = rotated_coco_ap(dets, annots, len(classes))  # COCO's matching and 101 recall points, rotated IoU
        out.update(coco_map=coco["map"], coco_ap50=coco["ap50"], coco_ap75=coco["ap75"])
        out["coco_per_class"] = coco["ap"].mean(0)
    voc07 = eval_rbbox_map(dets, annots, (0.5, 0.75), "11point")
    out["voc07_ap50"], out["voc07_ap75"] = float(voc07["map"][0]), float(voc07["map"][1])

    def named(values):
        return {name: (float(v) if np.isfinite(v) else None) for name, v in zip(classes, values)}

    out["per_class"] = dict(ap50=named(per_50), ap75=named(per_75), map=named(per_map),
                            voc07_ap50=named(voc07["ap"][0]), voc07_ap75=named(voc07["ap"][1]))
    if box_type == "hbb":  # COCO's own AP is the main number here
        out.update(coco_map=out["map"], coco_ap50=out["ap50"], coco_ap75=out["ap75"])
        out["per_class"]["coco_map"] = out["per_class"]["map"]
    else:
        out["per_class"]["coco_map"] = named(out.pop("coco_per_class"))
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


def parse_tta(spec: str) -> list:
    """`--tta flip,rot90,scale=0.5/1.0/1.5` -> the views, each (kind, value): the image itself, then
    horizontal and vertical flips ("flip"), turns by 90, 180 and 270 degrees ("rot90"), and resizes by
    each factor but 1 ("scale=...")."""
    views = [("none", 0)]
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, value = item.partition("=")
        if name == "flip":
            views += [("hflip", 0), ("vflip", 0)]
        elif name == "rot90":
            views += [("rot90", k) for k in (1, 2, 3)]
        elif name == "scale":
            try:
                views += [("scale", float(s)) for s in value.split("/") if float(s) != 1.0]
            except ValueError:
                raise datasets.DatasetError(f"--tta {spec}: scale=a/b/c takes numbers, got {value!r}") from None
        else:
            raise datasets.DatasetError(f"--tta {spec}: {item!r} is none of flip, rot90, scale=a/b/c")
    return views


def _view(image: np.ndarray, kind: str, value) -> tuple:
    """The image of a view and the map of its pixel coordinates back to the image's, (N, 2) -> (N, 2)."""
    H, W = image.shape[:2]
    if kind == "hflip":
        return image[:, ::-1], lambda p: np.c_[W - p[:, 0], p[:, 1]]
    if kind == "vflip":
        return image[::-1], lambda p: np.c_[p[:, 0], H - p[:, 1]]
    if kind == "rot90":  # np.rot90 turns counter-clockwise: (x, y) -> (y, W - x) for one turn
        def back(p, k=value):
            q = p.copy()
            size = (W, H) if k % 2 == 0 else (H, W)  # the view's (width, height)
            for _ in range(k):  # undo one counter-clockwise turn at a time
                vw, vh = size
                q = np.c_[vh - q[:, 1], q[:, 0]]
                size = (vh, vw)
            return q
        return np.rot90(image, value), back
    if kind == "scale":
        from PIL import Image
        w, h = max(1, round(W * value)), max(1, round(H * value))
        return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR)), \
            lambda p: p * np.array([W / w, H / h])
    return image, lambda p: p


def detect_scene_tta(detect, image: np.ndarray, size: int, gap: int, num_classes: int, views: list,
                     batch_size: int = 4, iou_thr: float = 0.1, on_batch=None) -> list:
    """`detect_scene` on every view of `parse_tta` (the image flipped, turned, resized), the boxes of
    each mapped back through their corners (angles included, as le90 boxes again) and merged with
    class-wise rotated NMS at `iou_thr`, as the patches of a scene are."""
    merged = [[] for _ in range(num_classes)]
    for kind, value in views:
        shown, back = _view(image, kind, value)
        dets = detect_scene(detect, np.ascontiguousarray(shown), size, gap, num_classes, batch_size, iou_thr, on_batch)
        for c, d in enumerate(dets):
            d = np.asarray(d, np.float64).reshape(-1, 6)
            if len(d):
                corners = ro.obb2poly(torch.from_numpy(d[:, :5])).numpy().reshape(-1, 2)  # (4K, 2) view pixels
                boxes = ro.poly2obb(torch.from_numpy(back(corners).reshape(-1, 8))).numpy()
                merged[c].append(np.c_[boxes, d[:, 5]])
    out = []
    for parts in merged:
        d = np.concatenate(parts) if parts else np.zeros((0, 6))
        if len(d) > 1:
            keep = ro.nms_rotated(torch.from_numpy(d[:, :5]), torch.from_numpy(d[:, 5]), iou_thr).numpy()
            d = d[keep]
        out.append(d)
    return out


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


@torch.no_grad()
def attention_of(model, modality: str, image: np.ndarray, image_size: int, k: int, device="cpu") -> dict:
    """Where the last decoder layer's rotated deformable attention looks, for the `k` queries of the
    highest class score: dict(queries (k,), scores (k,), corners (k, 4, 2) of the reference box whose
    frame turns the sampling grid, points (k, H, L, P, 2), weights (k, H, L, P)), in the pixels of
    `image` (H, W, 3) uint8, resized as at test time (longer side `image_size`). The box is turned in
    the normalised coordinates of the padded feature map, as the sampler does (ARS-DETR), so on a
    non-square map it is a parallelogram in pixels: its corners are mapped, not its (w, h, θ)."""
    head = model.heads[modality]
    tf = datasets.Compose([datasets.Resize(image_size), datasets.Normalize()])
    item = tf(dict(image=torch.from_numpy(image).permute(2, 0, 1).contiguous(), boxes=torch.zeros(0, 5),
                   labels=torch.zeros(0, dtype=torch.long), difficult=torch.zeros(0, dtype=torch.bool)))
    batch = datasets.collate([item])
    seen = {}

    def capture(module, args):  # the cross-attention's inputs: query, query_pos, value, mask, reference, shapes, angle
        query, pos, _, _, reference, shapes, angle = args[:7]
        seen["weights"], seen["points"] = module.sampling(query + pos, reference, shapes, angle)
        seen["reference"], seen["angle"] = reference[:, :, 0], angle
    handle = head.decoder[-1].cross_attn.register_forward_pre_hook(capture)
    try:
        out = model(batch["images"].to(device), batch["masks"].to(device), [modality])["outputs"][modality]
    finally:
        handle.remove()
    scores = out["pred_logits"][0].float().sigmoid().max(-1).values  # (Q,)
    top = scores.topk(min(k, len(scores))).indices
    H_pad, W_pad = batch["images"].shape[-2:]
    sy, sx = item["scale"]  # resized / original, per axis
    to_pixels = torch.tensor([W_pad / sx, H_pad / sy], dtype=torch.float64)  # normalised -> original pixels
    ref = seen["reference"][0, top].double().cpu()  # (k, 4) cx, cy, w, h of the padded map
    angle = seen["angle"][0, top].double().cpu() if seen["angle"] is not None else torch.zeros(len(top), dtype=torch.float64)
    corners = ro.obb_corners(torch.cat([ref, angle[:, None]], 1)) * to_pixels  # (k, 4, 2)
    return dict(queries=top.cpu(), scores=scores[top].cpu(), corners=corners,
                points=seen["points"][0, top].double().cpu() * to_pixels, weights=seen["weights"][0, top].float().cpu())


@torch.no_grad()
def mutdet_attention(run, name: str, k: int, top: int = 3, device="cpu") -> tuple:
    """`eval.py --run MUTDET_RUN --predict IMAGE --attention K` on an image of the run's sam cache: the
    enhanced branch of the pre-trainer on the image and its cached object embeddings. For the K
    queries of the highest class score: what `attention_of` gives (reference box, sampling points of
    the last decoder layer, on the enhanced memory) and, per query, the `top` objects whose enhanced
    embeddings O_enh are nearest (cosine) to its predicted embedding Ẑ = feature_embed(hidden), the
    pair the contrastive alignment pulls together. Returns (image (H, W, 3) uint8, that dict with
    objects (N, 4, 2) corners and links (K, top) object indices and cosines (K, top))."""
    import json
    import types

    import torch.nn.functional as F
    from safetensors.torch import load_file

    import mutdet
    run = Path(run)
    cfg = types.SimpleNamespace(**json.loads((run / "config.json").read_text()))
    data = mutdet.PseudoLabels(cfg.data, class_agnostic=cfg.pseudo_classes == 1)
    index = next((i for i, r in enumerate(data.records) if r["name"] == name), None)
    if index is None:
        raise datasets.DatasetError(f"{name}: not an image of {cfg.data}, the sam cache {run} pre-trained on; the "
                                    "enhanced branch needs the image's object embeddings from it")
    model = mutdet.build_pretrainer(cfg, data.classes, data.embed_dim, "", data.modality)
    model.load_state_dict(load_file(str(run / "model.safetensors")))
    model = model.to(device).eval()
    item = data[index]
    image = item["image"].permute(1, 2, 0).numpy()
    head, det = model.head, model.detector
    feed = {}

    def enhanced_forward(images, masks, modalities):  # attention_of's model call, through the enhanced branch
        feats = det.neck(det.backbone(images))
        level_masks = [F.interpolate(masks[None].float(), size=f.shape[-2:])[0].bool() for f in feats]
        out, objects, _ = model.enhanced_pass(head.encode(feats, level_masks), [feed["embeds"].to(images.device)])
        feed["hidden"], feed["objects"] = out["hidden"][0], objects[0]
        return dict(outputs={modalities[0]: out})
    embeds = item["embeds"].float()
    feed["embeds"] = embeds
    att = attention_of(_Callable(enhanced_forward, {data.modality: head}), data.modality, image, cfg.image_size, k, device)
    z = F.normalize(model.feature_embed(feed["hidden"][att["queries"].to(device)]), dim=-1)  # (K, D)
    sims = z @ F.normalize(feed["objects"], dim=-1).T  # (K, N)
    cos, idx = sims.topk(min(top, sims.shape[1]), dim=-1)
    att.update(objects=ro.obb_corners(item["boxes"].double()), links=idx.cpu(), link_cos=cos.cpu())
    return image, att


class _Callable:
    """A model-like object for `attention_of`: `heads` for the hook, and a call that runs `fn`."""

    def __init__(self, fn, heads):
        self.fn, self.heads = fn, heads

    def __call__(self, *args):
        return self.fn(*args)


def draw_attention(image: np.ndarray, att: dict, path, strides=None) -> None:
    """One figure per image (at its own size, or 768 px on the longer side if smaller): each query's
    reference box (white, with its score) and its sampling points at every level (one colour a level),
    each point's area proportional to its attention weight (a head's weights over its L x P points sum
    to 1); for MutDet (`mutdet_attention`) also the query's nearest objects (cyan, dashed), each linked
    to it with the cosine of their embeddings."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    H, W = image.shape[:2]
    dpi, zoom = 100, max(1.0, 768 / max(H, W))  # a small image is drawn larger, so that points and labels read
    fig = plt.figure(figsize=(W * zoom / dpi, H * zoom / dpi), dpi=dpi)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.imshow(image, interpolation="nearest")
    ax.set_xlim(0, W), ax.set_ylim(H, 0), ax.axis("off")
    scale = max(H, W) * zoom / 800  # marks grow with the canvas, as the detections' lines do
    colours = matplotlib.colormaps["tab10"]
    levels = att["points"].shape[2]
    for q in range(len(att["queries"])):
        pts, w = att["points"][q], att["weights"][q]  # (H, L, P, 2), (H, L, P)
        for lvl in range(levels):
            xy = pts[:, lvl].reshape(-1, 2).numpy()
            ax.scatter(xy[:, 0], xy[:, 1], s=w[:, lvl].reshape(-1).numpy() * 400 * scale ** 2, color=colours(lvl),
                       alpha=0.75, linewidths=0,
                       label=(f"level {lvl}" + (f" (stride {strides[lvl]})" if strides else " (finest)" * (lvl == 0)))
                       if q == 0 else None)
        corners = att["corners"][q].numpy()
        ax.add_patch(matplotlib.patches.Polygon(corners, closed=True, fill=False, edgecolor="white", linewidth=1.2 * scale))
        ax.text(*corners[0], f"{float(att['scores'][q]):.2f}", color="white", fontsize=7 * scale, va="bottom")
        for j, c in zip(att.get("links", [[]] * (q + 1))[q], att.get("link_cos", [[]] * (q + 1))[q]):
            obj = att["objects"][int(j)].numpy()  # MutDet: an object nearest to the query's embedding
            ax.add_patch(matplotlib.patches.Polygon(obj, closed=True, fill=False, edgecolor="cyan", linestyle="--",
                                                    linewidth=1.0 * scale))
            (x0, y0), (x1, y1) = corners.mean(0), obj.mean(0)
            ax.plot([x0, x1], [y0, y1], color="cyan", linewidth=0.8 * scale, alpha=0.8)
            ax.text((x0 + x1) / 2, (y0 + y1) / 2, f"{float(c):.2f}", color="cyan", fontsize=6 * scale)
    ax.legend(loc="upper right", fontsize=7 * scale, markerscale=1.0, framealpha=0.6)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


MAX_LABELS = 100  # class-and-score labels drawn on one image (the highest scores); every box is drawn


def draw_detections(image: np.ndarray, dets: list, classes: list, path, score_thr: float = 0.3) -> int:
    """Oriented boxes with class names and scores (score >= score_thr) drawn on the image at its
    own resolution; lines and labels scale with the image (1 px per 1000 px of its longer side), so
    a 4000 x 4000 scene stays readable. Only the MAX_LABELS highest-scoring boxes get a label, and a
    label stays inside the image. Returns the number of boxes drawn."""
    from PIL import Image, ImageDraw, ImageFont
    import matplotlib
    canvas = Image.fromarray(image).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    H, W = image.shape[:2]
    scale = max(1, round(max(H, W) / 1000))
    font = ImageFont.load_default(size=10 * scale)
    palette = matplotlib.colormaps["tab10"]
    shown = []  # (score, class, box)
    for c, d in enumerate(dets):
        d = np.asarray(d, np.float64).reshape(-1, 6)
        shown += [(float(b[5]), c, b) for b in d[d[:, 5] >= score_thr]]
    shown.sort(key=lambda s: -s[0])
    polys = ro.obb2poly(torch.from_numpy(np.array([b[:5] for _, _, b in shown]).reshape(-1, 5))).numpy()
    for k in range(len(shown) - 1, -1, -1):  # lowest first, so the best boxes and labels lie on top
        score, c, _ = shown[k]
        colour = tuple(int(255 * v) for v in palette(c % 10)[:3])
        pts = [tuple(p) for p in polys[k].reshape(4, 2)]
        draw.line(pts + pts[:1], fill=colour, width=scale)
        if k >= MAX_LABELS:
            continue
        label = f"{classes[c]} {score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        w, h = right - left + 2 * scale, bottom - top + 2 * scale
        x = min(max(0, min(p[0] for p in pts)), max(0, W - w))  # above the box, inside the image
        y = min(max(h, min(p[1] for p in pts)), H)
        draw.rectangle((x, y - h, x + w, y), fill=colour)
        draw.text((x + scale - left, y - h + scale - top), label, fill=(255, 255, 255), font=font)
    tmp = Path(path).with_suffix(".tmp.png")
    canvas.save(tmp)
    tmp.replace(path)
    return len(shown)


def default_gap(patch: int) -> int:
    """Overlap of prediction patches: DOTA's split overlaps 1024-px patches by 200 px; other patch sizes
    keep that fraction (a 256-px patch overlaps by 50)."""
    return round(patch * 200 / 1024)


def predict_images(run, paths: list, out, modality: str = "", score_thr: float = 0.3, patch: int = 0, gap: int = -1,
                   make_zip: bool = False, device="cpu", batch_size: int = 4, tta: str = "", attention: int = 0) -> dict:
    """`eval.py --run RUN --predict PATH...`: detect on every image (large ones cut into patches of
    the run's training size, or `patch`, with `gap`, and merged), write `<image>.png` drawings and,
    for the whole set, DOTA Task1 files `Task1_<class>.txt` (detections with score >= TASK1_SCORE),
    with `make_zip` also `submission.zip` for the DOTA evaluation server. A negative `gap` follows
    the patch size as DOTA's 200 px follow its 1024 (`default_gap`). `tta` (`parse_tta`) adds flipped,
    turned or resized views of every image, merged as patches are (`detect_scene_tta`). `attention` K
    also draws `<image>_attention.png`: the last decoder layer's sampling points of the K queries of
    the highest score (`attention_of`, `draw_attention`).

    Nothing is written over an input: an `out` folder holding an input image, or two inputs of one
    name (Task1 files name images by their stem), is refused before anything runs. An image that
    cannot be read is skipped with a one-line warning and listed in `skipped`; the others are
    detected and written. Task1 corners are not clipped to the image, as in the DOTA devkit's and
    mmrotate's merging (clipping a corner would change the rotated box the server scores).
    Returns dict(images, detections (in the Task1 files), drawn, max_score, task1, skipped[, zip])."""
    from tqdm import tqdm
    files = image_files(paths)
    out = Path(out)
    inputs = {f.resolve().parent for f in files}
    if out.resolve() in inputs:
        raise datasets.DatasetError(f"--out {out}: holds input images, which the drawings would overwrite; "
                                    "choose another folder")
    stems = {}
    for f in files:
        stems.setdefault(f.stem, []).append(f)
    clashes = [v for v in stems.values() if len(v) > 1]
    if clashes:
        raise datasets.DatasetError(f"{clashes[0][0]} and {clashes[0][1]}: one name ({clashes[0][0].stem}) for two "
                                    "images; Task1 files and drawings name images by it: rename one")
    model, sources = run if isinstance(run, tuple) else build_run_model(run, device)  # (model, sources): --weights
    modalities = [s["modality"] for s in sources]
    if not modality and len(modalities) == 1:
        modality = modalities[0]
    if modality not in modalities:
        raise datasets.DatasetError(f"{run}: --modality {modality or '(none)'}: this run detects "
                                    f"{', '.join(modalities)}; choose one with --modality")
    src = sources[modalities.index(modality)]
    size = patch or src["image_size"]
    gap = default_gap(size) if gap < 0 else gap
    if gap >= size:
        raise datasets.DatasetError(f"--gap {gap}: the overlap must be smaller than the patch ({size} px)")
    detect = run_detector(model, modality, src["image_size"], device)
    views = parse_tta(tta)
    from PIL import Image

    skipped, counts = [], {}
    for f in files:  # from the image headers: the progress bar knows the whole job before it starts
        try:
            with Image.open(f) as im:
                w, h = im.size
            counts[f] = len(datasets.sliding_windows(w, h, size, gap)) if max(w, h) > size else 1
        except OSError as e:
            skipped.append(f"{f} ({e.__class__.__name__})")
            print(f"warning: {f}: cannot read the image ({e.__class__.__name__}), skipped", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=sum(counts.values()) * len(views), unit="patch", desc=f"predict {modality}")
    by_image, drawn, max_score = {}, 0, 0.0
    for i, f in enumerate(counts):
        try:
            image = datasets.load_image(f)
        except (datasets.DatasetError, OSError) as e:
            skipped.append(str(e))
            bar.write(f"warning: {e}; skipped", file=sys.stderr)  # a line of its own, above the bar
            bar.update(counts[f] * len(views))
            continue
        dets = detect_scene_tta(detect, image, size, gap, len(src["classes"]), views, batch_size, on_batch=bar.update)
        max_score = max([max_score] + [float(d[:, 5].max()) for d in dets if len(d)])
        by_image[f.stem] = [d[d[:, 5] >= TASK1_SCORE] for d in dets]
        drawn += draw_detections(image, dets, src["classes"], out / f"{f.stem}.png", score_thr)
        if attention:  # the whole image at the run's size (not patches): one figure an image
            draw_attention(image, attention_of(model, modality, image, src["image_size"], attention, device),
                           out / f"{f.stem}_attention.png")
        bar.set_postfix(images=f"{i + 1}/{len(counts)}")
    bar.close()
    task1 = write_dota_task1(out, by_image, src["classes"])
    summary = dict(images=len(by_image), detections=int(sum(len(d) for v in by_image.values() for d in v)),
                   drawn=drawn, max_score=max_score, task1=[str(p) for p in task1], skipped=skipped)
    if make_zip:
        import zipfile
        unknown = [c for c in src["classes"] if c not in DOTA_V1_CLASSES]
        if unknown:
            what = "is not a DOTA-v1.0 class" if len(unknown) == 1 else "are not DOTA-v1.0 classes"
            print(f"warning: --zip: {', '.join(unknown)} {what}; the evaluation server ignores their Task1 files",
                  file=sys.stderr)
        tmp = out / "submission.zip.tmp"
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
            for p in task1:
                z.write(p, p.name)
        tmp.replace(out / "submission.zip")
        summary["zip"] = str(out / "submission.zip")
    return summary




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


def format_run_metrics(metrics: dict) -> str:
    """Per class and per modality AP50 / AP75 / mAP (VOC area AP), the rotated COCO-style AP@[.5:.95]
    (`coco_map`), the VOC07 11-point AP50 / AP75, then the summary."""
    cols = ("ap50", "ap75", "map", "coco_map", "voc07_ap50", "voc07_ap75")
    header = f"{'AP in %':<26}" + "".join(f"{c:>11}" for c in cols)
    lines = []
    for m, r in metrics["sources"].items():
        lines += [f"{m} ({r['box_type']}, {r['images']} test images)", header]
        for name in r["classes"]:
            vals = [r["per_class"].get(c, {}).get(name) for c in cols]  # metrics of older runs lack coco_map
            lines.append(f"  {name:<24}" + "".join(f"{v * 100:11.2f}" if v is not None else f"{'-':>11}" for v in vals))
        lines.append(f"  {'mean':<24}" + "".join(f"{r[c] * 100:11.2f}" if r.get(c) is not None else f"{'-':>11}"
                                                 for c in cols))
    if "h_map" in metrics:  # BabelRS Tab. 2: AP@50 / mAP overall and per modality, then H-mAP
        mods = list(metrics["sources"])
        lines.append("")
        lines.append("AP50 / mAP in %, over the union of all classes (Overall) and per modality; H-mAP in %, "
                     f"over the {len(mods)} modalities present")
        lines.append(f"{'Overall':>15}" + "".join(f"{m:>15}" for m in mods) + f"{'H-mAP':>9}")
        cells = [f"{metrics['overall_ap50'] * 100:.2f} / {metrics['overall_map'] * 100:.2f}"]
        cells += [f"{metrics['sources'][m]['ap50'] * 100:.2f} / {metrics['sources'][m]['map'] * 100:.2f}" for m in mods]
        lines.append("".join(f"{c:>15}" for c in cells) + f"{metrics['h_map'] * 100:9.2f}")
    return "\n".join(lines)


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
    p = datasets.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="a run folder of train.py: score its checkpoint on each source's test split")
    p.add_argument("--weights", help="a weight file without a run folder (a released ARS-DETR / MutDet .pth, or our "
                   ".safetensors), with --preset: --predict with it, or score it on --data")
    p.add_argument("--preset", choices=list(RELEASED), help="--weights: the paper preset it was trained at (test size, "
                   "classes, the published number)")
    p.add_argument("--data", help="--weights: MODALITY:FOLDER of the split to score (e.g. rgb:data/DOTA/val)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="for --run")
    p.add_argument("--dets", help="folder of DOTA Task1_<class>.txt files")
    p.add_argument("--ann", help="annotation folder (DOTA labelTxt/ or annfiles/, or DIOR-R xml) of the scored split")
    p.add_argument("--metric", choices=["area", "11point"], default="11point",
                   help="VOC area AP or VOC07 11-point AP (DOTA Task1, MutDet); default 11point")
    p.add_argument("--iou", type=float, nargs="+", default=[0.5], help="IoU thresholds (default 0.5)")
    p.add_argument("--strict", action="store_true", help="match when IoU > thr, as the DOTA devkit (default >=)")
    p.add_argument("--out", default="", help="--predict: folder of the drawings and Task1 files (default predictions)")
    p.add_argument("--predict", nargs="+", metavar="PATH", help="with --run: detect on these images or folders of "
                   "images (any size; large scenes are cut into patches and merged); writes drawings and DOTA "
                   "Task1 files into --out (default predictions)")
    p.add_argument("--modality", default="", help="--predict: the head set of a multi-modal run (rgb, sar or ir)")
    p.add_argument("--score", type=float, default=0.3, help="--predict: score threshold of the drawn "
                   "detections (default 0.3)")
    p.add_argument("--patch", type=int, default=0, help="--predict: patch size (default the run's training size)")
    p.add_argument("--gap", type=int, default=-1, help="--predict: overlap of patches in px (default: the patch "
                   "size x 200 / 1024, DOTA's 200 px at 1024)")
    p.add_argument("--zip", action="store_true", help="--predict: also write submission.zip for the DOTA server")
    p.add_argument("--batch", type=int, default=4, help="--predict: patches per forward pass (default 4)")
    p.add_argument("--tta", default="", help="--predict: test-time views merged with the image's, e.g. "
                   "flip,rot90,scale=0.5/1.0/1.5 (flips, quarter turns, resizes; each view costs one more pass)")
    p.add_argument("--attention", type=int, default=0, metavar="K", help="--predict: also draw <image>_attention.png: "
                   "the reference boxes of the K highest-scoring queries and the sampling points of the last decoder "
                   "layer at every level (size by attention weight), on the whole image at the run's size; with a mutdet "
                   "pre-training run, its enhanced branch on images of its sam cache and each query's nearest objects")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--table" in argv or "--plot" in argv:  # moved; no import of tables.py from here (DESIGN.md)
        print("error: the tables and figures moved to tables.py: python tables.py --table NAME RUN... | "
              "--plot RUN...", file=sys.stderr)
        return 2
    p = build_parser()
    args = p.parse_args(argv)
    if args.weights and not args.preset:
        p.error("--weights needs --preset (ars-detr-dota or paper): the size and classes it was trained at")
    if args.weights and not (args.predict or args.data):
        p.error("--weights FILE --preset NAME needs --predict PATH... or --data MODALITY:FOLDER")
    if args.weights and args.data:
        try:
            model, sources = build_weights_model(args.weights, args.preset, args.device)
            modality, sep, folder = args.data.partition(":")
            if not sep or not Path(folder).is_dir():
                raise datasets.DatasetError(f"--data {args.data!r}: expected MODALITY:FOLDER of a split")
            src = dict(sources[0], test=str(datasets.find_split(folder, "test")))
            metrics = evaluate_model(model, [src], args.device, args.batch)
        except datasets.DatasetError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(format_run_metrics(metrics))
        spec, r = RELEASED[args.preset], metrics["sources"]["rgb"]
        print(f"ours {100 * r[spec['metric']]:.2f} AP50 (VOC07) against {spec['paper']:.2f}: {spec['cite']}")
        return 0
    if args.predict and args.run and run_stage(Path(args.run)) == "mutdet":  # a pre-training run: its attention only
        if not args.attention:
            p.error("--predict on a mutdet pre-training run draws its enhanced branch's attention: add --attention K "
                    "(detections come from a fine-tuned run)")
        try:
            out = Path(args.out or "predictions")
            out.mkdir(parents=True, exist_ok=True)
            for f in image_files(args.predict):
                image, att = mutdet_attention(args.run, f.stem, args.attention, device=args.device)
                draw_attention(image, att, out / f"{f.stem}_attention.png")
                print(f"{out / (f.stem + '_attention.png')}")
        except datasets.DatasetError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    if args.predict:
        if not (args.run or args.weights):
            p.error("--predict needs --run RUN (the trained detector) or --weights FILE --preset NAME")
        try:
            detector = build_weights_model(args.weights, args.preset, args.device) if args.weights else args.run
            summary = predict_images(detector, args.predict, args.out or "predictions", args.modality, args.score,
                                     args.patch, args.gap, args.zip, args.device, args.batch, args.tta, args.attention)
        except datasets.DatasetError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"{summary['images']} images, {summary['detections']} detections (score >= {TASK1_SCORE}) in "
              f"{len(summary['task1'])} Task1 files, {summary['drawn']} drawn (score >= {args.score}) in "
              f"{args.out or 'predictions'}" + (f"; {summary['zip']}" if "zip" in summary else ""))
        best = summary["max_score"]
        if summary["drawn"] == 0 and best > 0:  # the drawings look like the inputs: say why, and what would draw
            digits = max(2, 1 - math.floor(math.log10(best)))
            print(f"no box reached --score {args.score}; the highest score was {best:.{digits + 1}f}: "
                  f"--score {math.floor(best * 10 ** digits) / 10 ** digits:.{digits}f} draws the best ones")
        if summary["skipped"]:
            print(f"error: {len(summary['skipped'])} image(s) could not be read and were skipped: "
                  + "; ".join(summary["skipped"]), file=sys.stderr)
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
        extra = sorted(p.stem[len("Task1_"):] for p in Path(args.dets).glob("Task1_*.txt")
                       if p.stem[len("Task1_"):] not in split.classes)
        if extra:
            print(f"warning: {args.dets}: Task1 files of classes {args.ann} does not have, not scored: "
                  f"{', '.join(extra)}", file=sys.stderr)
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
    coco = rotated_coco_ap(dets, annots, len(split.classes))
    print(f"rotated COCO-style AP in %: AP@[.5:.95] {coco['map'] * 100:.2f}, AP50 {coco['ap50'] * 100:.2f}, "
          f"AP75 {coco['ap75'] * 100:.2f} (COCOeval's matching and 101-point recall, exact rotated IoU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
