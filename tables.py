"""Reproducing the papers' tables and figures from run folders, and the runs behind them.

- The published numbers (`PAPER`), the orderings each table tests (`ORDERINGS`) and the verdict
  test on them (`paired_verdict`: a paired t-test; `holm` across a table); `format_table_runs`: BabelRS Tab. 2-5 and Fig. 6, MutDet Tab. 2
  and the 10 % data setting over run folders, ours (mean ± std over seeds) beside the paper's.
- The figures (`plot_runs`): training-loss curves (BabelRS Fig. 4), loss and gradient norm under
  AMP (Fig. 7), iterations survived (Fig. 2), Fig. 6, MutDet's loss terms, a table as bars.
- Sweeps (`run_sweep`): the train.py runs of one table at three scales (tiny on this CPU, 1gpu,
  paper), resumable, several seeds; `run_cost`/`measure_step`: what each run costs before it starts.

Command line:
    python tables.py --sweep NAME [--scale tiny|1gpu|paper] [--seeds N] [--dry-run] [--status]
    python tables.py --table NAME RUN... [--out FILE]      Markdown (and FILE.md, FILE.csv)
    python tables.py --plot RUN... [--out DIR] [--image PATH]

May import: train, eval and the files below them (DESIGN.md); nothing imports this file but bench.py.
"""
import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import babelrs
import datasets
import eval as evaluation
import mutdet
import train

# ---------------------------------------------------------------------------------------------
# The papers' tables (tables.py --table NAME RUN...): our runs beside the published numbers
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
    "mutdet-proposals": dict(cite="MutDet's authors (floatingstarZ/MutDet issue 3): random or selective-search "
                                  "proposals also work where SAM fails (no numbers published)", rows={}),
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
    if evaluation.run_stage(run) != "finetune":
        raise datasets.DatasetError(f"{run}: a {evaluation.run_stage(run)} run; tables take fine-tuning runs (each one's --init "
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
        if "merge" in icfg and icfg.get("shuffle_answers"):  # the control: answers dealt to other samples
            facts.update(init="csia-shuffled", merge=icfg["merge"], csia_steps=icfg["max_steps"] or icfg["steps"],
                         tau=icfg["tau"], label="CSIA, answers shuffled across samples (control)")
        elif "merge" in icfg:  # a csia run
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
            cache = Path(icfg.get("data") or "-") / "config.json"  # the sam run it pre-trained on
            proposals = json.loads(cache.read_text()).get("proposals", "sam") if cache.exists() else "sam"
            label += {"random": " (random proposals)", "selective": " (selective search)"}.get(proposals, "")
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
    ap = {} if r is None else r["per_class"]["voc07_ap50"]
    per = [100 * ap[c] if ap.get(c) is not None else NAN for c in classes]
    overall = [NAN] * 2 if r is None else [100 * r["voc07_ap50"], 100 * r["voc07_ap75"]]
    if name == "mutdet-10pct":  # the per-class AP50 after the table's columns: in the CSV, not in the table
        return [100 * f["data_fraction"]] + overall + per
    return per + overall


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
        return ["data %", "AP50", "AP75"] + [f"AP50 {c}" for c in classes]
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
    """The row a run folder belongs to: its name without the `-seed<k>` of `tables.py --sweep --seeds`."""
    return re.sub(r"-seed\d+$", "", folder)


def row_key(name: str, f: dict) -> str:
    """Which of the paper's rows a run stands for, in ORDERINGS's terms."""
    if f["init"] == "csia":
        return f["merge"] if name == "babelrs-table5" else "csia"
    if f["init"] == "csia-shuffled":
        return "csia-shuffled"
    if f["init"] == "mutdet":
        return f["label"]  # DETReg, MutDet; an ablation row is named by its switches and is not compared
    return {"fractal": "none", "random": "random"}.get(f["init"], f["init"])  # generic pre-training is "none"


# The papers' orderings each table tests: (better row, worse row, column). BabelRS Tab. 3: BabelRS is
# above every generic pre-training; Tab. 5: (d) is best and every merge beats the last layer alone;
# MutDet Tab. 2: MutDet > DETReg > no pre-training, in AP50 and AP75; 10 %: MutDet > DETReg (+6.1 AP50).
ORDERINGS = {
    "babelrs-table3": [("csia", "none", "H-mAP"), ("csia", "none", "Overall mAP"),
                       ("csia", "csia-shuffled", "Overall mAP")],  # the control: what the language carries
    "babelrs-table5": [("lvsa", m, "H-mAP") for m in ("last", "concat", "sum", "per-layer")]
                      + [(m, "last", "H-mAP") for m in ("concat", "sum", "per-layer")],
    "mutdet-table2": [(a, b, c) for c in ("AP50", "AP75") for a, b in (("MutDet", "DETReg"), ("DETReg", "none"),
                                                                        ("MutDet", "none"))],
    "mutdet-10pct": [("MutDet", "DETReg", "AP50"), ("MutDet", "none", "AP50"), ("DETReg", "none", "AP50")],
    # MutDet issue 3: every proposal source helps over no pre-training; SAM's boxes are not worse than either
    "mutdet-proposals": [(a, "none", "AP50") for a in ("MutDet", "MutDet (random proposals)", "MutDet (selective search)")]
                        + [("MutDet", b, "AP50") for b in ("MutDet (random proposals)", "MutDet (selective search)")],
}


ALPHA, POWER = 0.05, 0.8  # the verdicts' test level and the power of the smallest detectable difference


def paired_verdict(a: dict, b: dict) -> dict:
    """Does row a beat row b? `a`, `b`: {seed: value}. A paired t-test over the seeds both have (n - 1
    degrees of freedom): mean difference d̄, SD of the differences s, SE = s / √n, t = d̄ / SE, the
    two-sided p, the 95 % confidence interval d̄ ± t_{0.975, n-1}·SE, how many seeds agree in sign,
    and `mde`, the smallest true difference these n seeds detect with 80 % power at this s,
    (t_{0.975, n-1} + t_{0.8, n-1})·SE. The ordering holds (p < 0.05, d̄ > 0), is reversed (p < 0.05,
    d̄ < 0), or is not separable; `holm` corrects p over the orderings of a table. One common seed
    tests nothing."""
    from scipy import stats
    seeds = sorted(set(a) & set(b))
    d = np.array([a[k] - b[k] for k in seeds], float)
    d = d[np.isfinite(d)]
    n = len(d)
    if n < 2:
        return dict(n=n, mean=float(d.mean()) if n else NAN, sd=NAN, se=NAN, p=NAN, ci=(NAN, NAN), agree=n, mde=NAN,
                    verdict="not separable (one seed)")
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    se = sd / np.sqrt(n)
    q = float(stats.t.ppf(1 - ALPHA / 2, n - 1))
    p = float(2 * stats.t.sf(abs(mean) / se, n - 1)) if se > 0 else (0.0 if mean != 0 else 1.0)
    v = dict(n=n, mean=mean, sd=sd, se=se, p=p, ci=(mean - q * se, mean + q * se),
             agree=int(max((d > 0).sum(), (d < 0).sum())), mde=(q + float(stats.t.ppf(POWER, n - 1))) * se)
    return _judge(v, p)


def _judge(v: dict, p: float) -> dict:
    v["p_adjusted"] = p
    v["verdict"] = "not separable" if not p < ALPHA else "holds" if v["mean"] > 0 else "reversed"
    return v


def holm(verdicts: list) -> list:
    """Holm's step-down correction over the orderings of one table: the k-th smallest p times
    (m - k + 1), made monotone; each verdict is then judged on its adjusted p."""
    tested = sorted((v for v in verdicts if np.isfinite(v.get("p", NAN))), key=lambda v: v["p"])
    running = 0.0
    for k, v in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - k) * v["p"]))
        _judge(v, running)
    return verdicts


def describe_verdict(v: dict) -> str:
    """One line: verdict, the Holm-adjusted p, difference with its 95 % CI, sign agreement, and the
    smallest difference the seeds could have detected."""
    if not np.isfinite(v["se"]):
        return f"**{v['verdict']}**, difference {v['mean']:+.2f}"
    if v["se"] == 0:
        return f"**{v['verdict']}**, difference {v['mean']:+.2f} in every one of {v['n']} seeds (no spread to test)"
    return (f"**{v['verdict']}** (p = {v['p_adjusted']:.3g}" + (", Holm" if v["p_adjusted"] != v["p"] else "")
            + f"), difference {v['mean']:+.2f}, 95 % CI [{v['ci'][0]:+.2f}, {v['ci'][1]:+.2f}], {v['agree']} of "
            f"{v['n']} seeds agree in sign; {v['n']} seeds detect {v['mde']:.2f} or more (80 % power)")


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
    if name in ("mutdet-table2", "mutdet-proposals", "mutdet-10pct"):
        done = [f["metrics"] for f in facts if f["metrics"]]
        classes = next(iter(done[0]["sources"].values()))["classes"] if done else ()
    columns = _columns(name, classes)
    groups = {}  # row folder -> dict(label, key, seeds {seed: cells})
    for f in facts:
        label = {"babelrs-table2": f["row"], "babelrs-table5": MERGE_NAMES.get(f.get("merge"), f["label"]),
                 "babelrs-fig6": f"{f['label']}" + (" (AMP)" if f["amp"] != "off" else "")}.get(name, f["label"])
        if name.startswith("babelrs") and f["backbone"] in ("resnet18", "resnet50"):  # a ViT table: say so
            label += {"resnet18": ", ResNet-18", "resnet50": ", ResNet-50"}[f["backbone"]]
        mods = list((f["metrics"] or {}).get("sources", {}))
        if name.startswith("babelrs") and mods and set(mods) != {"sar", "rgb", "ir"}:  # trained on a subset
            label += f" [{' + '.join(mods)} only: H-mAP over {len(mods)}]"
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
    shown = 3 if name == "mutdet-10pct" else len(columns)  # the 10 % table's per-class AP50: CSV only
    text = [head + "; AP in %)", "", _markdown(columns[:shown], [(lab, c[:shown]) for lab, c in ours], paired), ""]
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
        holm(verdicts)
        text += [f"The paper's orderings (paired t-test over seeds, {len(verdicts)} ordering"
                 f"{'s' if len(verdicts) > 1 else ''} Holm-corrected at 5 %):", ""]
        text += [f"- {v['better']} > {v['worse']} ({v['column']}): {describe_verdict(v)}" for v in verdicts]
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
        csv += [f"paper,{label},,{','.join(f'{v:.4g}' for v in vals)}" + "," * (len(columns) - len(vals))
                for label, vals in paper["rows"].items()]
    return dict(markdown="\n".join(text) + "\n", csv="\n".join(csv) + "\n", groups=groups, verdicts=verdicts,
                columns=columns)


def format_tiny_checks(runs: list) -> tuple:
    """`tables.py --sweep tiny-checks`: what the stand-ins give over random init on the same steps (protocol
    v3: the ViT's is part 3 of its gate). Returns (markdown, csv); the CSV is long (check, row, seed, column,
    value), since the two checks have other columns."""
    vit = format_table_runs("babelrs-table3", [r for r in runs if Path(r).name.startswith(("ft-generic", "ft-random-off"))])
    r18 = format_table_runs("mutdet-table2", [r for r in runs if "-data" in Path(r).name])
    text = ["**tiny-checks**: the stand-ins against random init on the same steps", "",
            "ViT (babelrs-tiny, SAR + RGB + IR, AP in %):", "", vit["markdown"].split("\n\n")[1], "",
            "ResNet-18 (the tiny finetune preset on SynthSOI-RGB, VOC07 AP in %):", "",
            r18["markdown"].split("\n\n")[1], ""]

    def per_seed(table, row, column):
        c, g = table["columns"].index(column), table["groups"].get(row, {"seeds": {}})
        return {k: v[c] for k, v in g["seeds"].items()}

    lines = []
    for table, better, worse, column, what in (
            (vit, *VIT_GATE, "ViT: stand-in > random init"),  # part 3 of the ViT gate (vit_gate)
            (vit, "ft-generic-off", "ft-random-off", "Overall AP50", "ViT: stand-in > random init"),
            (r18, "ft-none-data1.0", "ft-random-data1.0", "AP50", "ResNet-18: stand-in > random init")):
        a, b = per_seed(table, better, column), per_seed(table, worse, column)
        if not a and not b:  # a part of the checks (--rows): this one has not run
            continue
        v = paired_verdict(a, b)
        lines.append(f"- {what} ({column}): {describe_verdict(v)}")
    csv = ["check,row,seed,column,value"] + [
        f"{check},{row},{k},{column},{value:.4g}" for check, table in (("vit", vit), ("resnet18", r18))
        for row, g in table["groups"].items() for k, cells in sorted(g["seeds"].items())
        for column, value in zip(table["columns"], cells)]
    return "\n".join(text + lines) + "\n", "\n".join(csv) + "\n"


def _mean_std(mean: float, std: float, n: int) -> str:
    if not np.isfinite(mean):
        return "NaN"
    if float(mean).is_integer() and abs(mean) >= 100 and (not np.isfinite(std) or std == 0):  # iterations, steps
        return str(int(mean))
    return f"{mean:.2f}" + (f" ± {std:.2f}" if n > 1 and np.isfinite(std) else "")


# ---------------------------------------------------------------------------------------------
# Figures (tables.py --plot RUN...)
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
    (`fig6_series` of our runs) on top, the paper's (PAPER, read off the figure) below, as the
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
BAR_COLUMN = {"babelrs-table3": "H-mAP", "babelrs-table5": "H-mAP", "mutdet-table2": "AP50", "mutdet-10pct": "AP50",
              "mutdet-proposals": "AP50"}
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


def plot_pr_and_confusion(run, path, device="cpu", score_thr: float = 0.3) -> None:
    """A scored fine-tuning run on its first source's test split: precision against recall per class at
    IoU 0.5 (the ranked detections, VOC matching) beside the confusion matrix at IoU 0.5 and score
    `score_thr`, with a background row (false alarms) and column (misses), counts in each cell."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    model, sources = evaluation.build_run_model(run, device)
    src = sources[0]
    split = datasets.load_detection_split(src["test"], src["modality"], src["classes"])
    dets, annots = evaluation.predict_split(model, split, src["modality"], src["image_size"], device, progress=False)
    names = list(src["classes"])
    pr = evaluation.eval_rbbox_map(dets, annots, (0.5,), "area", curves=True)
    cm = evaluation.confusion_matrix(dets, annots, len(names), 0.5, score_thr)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    colours = plt.get_cmap("tab10")
    for c, name in enumerate(names):
        if (0, c) in pr["pr"] and len(pr["pr"][0, c][0]):
            recall, precision = pr["pr"][0, c]
            axes[0].plot(recall, precision, color=colours(c % 10), lw=1.3,
                         label=f"{name} (AP50 {100 * pr['ap'][0, c]:.1f})")
    axes[0].set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02),
                title=f"{Path(run).name}, {src['modality']}: precision-recall at IoU 0.5")
    axes[0].grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    labels = names + ["background"]
    axes[1].imshow(np.log1p(cm), cmap="Blues")
    for i in range(len(labels)):
        for j in range(len(labels)):
            if cm[i, j]:
                axes[1].text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7)
    axes[1].set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
    axes[1].set_yticks(range(len(labels)), labels, fontsize=7)
    axes[1].set(xlabel="detected as", ylabel="ground truth",
                title=f"confusion at IoU 0.5, score >= {score_thr} (last row: false alarms; column: misses)")
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
        kinds[r] = evaluation.run_stage(r)
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
            evaluation.plot_detections(r, written[-1], image, score_thr=score_thr, device=device)
            written.append(out / f"pr_confusion_{Path(r).name}.png")
            plot_pr_and_confusion(r, written[-1], device, score_thr)
    return written


# ---------------------------------------------------------------------------------------------
# What a run costs: parameters, FLOPs per optimizer step, memory (tables.py --sweep --dry-run, bench.py paper)
# ---------------------------------------------------------------------------------------------

# Training images of the papers' data sets, for the step counts of the dry run (sources in DESIGN notes)
DATASET_IMAGES = {
    "soi-det": 89278,  # SARDet-50K 46,260 + DOTA 800-px patches 25,028 + DroneVehicle 17,990 (BabelRS_20kstep.py)
    "dior-r": 11725,  # DIOR-R trainval
    "dota-800": 25028,  # DOTA-v1.0 train in 800-px crops, gap 200 (SOI-Det's count of the same split)
    "dota-1024": 15749,  # DOTA-v1.0 trainval in 1024-px patches, gap 200 (our assumption: split_ss_dota1_0's count)
}
TRAINING_SET = {("mutdet", "paper"): "dota-800", ("finetune", "paper"): "dior-r",  # what each paper preset trains on
                ("finetune", "ars-detr-dota"): "dota-1024", ("finetune", "babelrs"): "soi-det"}
PAPER_CLASSES = {"sar": ("hbb", 6), "rgb": ("obb", 15), "ir": ("obb", 5)}  # SOI-Det's three parts
OBJECTS_PER_IMAGE = 20  # synthetic ground truth of a measured step (DOTA averages about 20 a patch)


def synthetic_targets(n: int, size: int, classes: int, g: torch.Generator, objects: int = OBJECTS_PER_IMAGE,
                      embed_dim: int = 0) -> list:
    """`n` images' worth of random le90 boxes and labels (and, with `embed_dim`, unit object embeddings
    as MutDet's SAM cache holds), drawn from `g`: the inputs of a measured step."""
    out = []
    for _ in range(n):
        xy = torch.rand(objects, 2, generator=g) * size * 0.8 + size * 0.1
        wh = torch.rand(objects, 2, generator=g) * size * 0.1 + 8
        theta = (torch.rand(objects, 1, generator=g) - 0.5) * math.pi
        out.append(dict(boxes=torch.cat([xy, wh.sort(1, descending=True).values, theta], 1),
                        labels=torch.randint(0, classes, (objects,), generator=g), size=(size, size)))
    if embed_dim:
        for t in out:
            t["embeds"] = F.normalize(torch.randn(len(t["labels"]), embed_dim, generator=g), dim=-1)
    return out


def measure_step(stage: str, cfg, tiles: int = 1, sam_points: int = 64, device="cpu", amp: str = None,
                 sam_model: str = "vit-h") -> dict:
    """One micro-batch of `stage` at the size `cfg` describes, with random weights and synthetic
    inputs of that size: forward, backward and AdamW step (sam: the image encoder and one batch of
    `sam_points` point prompts, inference), under `torch.utils.flop_counter`. Returns
    dict(params, trained, micro, flops (one micro-batch), seconds, peak_rss_gb (of this process),
    peak_gb). On the CPU the counted step is the timed one (`bench.py paper`); on a GPU
    (`bench.py gpu`) a counted step warms up and a second one, outside the counter, is timed, with
    `amp` ("bf16" / "fp16") autocast and peak_gb from `torch.cuda.max_memory_allocated`. `sam_model`:
    "vit-h" (MutDet's SAM) or "tiny" (the dry run's)."""
    import resource

    from torch.utils.flop_counter import FlopCounterMode
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if stage == "sam":
        from transformers import SamConfig, SamModel, SamVisionConfig
        if sam_model == "tiny":
            model, side = mutdet.build_sam("", 64).requires_grad_(False), 64
        else:
            vision = SamVisionConfig(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16,
                                     global_attn_indexes=[7, 15, 23, 31])  # ViT-H (MutDet's SAM)
            model, side = SamModel(SamConfig(vision_config=vision.to_dict())).eval().requires_grad_(False), 1024
        x, micro = torch.randn(1, 3, side, side, generator=g), 1
        points = torch.rand(1, sam_points, 1, 2, generator=g) * side

        def run():
            with torch.no_grad():
                emb = model.get_image_embeddings(x)
                model(image_embeddings=emb, input_points=points, multimask_output=True)
        optimizer = None
    elif stage == "csia":
        vit = babelrs.ViT(cfg.vit_dim, cfg.vit_depth, cfg.vit_heads, cfg.patch, cfg.image_size,
                          drop_path=cfg.drop_path, grad_checkpoint=cfg.grad_checkpoint)
        paper = cfg.vit_dim >= 1024  # Qwen2.5-0.5B's shape for the paper preset (its vocabulary with InternVL's tokens)
        llm = babelrs.build_llm("", 151674 if paper else cfg.vocab_size, *((896, 24, 14, 2, 4864) if paper else
                                (cfg.llm_dim, cfg.llm_layers, cfg.llm_heads, cfg.llm_kv_heads, cfg.llm_ffn)))
        model = babelrs.CSIA(vit, llm, 5, cfg.merge, tuple(cfg.layers), cfg.tau).train()
        micro = cfg.batch_size if not paper else 1
        per_tile = (cfg.image_size // cfg.patch) ** 2 // 4
        T = per_tile * tiles + 200  # image tokens + a question and answer
        ids = torch.randint(10, 1000, (micro, T), generator=g)
        ids[:, 20:20 + per_tile * tiles] = 5
        labels = ids.clone()
        labels[:, :T - 60] = babelrs.IGNORE_INDEX
        pixels = torch.randn(micro * tiles, 3, cfg.image_size, cfg.image_size, generator=g)

        def run():
            model(pixels, ids, torch.ones_like(ids), labels, step=10)["loss"].backward()
    else:
        size = cfg.image_size
        if stage == "mutdet":
            model = mutdet.build_pretrainer(cfg, [str(i) for i in range(256)], cfg.dim).train()
            micro = cfg.batch_size
            targets = synthetic_targets(micro, size, 256, g, objects=200, embed_dim=cfg.dim)  # SAM boxes an image

            def run():
                sum(model(images, masks, targets).values()).backward()
        else:
            mods = ["sar", "rgb", "ir"][:len(cfg.source_ratio)] if cfg.source_ratio else ["rgb"]
            ratios = cfg.source_ratio or [cfg.batch_size]
            sources = [dict(modality=m, classes=[str(i) for i in range(PAPER_CLASSES[m][1] if len(mods) > 1 else 20)],
                            box_type=PAPER_CLASSES[m][0] if len(mods) > 1 else "obb") for m in mods]
            model = babelrs.build_detector(**dict(train.model_args(cfg, sources), resnet="")).train()  # weights cost nothing
            modalities = [m for m, r in zip(mods, ratios) for _ in range(r)]
            micro = len(modalities)
            targets = synthetic_targets(micro, size, 5, g)

            def run():
                sum(model(images, masks, modalities, targets)["losses"].values()).backward()
        images = torch.randn(micro, 3, size, size, generator=g)
        masks = torch.zeros(micro, size, size, dtype=torch.bool)
    device = torch.device(device)
    if device.type != "cpu":  # the closures above read these names when they run: on the device from here
        model = model.to(device)
        if stage == "sam":
            x, points = x.to(device), points.to(device)
        elif stage == "csia":
            pixels, ids, labels = pixels.to(device), ids.to(device), labels.to(device)
        else:
            images, masks = images.to(device), masks.to(device)
            targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
        torch.cuda.reset_peak_memory_stats(device)
    if stage != "sam":
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)

    def step():
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            run()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    counter = FlopCounterMode(display=False)
    t0 = time.time()
    try:
        with counter:
            step()
        flops = counter.get_total_flops()
    except AssertionError:  # torch < 2.12's counter has no formula for grouped-query SDPA (Qwen2's attention)
        flops = math.nan  # the time is still measured; MFU is then not known
        for p in model.parameters():
            p.grad = None
        step()
    if device.type != "cpu":  # the counted step warmed up (allocator, kernels); time a clean one
        torch.cuda.synchronize(device)
        t0 = time.time()
        step()
        torch.cuda.synchronize(device)
    seconds = time.time() - t0
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return dict(stage=stage, params=sum(p.numel() for p in model.parameters()),
                trained=sum(p.numel() for p in model.parameters() if p.requires_grad), micro=micro, tiles=tiles,
                flops=flops, seconds=seconds, peak_rss_gb=peak_rss,
                peak_gb=torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else peak_rss)


# ---------------------------------------------------------------------------------------------
# Sweeps: the runs behind one table or figure (python tables.py --sweep NAME)
# ---------------------------------------------------------------------------------------------

# The tiny protocol, version 3 (docs/tiny-protocol-v3.md, fixed before its runs; version 2, whose tables
# are in docs/tiny-results.md, ran at commit 8fe0ec6). Rows train on SynthSOI's 256-px images resized to
# TINY_IMAGE and are scored on its 200 test images a modality; every row of a table gets the same steps,
# the length the learning-curve pilot picked (pilot_length); CSIA is shortened to TINY_CSIA_STEPS with τ
# at the same fraction (120/400); MutDet pre-training runs 17 epochs of 12 steps (lr step at 15).
TINY_IMAGE = 192  # image side of the tiny sweep rows
TINY_CSIA_STEPS, TINY_CSIA_TAU = 200, 60.0  # CSIA steps and τ of a tiny sweep
TINY_SEEDS, TINY_THREADS = 3, 2  # seeds a row (where TINY_V3_SEEDS says nothing) and threads a run at tiny scale
TINY_V3_SEEDS = {"babelrs-table3": 5, "babelrs-table5": 8, "mutdet-table2": 8, "mutdet-10pct": 8,
                 "mutdet-proposals": 8, "tiny-checks": 5}  # the power analysis of protocol v3
TINY_V3_FEW = ("concat", "sum", "per-layer")  # Tab. 5's merges run with TINY_SEEDS seeds, described, not tested
TINY_V3_PILOT = "results/tiny-v3/tiny-pilot.csv"  # the pilot's per-seed CSV, committed when it is done
TINY_V3_CHECKS, VIT_GATE = "results/tiny-v3/tiny-checks.csv", ("ft-generic-off", "ft-random-off", "H-mAP")  # vit_gate
SHARED_RUNS = ("sam", "sam-random", "sam-selective")  # runs every seed shares (pseudo-label caches, as MutDet's)
MERGES = ("last", "concat", "sum", "per-layer", "lvsa")  # BabelRS Tab. 5 rows: baseline, (a), (b), (c), (d)
SWEEPS = ("babelrs-table3", "babelrs-table4", "babelrs-table5", "babelrs-fig6", "mutdet-table2", "mutdet-10pct",
          "mutdet-table3", "mutdet-proposals", "tiny-checks", "tiny-pilot")
TINY_ONLY = ("tiny-checks", "tiny-pilot")  # checks of the tiny protocol: no paper-scale runs
# Tiny protocol v3 (docs/tiny-protocol-v3.md): 200 test images a modality (the first 16 are version 2's),
# and the learning-curve pilot of the stand-in rows: complete schedules of these lengths (steps)
TINY_V3_SYNTH, TINY_V3_TEST = "data/synthsoi-v3", 200
PILOT_LENGTHS = {"babelrs": (144, 288, 576, 1152), "mutdet": (200, 400, 800, 1600)}
PILOT_METRICS = {"babelrs": ("overall_map", "h_map"), "mutdet": ("voc07_ap50", "voc07_ap75")}  # primary first
# MutDet Tab. 3 is scored by the DOTA-v1.0 server: its fine-tuned rows predict on the full test scenes
DATA_STAGES = {"babelrs": ("csia", "finetune"), "mutdet": ("sam", "finetune"), "tiny": ()}  # stages that read real data
SUBMISSION = "dota-test"  # folder of each fine-tuned row holding drawings, Task1 files and submission.zip


# `--scale 1gpu`: the papers' models, data, resolution and global batches, with every schedule cut by
# the same factor within a table, so that a row fits about 12 hours of one 80 GB GPU (README: costs).
# What is cut and why the comparison survives: the number of optimizer steps only. Warm-up, the
# positions of the lr steps (as fractions of the schedule), the global batch and all the
# hyper-parameters stay; CSIA's τ is scaled with its length (τ / steps = 6k / 20k), so the LVSA
# annealing reaches the plain mean at the same fraction of pre-training. Every row of a table gets
# the same cut, so the rows are compared at equal cost, which is what the ablations ask.
ONE_GPU = dict(csia_fraction=0.1,  # 2k of 20k CSIA steps
               babelrs_epochs=3,  # of 12 (lr steps at 2 and 3 as 8 and 11 of 12, rounded)
               mutdet_pretrain_epochs=6,  # of 36 (step at 5)
               mutdet_finetune_epochs=12)  # of 36 (step at 11)


def _cut(epochs: int, paper_epochs: int, paper_steps: list) -> list:
    """`--epochs E --lr_steps ...` with the lr steps at the paper's fractions of the schedule."""
    return ["--epochs", str(epochs), "--lr_steps", *(f"{s * epochs / paper_epochs:.4g}" for s in paper_steps)]


def sweep_runs(name: str, scale: str, extra: dict, amp: str = "fp16") -> list:
    """The runs of one table, in order: (folder name, train.py arguments). Folder names spell out
    what a run is, so tables share runs (the CSIA of Tab. 3 is Tab. 5's row (d)). `extra[stage]`
    holds the user's arguments for that stage (paper scale: --data, --llm, --vit, --sam, --resnet).
    `amp` is the mode of the rows the paper fine-tunes with AMP (Tab. 4, Fig. 6 right). `scale`:
    tiny (this CPU), 1gpu (paper sizes, schedules cut by ONE_GPU) or paper."""
    tiny, one_gpu = scale == "tiny", scale == "1gpu"
    cut = ONE_GPU["csia_fraction"] if one_gpu else 1.0
    csia_steps = TINY_CSIA_STEPS if tiny else round(train.CSIA_PRESETS["paper"].steps * cut)
    csia_tau = TINY_CSIA_TAU if tiny else train.CSIA_PRESETS["paper"].tau * cut
    ft_preset = ["--preset", "babelrs-tiny" if tiny else "babelrs"]
    v3 = ["--synth_root", TINY_V3_SYNTH] if tiny else []  # every tiny run on SynthSOI with its 200 test images

    def ft_schedule():  # tiny: the pilot's length, as a complete schedule; checkpoints so that a cut row resumes
        return (["--ckpt_every", "48", "--image_size", str(TINY_IMAGE)] + v3 + pilot_schedule("babelrs", pilot_length("babelrs"))
                if tiny else _cut(ONE_GPU["babelrs_epochs"], 12, [8, 11]) if one_gpu else [])
    runs = []

    def add(folder, argv):
        if folder not in [r[0] for r in runs]:
            runs.append((folder, argv))
        return folder

    def csia_run(merge="lvsa", steps=csia_steps, tau=csia_tau, shuffled=False):
        return add(f"csia-{merge}-s{steps}-tau{tau:g}" + ("-shuffled" if shuffled else ""),
                   ["--stage", "csia", "--preset", "tiny" if tiny else "paper", "--merge", merge, "--steps", str(steps),
                    "--tau", f"{tau:g}"] + (["--shuffle_answers"] if shuffled else []) + v3 + extra["csia"])

    def babelrs_finetune(init, amp="off"):  # init: a csia folder, or "generic": the preset's ViT (tiny: the
        #                                      FractalDB stand-in; paper: --finetune-args "--init PATH" or random)
        return add(f"ft-{init}-{amp}", ["--stage", "finetune"] + ft_preset + ft_schedule() + ["--amp", amp]
                   + ([] if init == "generic" else ["--init", f"{{runs}}/{init}"]) + extra["finetune"])

    if name in ("babelrs-table3", "babelrs-table4"):  # pre-training comparison, without / with AMP
        mode = amp if name == "babelrs-table4" else "off"
        babelrs_finetune("generic", mode)
        babelrs_finetune(csia_run(), mode)
        if name == "babelrs-table3":  # the shuffled-answers control (tiny protocol v3)
            babelrs_finetune(csia_run(shuffled=True), mode)
        for family, path in extra["weights"]:  # --weights clip:PATH dinov2:PATH ... (transformers or InternViT)
            add(f"ft-{family}-{mode}", ["--stage", "finetune"] + ft_preset + ft_schedule()
                + ["--amp", mode, "--init", path, "--vit_family", family] + extra["finetune"])
    elif name == "babelrs-table5":
        for merge in MERGES:
            babelrs_finetune(csia_run(merge))
    elif name == "babelrs-fig6":  # left: pre-training steps; right: τ, fine-tuned with AMP (Sec. 4.9)
        for steps in ((50, 100, 200, 400) if tiny else range(2000, 24001, 2000)):  # τ fixed (6k in the paper)
            babelrs_finetune(csia_run(steps=round(steps * cut)))
        for tau in ((0, 20, 60, 100) if tiny else range(0, 10001, 2000)):
            babelrs_finetune(csia_run(tau=tau * cut), amp)
    elif name in ("mutdet-table2", "mutdet-10pct", "mutdet-table3"):
        preset = ["--preset", "tiny" if tiny else "paper"]
        # tiny: SAM stand-in (a random SAM's masks are noise; see mutdet.colour_components)
        sam = add("sam", ["--stage", "sam"] + preset + (["--masks", "components"] if tiny else []) + v3 + extra["sam"])
        pre_schedule = (_cut(ONE_GPU["mutdet_pretrain_epochs"], 36, [32]) if one_gpu else
                        ["--epochs", "17", "--lr_steps", "15", "--image_size", str(TINY_IMAGE)] + v3 if tiny else [])
        pre = {"-": None,
               "DETReg": add("pre-detreg", ["--stage", "mutdet"] + preset + pre_schedule + ["--data", f"{{runs}}/{sam}", "--no-enhance",
                                                                           "--embed-loss", "l1", "--pseudo-classes", "1",
                                                                           "--no-dn-align"]
                             + extra["mutdet"]),
               "MutDet": add("pre-mutdet", ["--stage", "mutdet"] + preset + pre_schedule + ["--data", f"{{runs}}/{sam}"]
                             + extra["mutdet"])}
        fraction = "0.1" if name == "mutdet-10pct" else "1.0"
        length = pilot_length("mutdet") if tiny else 0
        schedule = (["--ckpt_every", "48", "--image_size", str(TINY_IMAGE)] + v3 + pilot_schedule("mutdet", length)
                    if tiny else _cut(ONE_GPU["mutdet_finetune_epochs"], 36, [32]) if one_gpu else [])
        if tiny and name == "mutdet-10pct":  # 5 images = 1 step an epoch: as many steps as with all the data,
            schedule = schedule[:-6] + ["--epochs", str(length), "--lr_steps", f"{0.9 * length:g}",  # lr step at 36/40
                                        "--max-steps", str(length)]
        # Tab. 3: ARS-DETR at 1024 px on DOTA-v1.0 trainval patches (1024 / 200), scored on the test scenes
        ft_preset = ["--preset", "ars-detr-dota"] if name == "mutdet-table3" and not tiny else preset
        dota = "-dota" if name == "mutdet-table3" else ""
        for row, init in pre.items():
            add(f"ft-{(init or 'none').removeprefix('pre-')}-data{fraction}{dota}",
                ["--stage", "finetune"] + ft_preset + schedule + ["--data_fraction", fraction]
                + (["--init", f"{{runs}}/{init}"] if init else []) + extra["finetune"])
    elif name == "mutdet-proposals":  # Tab. 2's none and MutDet rows, and MutDet on random / selective-search boxes
        base = dict(sweep_runs("mutdet-table2", scale, extra, amp))
        for folder in ("sam", "pre-mutdet", "ft-none-data1.0", "ft-mutdet-data1.0"):
            add(folder, base[folder])  # shared with Tab. 2
        for source in ("random", "selective"):
            cache = add(f"sam-{source}", base["sam"] + ["--proposals", source]
                        + (["--proposals_like", "{runs}/sam"] if source == "random" else []))
            pre = add(f"pre-mutdet-{source}", [f"{{runs}}/{cache}" if a == "{runs}/sam" else a for a in base["pre-mutdet"]])
            add(f"ft-mutdet-{source}-data1.0",
                [f"{{runs}}/{pre}" if a == "{runs}/pre-mutdet" else a for a in base["ft-mutdet-data1.0"]])
    elif name == "tiny-checks":  # the stand-ins against random init; the ViT row with twice the steps
        if not tiny:
            raise SystemExit("--sweep tiny-checks: a check of the tiny protocol (--scale tiny)")
        vit = dict(sweep_runs("babelrs-table3", scale, extra, amp))["ft-generic-off"]
        r18 = dict(sweep_runs("mutdet-table2", scale, extra, amp))["ft-none-data1.0"]
        add("ft-generic-off", vit)  # shared with Tab. 3; v3's gate, part 3
        add("ft-random-off", vit + ["--init", ""])
        add("ft-none-data1.0", r18)  # shared with MutDet Tab. 2
        add("ft-random-data1.0", r18 + ["--resnet", ""])
    elif name == "tiny-pilot":  # v3: the stand-in rows at complete schedules of PILOT_LENGTHS, never a treatment row
        if not tiny:
            raise SystemExit("--sweep tiny-pilot: the learning-curve pilot of the tiny protocol (--scale tiny)")
        v3 += ["--image_size", str(TINY_IMAGE), "--ckpt_every", "48"]
        for kind, preset in (("babelrs", "babelrs-tiny"), ("mutdet", "tiny")):
            for steps in PILOT_LENGTHS[kind]:
                add(f"pilot-{kind}-{steps}", ["--stage", "finetune", "--preset", preset] + v3
                    + pilot_schedule(kind, steps) + extra["finetune"])
    else:
        raise SystemExit(f"--sweep {name}: choose one of {', '.join(SWEEPS)}")
    return runs


def pilot_schedule(kind: str, steps: int) -> list:
    """A complete fine-tuning schedule of `steps` steps: babelrs-tiny does 36 steps an epoch (3 x 48
    images, batch 4), its lr steps at 8 and 11 of 12 epochs; the tiny finetune preset 12 (48 images,
    batch 4), its lr step at 36 of 40 epochs."""
    if kind == "babelrs":
        return _cut(steps // 36, 12, [8, 11])
    return _cut(-(-steps // 12), 40, [36]) + ["--max-steps", str(steps)]


def choose_length(values: dict, lengths: tuple) -> tuple:
    """Protocol v3's rule over the pilot's {length: {seed: primary metric}}: (L, "stable") for the
    shortest L whose doubling moves the metric (paired over seeds) by less than its seed SD at L;
    (the longest, "still rising") when no doubling does; (None, "not decided") while runs are missing."""
    for L, longer in zip(lengths, lengths[1:]):
        cur, nxt = values.get(L, {}), values.get(longer, {})
        common = sorted(set(cur) & set(nxt))
        if len(cur) < 2 or len(common) < 2:
            return None, "not decided"
        if abs(np.mean([nxt[k] - cur[k] for k in common])) < np.std(list(cur.values()), ddof=1):
            return L, "stable"
    return (lengths[-1], "still rising") if len(values.get(lengths[-1], {})) > 1 else (None, "not decided")


def pilot_length(kind: str) -> int:
    """The fine-tuning steps of protocol v3's tables for the `kind` rows (babelrs, mutdet): the pilot's
    choice, read from its committed per-seed CSV (TINY_V3_PILOT)."""
    path = Path(__file__).resolve().parent / TINY_V3_PILOT
    how = "python tables.py --sweep tiny-pilot, then commit its runs/tiny-v3/tiny-pilot.csv as " + TINY_V3_PILOT
    if not path.exists():
        raise SystemExit(f"tiny protocol v3: the tables run at the learning-curve pilot's lengths, and {path} is "
                         f"not there yet: {how}")
    values = {}
    for line in path.read_text().splitlines()[1:]:
        row, steps, seed, primary, _ = line.split(",")
        if row == kind:
            values.setdefault(int(steps), {})[int(seed)] = float(primary)
    length, verdict = choose_length(values, PILOT_LENGTHS[kind])
    if length is None:
        raise SystemExit(f"tiny protocol v3: {path}: the pilot of the {kind} rows has not decided its length yet: {how}")
    return length


def vit_gate() -> None:
    """Protocol v3: the BabelRS tiny tables run only on a ViT stand-in that passed its gate's part 3: fine-tuning
    from it beats random init on Tab. 3's stand-in row (H-mAP, paired t-test over 5 seeds, TINY_V3_CHECKS)."""
    (better, worse, metric), path = VIT_GATE, Path(__file__).resolve().parent / TINY_V3_CHECKS
    lines = [line.split(",") for line in (path.read_text().splitlines()[1:] if path.exists() else ())]
    v = paired_verdict(*({int(k): float(x) for _, r, k, column, x in lines if r == row and column == metric}
                         for row in (better, worse)))
    if v["n"] < TINY_V3_SEEDS["tiny-checks"]:
        raise SystemExit(f"tiny protocol v3: the BabelRS tables wait for the ViT gate's part 3, and {path} lacks it: python "
                         f"tables.py --sweep tiny-checks --rows {better} {worse}, then commit its CSV there")
    if v["verdict"] != "holds":
        raise SystemExit(f"tiny protocol v3: the ViT stand-in failed its gate ({path}: stand-in > random init, {metric}: "
                         f"{describe_verdict(v)}), so the BabelRS tables are not run on it")


def reads(argv: list) -> set:
    """The sweep folders a run reads (its `{runs}/X` arguments): it starts once they are finished."""
    return {a[len("{runs}/"):].split("/")[0] for a in argv if a.startswith("{runs}/")}


def run_commands(todo: list, env: dict, jobs: int, root: Path) -> int:
    """Run a sweep's commands, todo = [(folder, folders it reads, command)], `jobs` at a time: in order,
    each once the folders it reads are finished. With jobs > 1 a run's output goes to <root>/<folder>.log.
    Writes each run's finished.json; after a failure starts nothing more, lets the others end and
    returns the failing status (a non-finite loss is a result, as Tab. 4's NaN rows)."""
    import shlex
    import subprocess
    waiting, running, status = list(todo), {}, 0
    while (waiting and not status) or running:
        for item in list(waiting):
            folder, needs, cmd = item
            if status or len(running) >= jobs:
                break
            if needs & ({f for f, _, _ in waiting} | set(running)):
                continue
            waiting.remove(item)
            if jobs > 1:
                root.mkdir(parents=True, exist_ok=True)
            log = open(root / f"{folder}.log", "a") if jobs > 1 else None
            print(f"[sweep] {shlex.join(cmd)}" + (f"   (output: {log.name})" if log else ""), flush=True)
            running[folder] = (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT if log else None),
                               time.time(), log)
        if not running:
            break
        while not (done := [f for f, (proc, _, _) in running.items() if proc.poll() is not None]):
            time.sleep(0.2)
        for folder in done:
            proc, t0, log = running.pop(folder)
            if log:
                log.close()
            if proc.returncode not in (0, train.EXIT_NONFINITE):  # a preempted run goes on when the sweep is rerun
                print(f"[sweep] {root / folder}: exit status {proc.returncode}; stopping the sweep (rerun the same "
                      "command to go on)", flush=True)
                status = status or proc.returncode
                continue
            datasets.atomic_write_text(root / folder / "finished.json", json.dumps(
                dict(status=proc.returncode, minutes=(time.time() - t0) / 60)) + "\n")
            if jobs > 1:
                print(f"[sweep] {root / folder}: done in {(time.time() - t0) / 60:.1f} min", flush=True)
    return status


def format_pilot(runs: list) -> tuple:
    """(markdown, csv) of the learning-curve pilot: per row and length the primary metric and the second
    one (mean ± SD over seeds, %), what doubling the length moves the primary by (paired over seeds),
    and the length the tables use: the shortest L where doubling moves the primary metric by less than
    its seed SD at L, else the longest (labelled still rising)."""
    values = {}  # (row, length) -> {seed: (primary, second)}
    for run in runs:
        f = run_facts(run)
        kind, length = Path(run).name.split("-")[1], int(seed_group(Path(run).name).split("-")[2])
        m = f["metrics"]
        if m is None:
            continue
        src = m if kind == "babelrs" else next(iter(m["sources"].values()))
        values.setdefault((kind, length), {})[f["seed"]] = tuple(100 * src.get(k, NAN) for k in PILOT_METRICS[kind])
    md, csv = [], ["row,steps,seed,primary,second"]
    for kind, lengths in PILOT_LENGTHS.items():
        primary, second = PILOT_METRICS[kind]
        md += [f"**{kind}** stand-in row: {primary} (primary) and {second}, %, mean ± SD over seeds", "",
               f"| steps | seeds | {primary} | {second} | doubling moves {primary} by (paired) |", "|---|---|---|---|---|"]
        for i, L in enumerate(lengths):
            cur = values.get((kind, L), {})
            a = np.array([v[0] for v in cur.values()])
            b = np.array([v[1] for v in cur.values()])
            sd = float(np.std(a, ddof=1)) if len(a) > 1 else NAN
            move = ""
            nxt = values.get((kind, lengths[i + 1]), {}) if i + 1 < len(lengths) else {}
            common = sorted(set(cur) & set(nxt))
            if len(common) > 1:
                d = float(np.mean([nxt[k][0] - cur[k][0] for k in common]))
                move = f"{d:+.2f} ({'less' if abs(d) < sd else 'not less'} than the SD {sd:.2f})"
            md.append(f"| {L} | {len(a)} | {_mean_std(a.mean(), sd, len(a)) if len(a) else '-'} | "
                      f"{_mean_std(b.mean(), float(np.std(b, ddof=1)) if len(b) > 1 else NAN, len(b)) if len(b) else '-'} | {move} |")
            csv += [f"{kind},{L},{k},{v[0]:.4f},{v[1]:.4f}" for k, v in sorted(cur.items())]
        chosen, verdict = choose_length({L: {k: v[0] for k, v in values.get((kind, L), {}).items()} for L in lengths},
                                        lengths)
        md += ["", f"Length for the tables: **{chosen}** steps" + (", still rising" if verdict == "still rising" else "")
               if chosen else "Length: not decided yet (runs missing)", ""]
    return "\n".join(md) + "\n", "\n".join(csv) + "\n"


STEP_COSTS = {"tiny": "results/tiny_step.json", "paper": "results/paper_step.json"}  # bench.py paper writes them
TINY_IMAGES = 48  # SynthSOI training images a modality


def run_cost(argv: list, scale: str, gpu_tflops: float, mfu: float) -> dict:
    """What one run of a sweep costs: parameters, FLOPs per optimizer step (the measured micro-batch
    of its stage and preset, `bench.py paper`, times the micro-batches of a global batch), its
    steps (the papers' data set sizes, DATASET_IMAGES, at paper scale), total FLOPs, hours on one
    GPU at `gpu_tflops` x `mfu`, and the measured peak memory of one micro-batch (CPU, float32)."""
    stage, cfg = train.parse_config(argv, check_weights=False)
    preset = argv[argv.index("--preset") + 1] if "--preset" in argv else "tiny"
    table = Path(__file__).resolve().parent / STEP_COSTS["tiny" if scale == "tiny" else "paper"]
    measured = json.loads(table.read_text()).get(f"{stage}:{preset}") if table.exists() else None
    if stage == "sam" and scale == "tiny":
        return dict(stage=stage, preset=preset, missing="the colour-components stand-in of SAM: not counted")
    if measured is None:
        return dict(stage=stage, preset=preset, missing=f"not measured: python bench.py paper{' --tiny' if scale == 'tiny' else ''}")
    if stage == "sam":  # inference, per image: the image encoder and one batch of points (a lower bound)
        images = TINY_IMAGES if scale == "tiny" else DATASET_IMAGES["dota-800"]
        per_step, steps = measured["flops"], images
    else:
        per_step = measured["flops"] * cfg.global_batch / measured["micro"]
        if stage == "csia":
            steps = cfg.steps
        else:
            sources = len(cfg.source_ratio) if stage == "finetune" and cfg.source_ratio else 1
            images = TINY_IMAGES * sources if scale == "tiny" else DATASET_IMAGES[TRAINING_SET[stage, preset]]
            images = max(1, math.ceil(images * getattr(cfg, "data_fraction", 1.0)))
            steps = cfg.epochs * max(1, images // cfg.global_batch)
        steps = min(steps, cfg.max_steps) if cfg.max_steps else steps
    total = per_step * steps
    return dict(stage=stage, preset=preset, params=measured["params"], flops_step=per_step, steps=steps, flops=total,
                hours=total / (gpu_tflops * 1e12 * mfu) / 3600, peak_gb=measured["peak_rss_gb"],
                micro=measured["micro"])


def seeded_runs(runs: list, seeds: int) -> list:
    """Every run of a table once per seed, seed-major (all rows of seed 0 first, so a cut sweep has
    whole paired seeds): folder `<run>-seed<k>`, `--seed k` (data order, augmentation, initialisation),
    and its pre-training the run of the same seed. SHARED_RUNS are made once, for all seeds."""
    out = []
    for k in range(seeds):
        for folder, argv in runs:
            if folder in SHARED_RUNS:
                if k == 0:
                    out.append((folder, argv))
                continue
            argv = [a if not a.startswith("{runs}/") or a[7:] in SHARED_RUNS else f"{a}-seed{k}" for a in argv]
            out.append((f"{folder}-seed{k}", argv + ["--seed", str(k)]))
    return out


def run_status(run: Path) -> str:
    """How far a run folder got: done, started (last logged step, checkpoint, ETA), or not started."""
    if (run / "finished.json").exists():
        f = json.loads((run / "finished.json").read_text())
        return f"done ({f.get('minutes', 0):.0f} min" + (", non-finite loss)" if f.get("status") == train.EXIT_NONFINITE else ")")
    if not (run / "config.json").exists():
        return "not started"
    log = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines()] if (run / "log.jsonl").exists() else []
    steps = [r for r in log if "loss" in r]
    pair = train.checkpoint_pair(run)
    text = f"started: step {steps[-1]['step']}" if steps else "started: no step yet"
    text += f", checkpoint at {pair[2]}" if pair else ", no checkpoint"
    if steps and "eta_s" in steps[-1]:
        text += f", ETA {steps[-1]['eta_s'] / 60:.0f} min when it stopped"
    if log and "preempted" in log[-1]:
        text += f" (stopped by {log[-1]['preempted']})"
    return text


def run_sweep(argv) -> int:
    """Run (or resume) the runs of one table one after the other, skipping finished ones (a
    `finished.json` in the folder), then write its table (format_table_runs)."""
    import shlex
    import subprocess
    p = datasets.ArgumentParser(prog="tables.py --sweep", description="the runs of one table, then the table")
    p.add_argument("--sweep", required=True, choices=SWEEPS)
    p.add_argument("--scale", choices=["tiny", "1gpu", "paper"], default="tiny",
                   help="tiny: this CPU; 1gpu: paper models and data, schedules cut to about 12 GPU-hours a row "
                        "(ONE_GPU); paper: the papers' schedules")
    p.add_argument("--runs", default="", help="folder of the sweep's runs (default runs/<scale>; tiny: runs/tiny-v3)")
    p.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun --nproc_per_node)")
    p.add_argument("--seeds", type=int, default=0, help=f"runs of every row, seeds 0..N-1, in folders <run>-seed<k> "
                   f"(default at tiny scale: protocol v3's, {TINY_V3_SEEDS}, else {TINY_SEEDS}; 1 at other scales); "
                   "the table gives mean ± std and the orderings")
    p.add_argument("--threads", type=int, default=-1, help=f"threads of every run (OMP_NUM_THREADS; default "
                   f"{TINY_THREADS} at tiny scale, where the thread count changes the order of float sums and so "
                   "the numbers; 0 = torch's default)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, each once the runs it reads are finished; at "
                   "tiny scale the threads are shared out (2 runs at 1 thread do 1.17-1.46x the steps an hour of one "
                   "run at 2 threads on 2 cores: docs/benchmarks.md); each run's output goes to RUNS/<run>.log")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    p.add_argument("--rows", nargs="*", default=[], metavar="ROW",
                   help="only these rows (run folders without -seed<k>, e.g. ft-generic-off) and the runs they read; "
                        "the table is written from them (tiny-checks: the ViT gate before the BabelRS tables)")
    p.add_argument("--status", action="store_true", help="one line per run: done, started (step, ETA), not started")
    p.add_argument("--gpu-tflops", type=float, default=312.0,
                   help="--dry-run: the GPU's dense bf16 TFLOPS for the hour estimates (default 312, an A100)")
    p.add_argument("--mfu", type=float, default=0.35, help="--dry-run: the fraction of it a step reaches (default 0.35)")
    p.add_argument("--amp", choices=["fp16", "bf16", "off"], default="fp16",
                   help="mode of the rows the paper fine-tunes with AMP (Tab. 4, Fig. 6 right); a CPU without "
                        "fp16/bf16 units runs them ~7x slower, so 'off' keeps a tiny Fig. 6 sweep short")
    p.add_argument("--predict-data", default="", metavar="PATH",
                   help="mutdet-table3: the DOTA-v1.0 test images (full scenes) every fine-tuned row predicts on "
                        "(tiny default: SynthSOI-RGB test images, cut into 128-px patches to exercise the merge)")
    p.add_argument("--weights", nargs="*", default=[], metavar="FAMILY:PATH",
                   help="extra Tab. 3/4 rows: ViT weights of another pre-training (clip, dinov2 or internvit)")
    for stage in ("csia", "finetune", "sam", "mutdet"):
        p.add_argument(f"--{stage}-args", default="", help=f"extra arguments of every {stage} run (quoted)")
    args = p.parse_args(argv)
    root = Path(args.runs or ("runs/tiny-v3" if args.scale == "tiny" else f"runs/{args.scale}"))  # v3: beside v2
    weights = []
    for w in args.weights:
        family, sep, path = w.partition(":")
        if not sep or family not in babelrs.VIT_FAMILIES:
            raise SystemExit(f"error: --weights {w!r}: expected FAMILY:PATH, FAMILY one of {', '.join(babelrs.VIT_FAMILIES)}")
        weights.append((family, path))
    extra = {stage: shlex.split(getattr(args, f"{stage}_args")) for stage in ("csia", "finetune", "sam", "mutdet")}
    extra["weights"] = weights
    missing = [f"--{stage}-args '--data ...'" for stage in DATA_STAGES[args.sweep.split("-")[0]]
               if args.scale != "tiny" and "--data" not in extra[stage]]
    if missing and not args.status:  # paper-size models on SynthSOI are never what is meant
        line = (f"--sweep {args.sweep} --scale {args.scale} trains the papers' models on their data: give "
                f"{' and '.join(missing)} (docs/tables.md has the paper-scale commands)")
        if not args.dry_run:
            raise SystemExit(f"error: {line}")
        print(f"warning: {line}; the commands below lack it")
    tiny = args.scale == "tiny"
    runs = seeded_runs(sweep_runs(args.sweep, args.scale, extra, args.amp),
                       args.seeds or (TINY_V3_SEEDS.get(args.sweep, TINY_SEEDS) if tiny else 1))
    if tiny and args.sweep == "babelrs-table5" and not args.seeds:  # v3: 8 seeds for (d) and the last layer only
        runs = [(f, a) for f, a in runs if not (any(f"-{m}-" in f for m in TINY_V3_FEW) and int(f.rsplit("-seed", 1)[1]) >= TINY_SEEDS)]
    if args.rows:  # a part of the table: the rows asked for, and what they read
        unknown = sorted(set(args.rows) - {seed_group(f) for f, _ in runs})
        if unknown:
            raise SystemExit(f"error: --rows {' '.join(unknown)}: not a row of {args.sweep} "
                             f"({', '.join(sorted({seed_group(f) for f, _ in runs}))})")
        keep = {f for f, _ in runs if seed_group(f) in args.rows}
        keep |= {r for f, a in runs if f in keep for r in reads(a)}
        runs = [(f, a) for f, a in runs if f in keep]
    threads = args.threads if args.threads >= 0 else max(1, TINY_THREADS // args.jobs) if args.scale == "tiny" else 0
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {}))
    if args.status:
        for folder, _ in runs:
            print(f"{folder:<36} {run_status(root / folder)}")
        return 0
    if tiny and not args.dry_run and args.sweep.startswith("babelrs-"):  # before anything is generated or loaded
        vit_gate()
    launch = [sys.executable] if args.nproc == 1 else ["torchrun", f"--nproc_per_node={args.nproc}"]
    if args.scale == "tiny" and not args.dry_run and any(TINY_V3_SYNTH in argv for _, argv in runs):
        datasets.make_synthetic(TINY_V3_SYNTH, n_test=TINY_V3_TEST)  # v3: 200 test images a modality
    if args.scale == "tiny" and not args.dry_run:  # the shipped stand-ins every seed starts from: missing is an error now
        for model in {"babelrs": ("vit",), "mutdet": ("resnet18",)}.get(args.sweep.split("-")[0], ("vit", "resnet18")):
            train.standin("fractal", model)
    todo = []
    for folder, run_argv in runs:
        run = root / folder
        if (run / "finished.json").exists():
            print(f"[sweep] {run}: finished, skipped")
            continue
        stage = run_argv[1]
        start = [sys.executable] if stage == "sam" else launch  # the sam stage runs in one process
        if (run / "config.json").exists():  # interrupted: go on where it stopped
            cmd = start + ["train.py", "--stage", stage, "--resume", str(run)]
        else:
            cmd = start + ["train.py"] + [a.replace("{runs}", str(root)) for a in run_argv] + ["--out", str(run)]
        if args.dry_run:
            print(f"[sweep] {shlex.join(cmd)}", flush=True)
        todo.append((folder, reads(run_argv), cmd))
    status = 0 if args.dry_run else run_commands(todo, env, args.jobs, root)
    if status:
        return status
    if args.dry_run:  # what the table costs, before it starts
        print(f"\n[cost] {args.sweep} at scale {args.scale}: cost of each run (FLOPs counted on one micro-batch; "
              f"hours on one GPU at {args.gpu_tflops:g} TFLOPS x {args.mfu:g} MFU)")
        print(f"{'run':<34}{'stage':<10}{'params':>9}{'TFLOP/step':>12}{'steps':>9}{'PFLOP':>10}{'hours':>8}"
              f"{'peak GB':>9}")
        hours = 0.0
        for folder, run_argv in runs:
            c = run_cost([a.replace("{runs}", str(root)) for a in run_argv], args.scale, args.gpu_tflops, args.mfu)
            if "missing" in c:
                print(f"{folder:<34}{c['stage']:<10}  {c['missing']}")
                continue
            hours += c["hours"]
            print(f"{folder:<34}{c['stage']:<10}{c['params'] / 1e6:>8.0f}M{c['flops_step'] / 1e12:>12.2f}{c['steps']:>9}"
                  f"{c['flops'] / 1e15:>10.1f}{c['hours']:>8.1f}{c['peak_gb']:>9.1f}")
        print(f"{'total':<34}{'':<10}{'':>9}{'':>12}{'':>9}{'':>10}{hours:>8.1f}   (peak: one micro-batch, CPU, fp32)")
    if args.sweep == "mutdet-table3":  # the server scores Tab. 3: write each row's submission
        test = args.predict_data or str(Path(train.FINETUNE_PRESETS["tiny"].synth_root) / "rgb" / "test" / "images")
        patch = ["--patch", "128", "--gap", "32"] if args.scale == "tiny" else ["--patch", "1024", "--gap", "200"]
        for folder in [f for f, _ in runs if f.startswith("ft-")]:
            out = root / folder / SUBMISSION
            cmd = [sys.executable, "eval.py", "--run", str(root / folder), "--predict", test, "--out", str(out),
                   "--zip"] + patch
            print(f"[sweep] {shlex.join(cmd)}", flush=True)
            if args.dry_run or (out / "submission.zip").exists():
                continue
            status = subprocess.call(cmd)
            if status:
                return status
        if not args.dry_run:
            print(f"[sweep] DOTA-v1.0 submissions: {root}/ft-*-dota/{SUBMISSION}/submission.zip "
                  "(upload each to the evaluation server; Tab. 3 reports its mAP)")
        return 0
    if args.dry_run:
        return 0
    if args.sweep in TINY_ONLY:  # the pilot's and the checks' own tables
        text, csv = (format_pilot if args.sweep == "tiny-pilot" else format_tiny_checks)([root / f for f, _ in runs])
        datasets.atomic_write_text(root / f"{args.sweep}.csv", csv)
        datasets.atomic_write_text(root / f"{args.sweep}.md", text)
        print(text)
        return 0
    table = format_table_runs(args.sweep, [root / f for f, _ in runs if f.startswith("ft-")])
    for suffix, text in (("md", table["markdown"]), ("csv", table["csv"])):
        datasets.atomic_write_text(root / f"{args.sweep}.{suffix}", text)
    if args.sweep in BAR_COLUMN:  # the table as bars with the seeds' spread, beside the paper's
        plot_table_bars(args.sweep, table, root / f"{args.sweep}.png")
    if args.sweep == "babelrs-fig6":  # the figure's two curves, ours above the paper's
        facts = [run_facts(root / f) for f, _ in runs if f.startswith("ft-")]
        plot_fig6(fig6_series(facts), root / f"{args.sweep}.png")
    print(table["markdown"])
    print(f"[sweep] table written to {root / args.sweep}.md and .csv")
    return 0


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = datasets.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="python tables.py --sweep NAME --help: the options of a sweep")
    p.add_argument("--table", choices=TABLES, help="collect the metrics.json of RUN folders into a paper's table")
    p.add_argument("--plot", action="store_true", help="draw the figures of the RUN folders into --out")
    p.add_argument("runs", nargs="*", metavar="RUN", help="run folders")
    p.add_argument("--out", default="", help="--table: also write OUT.md and OUT.csv; --plot: folder (default figures)")
    p.add_argument("--image", default="", help="--plot: draw detections on this image (default the first test image)")
    p.add_argument("--score", type=float, default=0.3, help="--plot: score threshold of the drawn detections")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="--plot: for detections")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--sweep" in argv:
        return run_sweep(argv)
    p = build_parser()
    args = p.parse_args(argv)
    if not (args.table or args.plot) or not args.runs:
        p.error("give --sweep NAME, or --table NAME RUN..., or --plot RUN...")
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


if __name__ == "__main__":
    sys.exit(main())
