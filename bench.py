"""Benchmarks. Each sub-command prints its figure as a ratio to a named reference measured in the
same run, on this machine.

    python bench.py iou    # rotated IoU of 1000 x 1000 boxes vs shapely 2 (sparse and dense scenes)
    python bench.py eval   # rotated VOC mAP on a DOTA-val-sized workload vs the devkit's per-detection loop
    python bench.py detr   # rotated DETR training steps (tiny preset, paper size) vs torchvision's Faster R-CNN
    python bench.py sam    # the sam stage's images/s (tiny preset) and SAM ViT-B mask generation vs its image encoder alone
    python bench.py mutdet # MutDet pre-training steps (tiny preset, paper size) vs the DETReg row (one plain pass)
    python bench.py vit    # CSIA steps (tiny preset), InternViT-300M forward+backward vs torch.nn.TransformerEncoder
    python bench.py tiny   # every tiny step part by part (data, forward, matching, losses, backward, optimizer) vs this CPU's matmul rate
    python bench.py gpu    # the prepared GPU check (README: "The GPU check"); --dry-run runs it on the CPU

May import: every file of the project (it sits at the top of the import graph, DESIGN.md).
"""
import argparse
import dataclasses
import json
import math
import os
import platform
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import eval as ev
import rotated_ops as ro


def _boxes(n, canvas, seed, dtype=torch.float64):
    """Centres uniform on a canvas, sides in [8, 128] px, any angle (the anchors of the reference notes)."""
    g = torch.Generator().manual_seed(seed)
    c = torch.rand(n, 2, generator=g, dtype=torch.float64) * canvas
    wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * 120 + 8
    t = (torch.rand(n, 1, generator=g, dtype=torch.float64) - 0.5) * math.pi
    return ro.regularize_obb(torch.cat([c, wh, t], 1)).to(dtype)


def _interleaved(fns, repeat):
    """Min time and last output of each function, the repeats taken in turn (fn1, fn2, fn1, ...) so
    that a slow spell of the machine falls on both."""
    best, outs = [math.inf] * len(fns), [None] * len(fns)
    for _ in range(repeat):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            outs[k] = fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return list(zip(best, outs))


def _best_of(fn, repeat):
    return _interleaved([fn], repeat)[0]


def bench_iou(args):
    import shapely
    import torchvision

    print(f"rotated IoU, {args.n} x {args.n} boxes, torch {torch.__version__}, shapely {shapely.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    for scene, canvas in (("sparse (DOTA-like)", 1024.0), ("dense", 64.0)):
        b1, b2 = _boxes(args.n, canvas, 0), _boxes(args.n, canvas, 1)
        p1 = shapely.polygons(ro.obb_corners(b1).numpy())
        p2 = shapely.polygons(ro.obb_corners(b2).numpy())

        def shapely_dense():
            inter = shapely.area(shapely.intersection(p1[:, None], p2[None]))
            return inter / (shapely.area(p1)[:, None] + shapely.area(p2)[None] - inter)

        def shapely_strtree():
            tree = shapely.STRtree(p2)
            i, j = tree.query(p1, predicate="intersects")
            inter = shapely.area(shapely.intersection(p1[i], p2[j]))
            out = np.zeros((len(p1), len(p2)))
            out[i, j] = inter / (shapely.area(p1[i]) + shapely.area(p2[j]) - inter)
            return out

        t_tree, ref = _best_of(shapely_strtree, args.repeat)
        t_dense, _ = (_best_of(shapely_dense, 1) if scene == "dense" else (float("nan"), None))
        overlap = float((ref > 0).mean())
        print(f"\n{scene}: {overlap:.1%} of pairs overlap")
        print(f"  shapely STRtree + intersection      {t_tree:8.3f} s")
        if scene == "dense":
            print(f"  shapely vectorised intersection     {t_dense:8.3f} s")
        for dtype in (torch.float64, torch.float32):
            x1, x2 = b1.to(dtype), b2.to(dtype)
            # the peer: torchvision's compiled C++ kernel, degrees counter-clockwise: -θ of our le90
            # clockwise radians (with +θ it scores other boxes: IoU errors up to 0.4)
            d1, d2 = (torch.cat([x[:, :4], -torch.rad2deg(x[:, 4:])], 1) for x in (x1, x2))
            (t_tv, tv), (t_ours, ours) = _interleaved([lambda: torchvision.ops.box_iou(d1, d2, fmt="cxcywhr"),
                                                       lambda: ro.box_iou_rotated(x1, x2)], args.repeat)
            name = str(dtype)[6:]
            err = lambda r: np.abs(r.double().numpy() - ref).max()  # noqa: E731
            line = f"  box_iou_rotated {name:<8}            {t_ours:8.3f} s   {t_tree / t_ours:6.1f}x vs STRtree"
            if scene == "dense":
                line += f"   {t_dense / t_ours:6.1f}x vs vectorised"
            print(line + f"   max |err| {err(ours):.1e}")
            print(f"  torchvision {torchvision.__version__} box_iou(fmt='cxcywhr') {name} {t_tv:8.3f} s   max |err| "
                  f"{err(tv):.1e};  ours / torchvision: {t_ours / t_tv:.2f}")


def _dota_like_workload(n_images, n_classes, dets_per_image, seed=0):
    """Ground truths and detections of a DOTA-val-sized evaluation: ~40 objects an image, detections
    around them (jittered, duplicated) plus clutter, spread over the classes."""
    rng = np.random.default_rng(seed)
    dets, annots = [], []
    for i in range(n_images):
        n = int(rng.integers(5, 80))
        boxes = _boxes(n, 1024.0, seed * 100_000 + i).numpy()
        labels = rng.integers(0, n_classes, n)
        annots.append(dict(boxes=boxes, labels=labels, difficult=rng.random(n) < 0.1))
        k = dets_per_image
        src = rng.integers(0, n, k)
        d = boxes[src] + rng.normal(0, [4, 4, 4, 4, 0.05], (k, 5))
        d[:, 2:4] = np.abs(d[:, 2:4]) + 1
        clutter = rng.random(k) < 0.3
        d[clutter, :2] = rng.random((int(clutter.sum()), 2)) * 1024
        d_labels = np.where(rng.random(k) < 0.9, labels[src], rng.integers(0, n_classes, k))
        scores = rng.random(k)
        dets.append([np.concatenate([d[d_labels == c], scores[d_labels == c, None]], 1) for c in range(n_classes)])
    return dets, annots


def _devkit_loop(dets, annots, thrs, n_classes):
    """The DOTA devkit's voc_eval structure: one detection at a time, IoU against its image's ground
    truths of the class (our exact IoU in place of polyiou), per class and threshold."""
    aps = np.zeros((len(thrs), n_classes))
    for c in range(n_classes):
        gts = [(a["boxes"][a["labels"] == c], a["difficult"][a["labels"] == c]) for a in annots]
        npos = sum(int((~d).sum()) for _, d in gts)
        rows = [(i, row) for i, per in enumerate(dets) for row in per[c]]
        rows.sort(key=lambda r: -r[1][5])
        for t, thr in enumerate(thrs):
            matched = [np.zeros(len(g), bool) for g, _ in gts]
            tp, fp = np.zeros(len(rows)), np.zeros(len(rows))
            for k, (i, row) in enumerate(rows):
                g, diff = gts[i]
                if len(g) == 0:
                    fp[k] = 1
                    continue
                ious = ro.box_iou_rotated(torch.from_numpy(row[None, :5]), torch.from_numpy(g))[0].numpy()
                j = int(ious.argmax())
                if ious[j] >= thr:
                    if not diff[j]:
                        if not matched[i][j]:
                            tp[k], matched[i][j] = 1, True
                        else:
                            fp[k] = 1
                else:
                    fp[k] = 1
            tp, fp = np.cumsum(tp), np.cumsum(fp)
            aps[t, c] = ev.voc_ap(tp / max(npos, 1), tp / np.maximum(tp + fp, 1e-12), "area")
    return aps


def bench_eval(args):
    thrs = ev.COCO_IOUS
    print(f"eval_rbbox_map: {args.images} images, {args.classes} classes, {args.dets} detections an image, "
          f"{len(thrs)} IoU thresholds")
    t0 = time.perf_counter()
    dets, annots = _dota_like_workload(args.images, args.classes, args.dets)
    print(f"  workload built in {time.perf_counter() - t0:.1f} s "
          f"({sum(len(a['labels']) for a in annots)} ground truths, {args.images * args.dets} detections)")
    t_ours, res = _best_of(lambda: ev.eval_rbbox_map(dets, annots, thrs, "area"), 1)
    print(f"  eval_rbbox_map (vectorised)                 {t_ours:8.2f} s   mAP@[.5:.95] {res['mean']:.4f}")
    n_sub = max(1, args.images // args.ref_fraction)
    sub_d, sub_a = dets[:n_sub], annots[:n_sub]
    t_ref, aps = _best_of(lambda: _devkit_loop(sub_d, sub_a, thrs, args.classes), 1)
    check = ev.eval_rbbox_map(sub_d, sub_a, thrs, "area")["ap"]
    agree = np.nanmax(np.abs(np.where(np.isnan(check), 0, check) - aps))
    t_ref_full = t_ref * args.images / n_sub
    print(f"  devkit-style loop on {n_sub} images                {t_ref:8.2f} s   (x{args.images / n_sub:.0f} -> "
          f"{t_ref_full:.0f} s for the workload; APs agree to {agree:.1e})")
    print(f"  speed-up {t_ref_full / t_ours:.1f}x; budget: {t_ours:.1f} s of 60 s")


def _train_step_times(runs, repeat: int, warmup: int) -> list:
    """Best-of-`repeat` seconds of forward + backward + AdamW step of each (model, forward) in `runs`,
    the repeats taken in turn (`_interleaved`), after `warmup` steps of each."""
    steps = []
    for model, forward in runs:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

        def step(model=model, forward=forward, opt=opt):
            loss = forward()
            opt.zero_grad()
            loss.backward()
            opt.step()
        for _ in range(warmup):
            step()
        steps.append(step)
    return [t for t, _ in _interleaved(steps, repeat)]


def _train_step_time(model, forward, repeat: int, warmup: int = 1) -> float:
    return _train_step_times([(model, forward)], repeat, warmup)[0]


def _peer_deformable_detr(cfg, num_classes: int):
    """The like-for-like peer of our rotated DETR: transformers' `DeformableDetrForObjectDetection`,
    two-stage with box refinement, of the same width, depths, heads, queries, levels, points, FFN and
    dropout (also in the FFN's hidden layer and the decoder's attention weights, as mmcv's), on a
    randomly initialised transformers ResNet of the same depth whose stem and first stage are frozen
    and the rest trained, as ours (its BatchNorm is frozen, as ours). It has no denoising queries and
    no angle head, which ours adds."""
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig
    deep = cfg.backbone == "resnet50"
    backbone = ResNetConfig(depths=[3, 4, 6, 3] if deep else [2, 2, 2, 2],
                            hidden_sizes=[256, 512, 1024, 2048] if deep else [64, 128, 256, 512],
                            layer_type="bottleneck" if deep else "basic", out_features=["stage2", "stage3", "stage4"])
    peer = DeformableDetrForObjectDetection(DeformableDetrConfig(
        two_stage=True, with_box_refine=True, use_timm_backbone=False, use_pretrained_backbone=False, backbone=None,
        backbone_config=backbone, d_model=cfg.dim, encoder_layers=cfg.enc_layers, decoder_layers=cfg.dec_layers,
        encoder_ffn_dim=cfg.ffn, decoder_ffn_dim=cfg.ffn, encoder_attention_heads=cfg.heads,
        decoder_attention_heads=cfg.heads, num_queries=cfg.num_queries, two_stage_num_proposals=cfg.num_queries,
        num_feature_levels=cfg.levels, encoder_n_points=cfg.points, decoder_n_points=cfg.points,
        # dropout where ours (mmcv) has it: residuals, the FFN's hidden layer, the decoder's attention weights
        num_labels=num_classes, dropout=cfg.dropout, attention_dropout=cfg.dropout, activation_dropout=cfg.dropout))
    # transformers means to train ResNet stages 2-4 but matches "stage.1" against names "stages.1", so
    # it freezes the whole backbone; train what ours trains: all but the stem and the first stage
    for name, p in peer.named_parameters():
        if ".backbone." in name:
            p.requires_grad_(".embedder." not in name and ".stages.0." not in name)
    return peer.train()


def _peer_targets(boxes: list, labels: list, size: int) -> list:
    """Our le90 boxes in pixels -> the peer's horizontal (cx, cy, w, h) / size and labels."""
    return [dict(class_labels=l, boxes=ro.hbb_xyxy_to_cxcywh(ro.obb2hbb(b)).float().clamp(0, size) / size)
            for b, l in zip(boxes, labels)]


def _report_compiled(model, forward, t_eager: float, t_peer: float, args) -> None:
    """The same training step after `train.compile_layers` (in place), beside the eager time."""
    import train
    t0 = time.perf_counter()
    layers = train.compile_layers(model)
    t_compiled = _train_step_time(model, forward, args.repeat, args.warmup + 1)  # the first step compiles
    print(f"    --compile ({layers} layers, inductor; {time.perf_counter() - t0:.0f} s with compilation): "
          f"{t_compiled:.2f} s a step; compiled / eager {t_compiled / t_eager:.2f}; ratio ours / peer {t_compiled / t_peer:.2f}")


def bench_detr(args):
    """Training speed of the rotated DETR. Reference, in the same run on the same images and boxes:
    transformers' Deformable DETR of the same size (two-stage, box refinement, same frozen stages and
    dropout; `_peer_deformable_detr`), and at paper size also torchvision's Faster R-CNN R50-FPN."""
    import torchvision

    import babelrs
    import datasets
    import train
    torch.manual_seed(0)
    print(f"rotated DETR training steps, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}")
    # tiny preset on SynthSOI-RGB, batches exactly as train.py builds them
    cfg = dataclasses.replace(train.FINETUNE_PRESETS["tiny"], resnet="")  # random weights: the same work
    if args.quick:  # 128 px: enough tokens for the peer's 100 two-stage proposals
        cfg = dataclasses.replace(cfg, image_size=128)
    root = datasets.make_synthetic(cfg.synth_root, **(QUICK_SYNTH if args.quick else {}))
    split = datasets.load_detection_split(root / "rgb" / "train", "rgb")
    sources = [dict(modality="rgb", root=str(root / "rgb"), classes=split.classes, box_type="obb")]
    model = babelrs.build_detector(**train.model_args(cfg, sources)).train()
    batches = datasets.StepBatches([split], datasets.MultiSourceSampler([len(split)], [cfg.batch_size]), cfg, 0)
    batch = batches[0]
    targets = [dict(boxes=b, labels=l, size=s) for b, l, s in zip(batch["boxes"], batch["labels"], batch["size"])]

    def tiny_forward():
        return sum(model(batch["images"], batch["masks"], batch["modality"], targets)["losses"].values())
    n = len(batch["modality"])
    peer = _peer_deformable_detr(cfg, len(split.classes))
    size = batch["images"].shape[-1]
    peer_targets = _peer_targets(batch["boxes"], batch["labels"], size)
    t_tiny, t_peer = _train_step_times(
        [(model, tiny_forward),
         (peer, lambda: peer(pixel_values=batch["images"], pixel_mask=(~batch["masks"]).long(), labels=peer_targets).loss)],
        args.repeat, args.warmup)
    print(f"  tiny preset ({cfg.backbone}, {cfg.enc_layers}/{cfg.dec_layers} layers, {cfg.image_size} px, batch {n}): "
          f"{t_tiny:.2f} s a step = {n / t_tiny:.2f} samples/s; transformers Deformable DETR of the same size "
          f"{t_peer:.2f} s; ratio ours / peer {t_tiny / t_peer:.2f}")
    if args.compile:
        _report_compiled(model, tiny_forward, t_tiny, t_peer, args)

    # paper size: ResNet-50, 6/6 layers, 300 queries, 800 px, batch 2, 20 objects an image
    B, size = 2, args.size
    g = torch.Generator().manual_seed(0)
    images = torch.randn(B, 3, size, size, generator=g)
    masks = torch.zeros(B, size, size, dtype=torch.bool)
    boxes = [ro.regularize_obb(torch.cat([torch.rand(20, 2, generator=g) * (size - 200) + 100,
                                          torch.rand(20, 2, generator=g) * 80 + 10,
                                          (torch.rand(20, 1, generator=g) - 0.5) * math.pi], 1)) for _ in range(B)]
    labels = [torch.randint(0, 15, (20,), generator=g) for _ in range(B)]
    paper = train.FINETUNE_PRESETS["paper"]
    model = babelrs.build_detector(**train.model_args(paper, [dict(sources[0], classes=[str(c) for c in range(15)])])).train()
    tg = [dict(boxes=b, labels=l, size=(size, size)) for b, l in zip(boxes, labels)]
    peer = _peer_deformable_detr(paper, 15)
    ptg = _peer_targets(boxes, labels, size)
    t_detr, t_peer = _train_step_times([(model, lambda: sum(model(images, masks, ["rgb"] * B, tg)["losses"].values())),
                                        (peer, lambda: peer(pixel_values=images, labels=ptg).loss)], args.repeat, args.warmup)
    print(f"  paper size ({paper.backbone}, {paper.enc_layers}/{paper.dec_layers} layers, {paper.num_queries} queries, "
          f"{size} px, batch {B}, dropout {paper.dropout}): ours {t_detr:.2f} s; transformers Deformable DETR "
          f"{t_peer:.2f} s; ratio ours / peer {t_detr / t_peer:.2f}")
    if args.compile:
        _report_compiled(model, lambda: sum(model(images, masks, ["rgb"] * B, tg)["losses"].values()), t_detr, t_peer, args)
    if args.quick:
        return
    frcnn = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None,
                                                                 min_size=size, max_size=size).train()
    ftg = [dict(boxes=ro.obb2hbb(b), labels=l + 1) for b, l in zip(boxes, labels)]
    t_ref = _train_step_time(frcnn, lambda: sum(frcnn(list(images), ftg).values()), args.repeat, args.warmup)
    print(f"  second reference: torchvision Faster R-CNN R50-FPN, same images {t_ref:.2f} s; ratio ours / Faster R-CNN "
          f"{t_detr / t_ref:.2f}")


def bench_vit(args):
    """CSIA training speed of the tiny preset, and forward+backward of the paper-size ViT
    (InternViT-300M, 448 px). References, in the same run: transformers' InternVL vision tower of the
    same size (`_peer_internvit`), and PyTorch's nn.TransformerEncoder on the same tokens."""
    import babelrs
    import datasets
    import train
    torch.manual_seed(0)
    print(f"ViT / CSIA, torch {torch.__version__}, {torch.get_num_threads()} threads")
    cfg = train.CSIA_PRESETS["tiny"]
    root = datasets.make_synthetic(cfg.synth_root, **(QUICK_SYNTH if args.quick else {}))
    records = babelrs.read_instruction_meta(root / "instructions" / "meta.json")
    texts = [babelrs.SYSTEM_MESSAGE] * len(records) + [t["value"] for r in records for t in r["conversations"]]
    tok = babelrs.build_tokenizer(texts, cfg.vocab_size)
    vit = babelrs.ViT(cfg.vit_dim, cfg.vit_depth, cfg.vit_heads, cfg.patch, cfg.image_size)
    llm = babelrs.build_llm("", len(tok), cfg.llm_dim, cfg.llm_layers, cfg.llm_heads, cfg.llm_kv_heads, cfg.llm_ffn)
    model = babelrs.CSIA(vit, llm, tok.convert_tokens_to_ids(babelrs.IMG_CONTEXT), cfg.merge, tuple(cfg.layers), cfg.tau)
    data = babelrs.InstructionDataset(records, tok, cfg.image_size, (cfg.image_size // cfg.patch) ** 2 // 4)
    batch = babelrs.collate_instructions([data[i] for i in range(cfg.batch_size)], tok.pad_token_id)
    t_csia = _train_step_time(model, lambda: model(batch["pixels"], batch["input_ids"], batch["attention_mask"],
                                                   batch["labels"], step=10)["loss"], args.repeat, args.warmup)
    print(f"  CSIA tiny preset (ViT {cfg.vit_dim}x{cfg.vit_depth}, {cfg.image_size} px, batch {cfg.batch_size}): "
          f"{t_csia:.3f} s a step = {cfg.batch_size / t_csia:.1f} samples/s; {cfg.steps} steps ~ {t_csia * cfg.steps / 60:.1f} min")

    paper = train.CSIA_PRESETS["paper"]
    if args.quick:  # the same path with a small ViT
        paper = dataclasses.replace(paper, image_size=56, vit_dim=128, vit_depth=4, vit_heads=4, layers=[1, 2, 3, 4])
    vit = babelrs.ViT(paper.vit_dim, paper.vit_depth, paper.vit_heads, paper.patch, paper.image_size).train()
    x = torch.randn(args.batch, 3, paper.image_size, paper.image_size)

    def fwd_bwd():
        vit.zero_grad()
        hidden = vit(x)
        babelrs.merge_layers(hidden, tuple(paper.layers), 0.5).sum().backward()

    # reference: PyTorch's own pre-norm transformer encoder of the same size on the same tokens
    ref = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(
        paper.vit_dim, paper.vit_heads, 4 * paper.vit_dim, dropout=0.0, activation="gelu", batch_first=True,
        norm_first=True), paper.vit_depth, enable_nested_tensor=False).train()
    tokens = vit.embeddings(x).detach()

    def ref_fwd_bwd():
        ref.zero_grad()
        ref(tokens).sum().backward()
    peer = _peer_internvit(paper)

    def peer_fwd_bwd():
        peer.zero_grad()
        hidden = peer(pixel_values=x, output_hidden_states=True).hidden_states
        babelrs.merge_layers(list(hidden), tuple(paper.layers), 0.5).sum().backward()
    (t_ours, _), (t_ref, _), (t_peer, _) = _interleaved([fwd_bwd, ref_fwd_bwd, peer_fwd_bwd], args.repeat)
    print(f"  InternViT-300M ({paper.vit_dim}x{paper.vit_depth}, {paper.image_size} px, batch {args.batch}) "
          f"forward+backward with the LVSA merge: ours {t_ours:.2f} s; transformers InternVLVisionModel of the same "
          f"size {t_peer:.2f} s (ratio ours / peer {t_ours / t_peer:.2f}); torch.nn.TransformerEncoder on the same "
          f"tokens {t_ref:.2f} s (ratio ours / torch {t_ours / t_ref:.2f})")


def _peer_internvit(cfg):
    """The like-for-like peer of our ViT: transformers' InternVL vision tower (InternViT: pre-norm,
    layer scale 0.1, qkv bias, GELU MLP 4x, absolute positions), randomly initialised, same size."""
    import transformers
    from transformers import InternVLVisionConfig, InternVLVisionModel
    peer = InternVLVisionModel(InternVLVisionConfig(
        hidden_size=cfg.vit_dim, num_hidden_layers=cfg.vit_depth, num_attention_heads=cfg.vit_heads,
        intermediate_size=4 * cfg.vit_dim, attention_bias=True, image_size=[cfg.image_size] * 2,
        patch_size=[cfg.patch] * 2, layer_scale_init_value=0.1, norm_type="layer_norm", layer_norm_eps=1e-6,
        use_mean_pooling=True))
    print(f"    peer: transformers {transformers.__version__} InternVLVisionModel, attention "
          f"{peer.config._attn_implementation}")
    return peer.train()


def bench_sam(args):
    """Images/s of the sam stage's per-image work at the tiny preset, and SAM ViT-B (random
    weights, 1024 px, 32 x 32 points) mask generation. Reference: SAM's image encoder alone on the
    same image, in the same run (the share of the prompt decoding and filtering)."""
    import datasets
    import mutdet
    import train
    from transformers import SamConfig, SamModel
    torch.manual_seed(0)
    cfg = train.SAM_PRESETS["tiny"]
    if args.quick:
        cfg = dataclasses.replace(cfg, points_per_side=2, sam_image_size=64, crop=16)
    root = datasets.make_synthetic(cfg.synth_root, **(QUICK_SYNTH if args.quick else {}))
    split = datasets.load_detection_split(root / "rgb" / "train", "rgb")
    sam, trunk = mutdet.build_sam("", cfg.sam_image_size), mutdet.resnet_trunk(cfg.embed_backbone)
    images = [split[i]["image"] for i in range(min(args.images, len(split)))]

    def tiny():
        for im in images:
            masks = mutdet.generate_masks(sam, im, cfg.points_per_side, cfg.points_per_batch, cfg.pred_iou_thresh,
                                          cfg.stability_score_thresh, cfg.stability_score_offset, cfg.box_nms_thresh)
            boxes, _ = mutdet.proposals_from_masks(masks["masks"], cfg.max_boxes)
            norm = datasets.Normalize()(dict(image=im))["image"]
            mutdet.object_embeddings(norm, boxes, trunk, cfg.crop, cfg.context)
    t = _best_of(tiny, 1)[0]
    print(f"sam stage, tiny preset ({cfg.points_per_side}^2 points, random SAM, {cfg.embed_backbone} crops "
          f"{cfg.crop} px): {len(images) / t:.2f} images/s")
    if args.quick:
        return  # the ViT-B part takes minutes; its code path is the tiny one's with larger weights
    vitb = SamModel(SamConfig()).eval()  # transformers' default SAM is ViT-B (768 wide, 12 blocks), 1024 px
    image = (torch.rand(3, 800, 800) * 255).to(torch.uint8)
    t_gen = _best_of(lambda: mutdet.generate_masks(vitb, image), 1)[0]  # the official thresholds
    x = torch.randn(1, 3, 1024, 1024)
    with torch.no_grad():
        t_enc = _best_of(lambda: vitb.get_image_embeddings(x), 1)[0]
    print(f"SAM ViT-B (random weights, official thresholds), one 800 px image, 32 x 32 points in batches of 64: {t_gen:.1f} s "
          f"({1 / t_gen:.3f} images/s); its image encoder alone {t_enc:.1f} s (ratio {t_gen / t_enc:.2f})")


def bench_mutdet(args):
    """One MutDet pre-training step (enhanced branch + siamese branch + alignment). Reference: the
    DETReg row (`--no-enhance --embed-loss l1`: one plain decoding pass) on the same batch, in the
    same run: the ratio is the cost of mutual enhancement and the second decoding pass."""
    import datasets
    import detection
    import mutdet
    import train
    torch.manual_seed(0)
    print(f"MutDet pre-training steps, torch {torch.__version__}, {torch.get_num_threads()} threads")

    def build(cfg, classes, enhance):
        sources = [dict(modality="rgb", classes=classes, box_type="obb")]
        det = detection.build_detector(sources, cfg.backbone, "", cfg.frozen_bn, cfg.dim, cfg.heads, cfg.levels,
                                       cfg.points, cfg.enc_layers, cfg.dec_layers, cfg.ffn, cfg.dropout,
                                       cfg.num_queries, cfg.num_dn_queries, cfg.gn_groups)
        return mutdet.MutDetPretrainer(det, cfg.dim, enhance, True, True, cfg.enhance_depth, cfg.enhance_heads,
                                       cfg.enhance_mlp, "infonce" if enhance else "l1", cfg.freeze_backbone).train()

    def report(name, cfg, batch, classes):
        targets = [dict(boxes=b, labels=l, size=s, embeds=e)
                   for b, l, s, e in zip(batch["boxes"], batch["labels"], batch["size"], batch["embeds"])]
        times = []
        for enhance in (True, False):
            model = build(cfg, classes, enhance)
            times.append(_train_step_time(model, lambda: sum(model(batch["images"], batch["masks"], targets).values()),
                                          args.repeat, args.warmup))
        n, k = len(batch["boxes"]), sum(len(b) for b in batch["boxes"]) / len(batch["boxes"])
        print(f"  {name} ({cfg.backbone}, {cfg.enc_layers}/{cfg.dec_layers} layers, {cfg.num_queries} queries, "
              f"{batch['images'].shape[-1]} px, batch {n}, {k:.0f} boxes an image): MutDet {times[0]:.2f} s a step "
              f"({n / times[0]:.2f} samples/s); DETReg row {times[1]:.2f} s; ratio {times[0] / times[1]:.2f}")

    if not args.quick:  # tiny preset on the SynthSOI sam cache (minutes to build), batches as train.py builds them
        cfg = train.MUTDET_PRESETS["tiny"]
        data = mutdet.PseudoLabels(train.synth_sam_cache(cfg, 0))
        batch = datasets.StepBatches([data], datasets.MultiSourceSampler([len(data)], [cfg.batch_size]), cfg, 0)[0]
        report("tiny preset", cfg, batch, data.classes)
    # paper size: 1024 px, batch 2, 256 pseudo-classes, `--boxes` SAM boxes an image
    cfg = train.MUTDET_PRESETS["paper"]
    if args.quick:
        cfg = dataclasses.replace(cfg, image_size=64)
    g = torch.Generator().manual_seed(0)
    B, size, K = 2, cfg.image_size, args.boxes
    boxes = [_boxes(K, size, seed).float() for seed in range(B)]
    batch = dict(images=torch.randn(B, 3, size, size, generator=g), masks=torch.zeros(B, size, size, dtype=torch.bool),
                 boxes=boxes, labels=[torch.randint(0, 256, (K,), generator=g) for _ in range(B)],
                 size=[(size, size)] * B, embeds=[F.normalize(torch.randn(K, cfg.dim, generator=g), dim=-1)
                                                  for _ in range(B)])
    report("paper size", cfg, batch, [f"cluster_{i + 1}" for i in range(256)])


PAPER_STEPS = (("csia", "paper"), ("sam", "paper"), ("mutdet", "paper"), ("finetune", "paper"),
               ("finetune", "ars-detr-dota"), ("finetune", "babelrs"))
TINY_STEPS = (("csia", "tiny"), ("mutdet", "tiny"), ("finetune", "tiny"), ("finetune", "babelrs-tiny"))


def bench_paper(args):
    """One optimizer step of every stage at its paper preset, random weights and synthetic inputs of
    paper size (`tables.measure_step`; sam: the ViT-H image encoder and one batch of 64 point
    prompts), each in a fresh process so that its peak memory is its own. Prints time, peak memory,
    parameters and FLOPs, and writes them to `results/paper_step.json`, which
    `tables.py --sweep NAME --dry-run` reads to estimate what a table costs."""
    import json
    import subprocess
    import sys
    if args.quick:  # one tiny stage, in this process, nothing written
        import tables
        import train
        r = tables.measure_step("csia", train.CSIA_PRESETS["tiny"])
        print(f"  csia tiny (quick): {r['seconds']:.1f} s, {r['flops'] / 1e9:.1f} GFLOP, {r['params'] / 1e6:.1f}M parameters")
        return
    if args.one:
        import tables
        import train
        stage, preset = args.one.split(":")
        torch.manual_seed(0)
        r = tables.measure_step(stage, train.PRESETS[stage][preset], tiles=args.tiles)
        print("RESULT " + json.dumps(dict(r, preset=preset, threads=torch.get_num_threads())))
        return
    print(f"one step of each stage at its {'tiny' if args.tiny else 'paper'} preset, torch {torch.__version__}, "
          f"{args.threads} threads, {platform.processor() or platform.machine()}, float32")
    results = {}
    for stage, preset in (TINY_STEPS if args.tiny else PAPER_STEPS):
        if args.only and stage not in args.only:
            continue
        cmd = [sys.executable, __file__, "paper", "--one", f"{stage}:{preset}", "--threads", str(args.threads),
               "--tiles", str(args.tiles)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            print(f"  {stage} {preset}: failed\n{out.stderr[-1500:]}")
            continue
        r = json.loads(line[len("RESULT "):])
        results[f"{stage}:{preset}"] = r
        print(f"  {stage:<9}{preset:<14} micro-batch {r['micro']} ({r['tiles']} tile(s) a sample for csia): "
              f"{r['seconds']:7.1f} s, peak {r['peak_rss_gb']:5.1f} GB, {r['params'] / 1e6:7.1f}M parameters "
              f"({r['trained'] / 1e6:.1f}M trained), {r['flops'] / 1e12:8.2f} TFLOP")
    path = Path(__file__).resolve().parent / "results" / ("tiny_step.json" if args.tiny else "paper_step.json")
    old = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps(dict(old, **results), indent=2) + "\n")
    print(f"written to {path}")


# ---------------------------------------------------------------------------------------------
# The tiny steps against what this CPU can do (python bench.py tiny)
# ---------------------------------------------------------------------------------------------

def _matmul_gflops(n: int = 2048, repeat: int = 3) -> float:
    """This machine's float32 matrix-product rate, measured now (the ceiling of dense work)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    t, _ = _best_of(lambda: a @ b, repeat)
    return 2 * n ** 3 / t / 1e9


class _PartTimer:
    """Seconds spent inside the matcher and the criterion (wrapped for the benchmark only, restored
    after): the rest of a forward pass is the model itself."""

    def __init__(self):
        import detection
        self.classes = (detection.HungarianMatcher, detection.SetCriterion)
        self.seconds = {"matching": 0.0, "losses": 0.0}
        self.saved = [cls.forward for cls in self.classes]

    def __enter__(self):
        for cls, key, real in zip(self.classes, ("matching", "losses"), self.saved):
            def timed(module, *a, _real=real, _key=key, **k):
                t0 = time.perf_counter()
                try:
                    return _real(module, *a, **k)
                finally:
                    self.seconds[_key] += time.perf_counter() - t0
            cls.forward = timed
        return self

    def __exit__(self, *exc):
        for cls, real in zip(self.classes, self.saved):
            cls.forward = real


FORWARD_PARTS = ("backbone", "vit", "llm", "mlp1", "neck", "head", "encoder", "decoder", "criterion", "enhancement",
                 "patch_enc_decode", "feature_embed")  # the modules a tiny forward pass is broken into


class _ModuleTimer:
    """Forward seconds of each part of a model (FORWARD_PARTS by the last part of a module's name,
    "head" for each modality's head; summed over the modality heads and over the layers of a
    ModuleList), by hooks removed after. A head includes its encoder, decoder and criterion, and the
    criterion its matching."""

    def __init__(self, model):
        self.seconds, self.handles, started = {}, [], {}
        for name, module in model.named_modules():
            parts = name.split(".")
            key = "head" if len(parts) >= 2 and parts[-2] == "heads" else parts[-1]
            if key not in FORWARD_PARTS:
                continue
            self.seconds[key] = 0.0
            for i, m in enumerate(module if isinstance(module, torch.nn.ModuleList) else [module]):
                def pre(_m, a, _id=(name, i)):
                    started[_id] = time.perf_counter()

                def post(_m, a, o, _id=(name, i), _key=key):
                    self.seconds[_key] += time.perf_counter() - started[_id]
                self.handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def _tiny_models(quick: bool) -> dict:
    """{name: (model, batch function k -> inputs, loss function(model, inputs))} for every tiny step,
    on the data its stage trains on (SynthSOI through the training batches; MutDet on synthetic SAM
    boxes, whose cache takes minutes to build)."""
    import babelrs
    import datasets
    import tables
    import train
    root = datasets.make_synthetic("data/synthsoi", **(QUICK_SYNTH if quick else {}))
    small = dict(image_size=64) if quick else {}
    # the work is pinned, not read from the presets, so that another commit's code (--baseline) does the same:
    # babelrs-tiny as tiny protocol v3 runs it (the adapter at 192 px, patch 16)
    pinned = {"tiny": {}, "babelrs-tiny": dict(vit_pyramid="adapter", vit_patch=16, image_size=192)}
    out = {}
    for name, preset in (("finetune tiny", "tiny"), ("finetune babelrs-tiny", "babelrs-tiny")):
        cfg = dataclasses.replace(train.FINETUNE_PRESETS[preset], resnet="", init="", **{**pinned[preset], **small})
        torch.manual_seed(0)
        mods = cfg.synth_modalities
        splits = [datasets.load_detection_split(root / m / "train", m) for m in mods]
        for i, s in enumerate(splits):
            s.source = i
        ratios = list(cfg.source_ratio) or [cfg.batch_size]
        sources = [dict(modality=m, classes=s.classes, box_type=s.box_type) for m, s in zip(mods, splits)]
        model = babelrs.build_detector(**train.model_args(cfg, sources)).train()
        batches = datasets.StepBatches(splits, datasets.MultiSourceSampler([len(s) for s in splits], ratios), cfg, 0)

        def loss(m, b):
            t = [dict(boxes=x, labels=l, size=s) for x, l, s in zip(b["boxes"], b["labels"], b["size"])]
            return sum(m(b["images"], b["masks"], b["modality"], t)["losses"].values())
        out[name] = (model, batches.__getitem__, loss)
    import mutdet
    mcfg = dataclasses.replace(train.MUTDET_PRESETS["tiny"], resnet="", **small)
    torch.manual_seed(0)
    pre = mutdet.build_pretrainer(mcfg, [f"c{i}" for i in range(16)], mcfg.dim).train()

    def mutdet_batch(k):
        g = torch.Generator().manual_seed(k)
        targets = tables.synthetic_targets(mcfg.batch_size, mcfg.image_size, 16, g, objects=40, embed_dim=mcfg.dim)
        return dict(images=torch.randn(mcfg.batch_size, 3, mcfg.image_size, mcfg.image_size, generator=g),
                    masks=torch.zeros(mcfg.batch_size, mcfg.image_size, mcfg.image_size, dtype=torch.bool), targets=targets)
    out["mutdet tiny (synthetic SAM boxes)"] = (pre, mutdet_batch, lambda m, b: sum(m(b["images"], b["masks"], b["targets"]).values()))
    cfg = dataclasses.replace(train.CSIA_PRESETS["tiny"], vit="", **(dict(image_size=32) if quick else {}))
    records = babelrs.read_instruction_meta(root / "instructions" / "meta.json")
    import tempfile
    tok = babelrs.load_tokenizer(Path(tempfile.mkdtemp()), records, "", cfg.vocab_size)
    torch.manual_seed(0)
    vit = babelrs.ViT(cfg.vit_dim, cfg.vit_depth, cfg.vit_heads, cfg.patch, cfg.image_size)
    llm = babelrs.build_llm("", len(tok), cfg.llm_dim, cfg.llm_layers, cfg.llm_heads, cfg.llm_kv_heads, cfg.llm_ffn)
    csia = babelrs.CSIA(vit, llm, tok.convert_tokens_to_ids(babelrs.IMG_CONTEXT), cfg.merge, tuple(cfg.layers), cfg.tau)
    data = babelrs.InstructionDataset(records, tok, cfg.image_size, (cfg.image_size // cfg.patch) ** 2 // 4,
                                      cfg.max_tiles, cfg.max_length)
    ib = babelrs.InstructionBatches(data, datasets.MultiSourceSampler([len(data)], [cfg.batch_size]), 1, tok.pad_token_id)
    out["csia tiny"] = (csia.train(), lambda k: ib[k][0], lambda m, b: m(b["pixels"], b["input_ids"], b["attention_mask"],
                                                                           b["labels"], step=10)["loss"])
    return out


def _adamw(model, lr: float):
    """AdamW over the trained parameters as train.py builds it (fused where the code on the path has
    FUSED_ADAMW; a --baseline commit may not)."""
    import train
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                             fused=getattr(train, "FUSED_ADAMW", False))


def _time_tiny(quick: bool, repeat: int) -> dict:
    """Every tiny step timed part by part over `repeat` warm steps (medians), its FLOPs counted once, the
    matmul rate of this moment, and one evaluation pass of the tiny finetune model."""
    import eval as evaluation
    from torch.utils.flop_counter import FlopCounterMode
    parts = ("data", "forward", "matching", "losses", "backward", "optimizer")
    results = dict(matmul_gflops=_matmul_gflops(512 if quick else 2048), threads=torch.get_num_threads(), steps={})
    for name, (model, batch, loss_fn) in _tiny_models(quick).items():
        opt = _adamw(model, 1e-5)
        with FlopCounterMode(display=False) as counter:  # FLOPs of forward + backward, counted once
            loss_fn(model, batch(0)).backward()
        opt.zero_grad(set_to_none=True)
        flops = counter.get_total_flops()
        times = []
        for k in range(1 + repeat):  # the first step warms up
            t = dict.fromkeys(parts, 0.0)
            t0 = time.perf_counter()
            b = batch(k)
            t["data"] = time.perf_counter() - t0
            with _PartTimer() as timer, _ModuleTimer(model) as modules:
                t0 = time.perf_counter()
                loss = loss_fn(model, b)
                forward = time.perf_counter() - t0
            t["losses"] = timer.seconds["losses"] - timer.seconds["matching"]
            t["matching"] = timer.seconds["matching"]
            t["forward"] = forward - timer.seconds["losses"]
            t0 = time.perf_counter()
            loss.backward()
            t["backward"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            t["optimizer"] = time.perf_counter() - t0
            times.append((t, modules.seconds))
        med = {p: float(np.median([t[p] for t, _ in times[1:]])) for p in parts}
        by_module = {k: float(np.median([m[k] for _, m in times[1:]])) for k in times[0][1] if times[0][1][k] > 0}
        total = sum(med.values())
        rate = flops / 1e9 / total
        results["steps"][name] = dict(seconds=total, gflop=flops / 1e9, gflops_per_s=rate,
                                      of_matmul=rate / results["matmul_gflops"], parts=med, forward_by_module=by_module)
    # one evaluation pass: the tiny finetune model over SynthSOI-RGB's test split
    import datasets
    import train
    root = datasets.make_synthetic("data/synthsoi", **(QUICK_SYNTH if quick else {}))
    cfg = dataclasses.replace(train.FINETUNE_PRESETS["tiny"], resnet="", **(dict(image_size=64) if quick else {}))
    split = datasets.load_detection_split(root / "rgb" / "test", "rgb")
    import babelrs
    torch.manual_seed(0)
    det = babelrs.build_detector(**train.model_args(cfg, [dict(modality="rgb", classes=split.classes, box_type="obb")]))
    src = dict(modality="rgb", classes=split.classes, box_type="obb", test=str(root / "rgb" / "test"),
               image_size=cfg.image_size)
    t0 = time.perf_counter()
    evaluation.evaluate_model(det.eval(), [src], progress=False)
    results["evaluation"] = dict(seconds=time.perf_counter() - t0, images=len(split))
    return results


def _losses_tiny(quick: bool, steps: int = 3) -> dict:
    """{step: [loss of each of `steps` optimizer steps]} from seeded weights and batches: what the speed
    work must leave unchanged (tests/fixtures/tiny_losses.json, recorded at TINY_BASELINE)."""
    out = {}
    for name, (model, batch, loss_fn) in _tiny_models(quick).items():
        opt = _adamw(model, 1e-4)
        out[name] = []
        for k in range(steps):
            torch.manual_seed(k)  # the draws inside a step (denoising queries) do not depend on what ran before
            loss = loss_fn(model, batch(k))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            out[name].append(loss.item())
    return out


TINY_BASELINE = "56863ae"  # issue 29's "today": the code before its speed work (results/tiny_profile.json)


def _in_tree(tree: Path, argv: list, cwd: Path = None, copies: int = 1):
    """Run this file's `argv` in a child process whose project modules come from `tree` (this checkout, or
    another commit's code unpacked by `_baseline_tree`), in the folder `cwd` (default this checkout's;
    data/synthsoi is written there); returns the JSON the child wrote. `copies` > 1: that many children
    at once, a list of their JSONs."""
    import subprocess
    import sys
    import tempfile
    outs = [Path(tempfile.mkdtemp()) / "child.json" for _ in range(copies)]
    procs = []
    for out in outs:
        code = (f"import sys, runpy; sys.path.insert(0, {str(tree)!r}); sys.argv = {['bench.py'] + argv + ['--child', str(out)]!r}; "
                f"runpy.run_path({str(Path(__file__).resolve())!r}, run_name='__main__')")
        procs.append(subprocess.Popen([sys.executable, "-c", code], cwd=cwd or Path(__file__).resolve().parent))
    if any(p.wait() for p in procs):
        raise SystemExit("bench.py tiny: a child process failed (its error is above)")
    results = [json.loads(out.read_text()) for out in outs]
    return results if copies > 1 else results[0]


def _jobs_check(here: Path, args) -> None:
    """Seeds an hour on this CPU: one child timing every tiny step at `--threads`, against as many
    1-thread children at once (what `tables.py --sweep --jobs N` runs), alternating for `--rounds`
    rounds; the ratio is the steps an hour of the N runs together over those of the one run."""
    n = args.threads
    rounds = []
    for _ in range(args.rounds):
        one = _in_tree(here, ["tiny", "--threads", str(n), "--repeat", str(args.repeat)] + (["--quick"] if args.quick else []))
        many = _in_tree(here, ["tiny", "--threads", "1", "--repeat", str(args.repeat)] + (["--quick"] if args.quick else []),
                        copies=n)
        rounds.append((one, many))
    print(f"tiny steps an hour: 1 run at {n} threads against {n} runs at 1 thread at once (tables.py --jobs {n}), "
          f"median of {args.rounds} rounds")
    summary = dict(threads=n, rounds=args.rounds, steps={})
    for name in rounds[0][0]["steps"]:
        one = float(np.median([o["steps"][name]["seconds"] for o, _ in rounds]))
        each = float(np.median([m["steps"][name]["seconds"] for _, ms in rounds for m in ms]))
        ratio = n * one / each  # (n steps per `each` seconds) over (1 step per `one` seconds)
        summary["steps"][name] = dict(one_run_seconds=one, parallel_run_seconds=each, steps_an_hour_ratio=ratio)
        print(f"  {name:<36} 1 x {n} threads: {one:.3f} s a step; {n} x 1 thread: {each:.3f} s a step each; "
              f"steps an hour {ratio:.2f}x")
    if not args.quick:
        path = here / "results" / "tiny_jobs.json"
        path.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"written to {path}")


def _baseline_tree(commit: str) -> Path:
    """The project's files at `commit` (git archive), unpacked once into the temp folder."""
    import subprocess
    import tempfile
    here = Path(__file__).resolve().parent
    full = subprocess.run(["git", "-C", str(here), "rev-parse", commit], capture_output=True, text=True, check=True).stdout.strip()
    tree = Path(tempfile.gettempdir()) / f"bench-baseline-{full[:12]}"
    if not (tree / "bench.py").exists():
        part = Path(tempfile.mkdtemp(dir=tempfile.gettempdir()))
        archive = subprocess.run(["git", "-C", str(here), "archive", full], capture_output=True, check=True).stdout
        subprocess.run(["tar", "x", "-C", str(part)], input=archive, check=True)
        part.rename(tree)
    return tree


def bench_tiny(args):
    """Every tiny step, part by part (data, model forward, matching, losses, backward, optimizer), with its
    FLOPs (torch.utils.flop_counter) as GFLOP/s and as a fraction of this machine's float32 matrix-product
    rate measured in the same run; and one evaluation pass of the tiny finetune model. With `--baseline
    COMMIT`: that commit's code and this one's, each in its own child process, alternating for `--rounds`
    rounds, and the speed-up of every step (medians over the rounds)."""
    if args.child:  # a child of --baseline: measure with the modules the parent put first on the path
        result = _losses_tiny(args.quick) if args.losses else _time_tiny(args.quick, args.repeat)
        Path(args.child).write_text(json.dumps(result))
        return
    here = Path(__file__).resolve().parent
    argv = ["tiny", "--threads", str(args.threads), "--repeat", str(args.repeat)] + (["--quick"] if args.quick else [])
    if args.losses:  # the losses of TINY_BASELINE's code (or --baseline's) on the quick workloads, as the fixture
        import tempfile  # a fresh folder: the quick SynthSOI written anew, as the test does
        losses = _in_tree(_baseline_tree(args.baseline or TINY_BASELINE), argv + ["--losses", "child"],
                          cwd=Path(tempfile.mkdtemp()))
        Path(args.losses).write_text(json.dumps(dict(commit=args.baseline or TINY_BASELINE, quick=args.quick,
                                                     threads=args.threads, losses=losses), indent=1) + "\n")
        print(f"losses of {args.baseline or TINY_BASELINE} written to {args.losses}")
        return
    if args.jobs:
        return _jobs_check(here, args)
    if not args.baseline:
        rounds = [("now", _time_tiny(args.quick, args.repeat))]
    else:
        tree = _baseline_tree(args.baseline)
        rounds = []
        for _ in range(args.rounds):  # alternate, so that a change of the machine's load hits both alike
            rounds += [("baseline", _in_tree(tree, argv)), ("now", _in_tree(here, argv))]
    now = [r for k, r in rounds if k == "now"]
    base = [r for k, r in rounds if k == "baseline"]
    peak = float(np.median([r["matmul_gflops"] for _, r in rounds]))
    print(f"tiny steps, torch {torch.__version__}, {args.threads} threads, {platform.processor() or platform.machine()}; "
          f"float32 matmul: {peak:.1f} GFLOP/s" + (f"; against {args.baseline}, median of {args.rounds} alternating "
                                                   "rounds" if base else ""))
    parts = ("data", "forward", "matching", "losses", "backward", "optimizer")
    print(f"  {'step':<36}{'s/step':>8}{'GFLOP':>8}{'GFLOP/s':>9}{'of matmul':>10}" + (f"{'baseline':>10}{'speed-up':>9}"
          if base else "") + "  " + "  ".join(f"{p:>9}" for p in parts))
    summary = dict(matmul_gflops=peak, threads=args.threads, baseline=args.baseline or None, steps={})
    for name in now[0]["steps"]:
        s = float(np.median([r["steps"][name]["seconds"] for r in now]))
        gflop = now[0]["steps"][name]["gflop"]
        row = dict(seconds=s, gflop=gflop, gflops_per_s=gflop / s, of_matmul=gflop / s / peak,
                   parts={p: float(np.median([r["steps"][name]["parts"][p] for r in now])) for p in parts})
        line = f"  {name:<36}{s:8.3f}{gflop:8.1f}{gflop / s:9.2f}{gflop / s / peak:10.1%}"
        if base:
            b = float(np.median([r["steps"][name]["seconds"] for r in base]))
            row.update(baseline_seconds=b, speedup=b / s)
            line += f"{b:10.3f}{b / s:8.2f}x"
        row["forward_by_module"] = {k: float(np.median([r["steps"][name].get("forward_by_module", {}).get(k, np.nan)
                                                        for r in now])) for k in now[0]["steps"][name].get("forward_by_module", {})}
        summary["steps"][name] = row
        print(line + "  " + "  ".join(f"{row['parts'][p]:9.3f}" for p in parts))
    print("  forward by module (s; a head includes its encoder, decoder and criterion, the criterion its matching):")
    for name, row in summary["steps"].items():
        print(f"    {name:<34}" + ", ".join(f"{k} {v:.3f}" for k, v in sorted(row["forward_by_module"].items(),
                                                                            key=lambda kv: -kv[1])))
    e = float(np.median([r["evaluation"]["seconds"] for r in now]))
    summary["evaluation"] = dict(seconds=e, images=now[0]["evaluation"]["images"])
    line = f"  one evaluation pass of the tiny finetune model ({now[0]['evaluation']['images']} test images): {e:.2f} s"
    if base:
        b = float(np.median([r["evaluation"]["seconds"] for r in base]))
        summary["evaluation"].update(baseline_seconds=b, speedup=b / e)
        line += f" (baseline {b:.2f} s, {b / e:.2f}x)"
    print(line)
    if not args.quick:
        path = here / "results" / ("tiny_speed.json" if base else "tiny_profile.json")
        path.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"written to {path}")


# ---------------------------------------------------------------------------------------------
# The GPU check (python bench.py gpu): what a first visit to a GPU must tell, in one prepared run
# ---------------------------------------------------------------------------------------------
# 1. every model of the project runs forward and backward on the device in float32, bf16 and fp16
#    autocast and agrees with the same weights on the CPU; rotated IoU and NMS agree with the CPU;
# 2. a tiny finetune and csia row end to end, then resumed, on the device;
# 3. one step of every stage at its paper preset: seconds, peak memory, TFLOP/s, MFU, and from them
#    the GPU-hours of every table at --scale 1gpu;
# 4. the peers on the device: DETR step, ViT, rotated IoU, as ratios in the same run.
# `--dry-run` runs every part at the smallest sizes on the CPU (the test suite runs it).

BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "L40": 181.0,
                    "A10": 125.0, "L4": 121.0, "4090": 165.0}  # dense bf16, the vendors' data sheets
# relative error of a loss against the CPU's float32 value, by precision on the device
LOSS_TOLERANCE = {"float32": 1e-3, "bf16": 5e-2, "fp16": 2e-2}
GRAD_TOLERANCE = 1e-2  # float32 on the device: max |g_dev - g_cpu| / max |g_cpu| over all parameters


def _to(x, device):
    """Tensors inside nested lists / dicts moved to `device`."""
    if torch.is_tensor(x):
        return x.to(device)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, device) for v in x)
    return x


def _gpu_models(dry_run: bool) -> dict:
    """{name: (model on the CPU, inputs on the CPU, loss(model, inputs))}: every model of the project,
    small (correctness does not need paper sizes), with inputs that draw nothing at random inside
    the forward pass (no denoising queries, no dropout), so that CPU and device see the same thing."""
    import babelrs
    import detection
    import mutdet
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    size = 64
    images, masks = torch.randn(2, 3, size, size, generator=g), torch.zeros(2, size, size, dtype=torch.bool)
    masks[1, :, 48:] = True
    # Off the anchor grid: an untrained head predicts its anchors (cell centres), and a target centred on
    # one would put the L1 loss at its kink, where the device's last-bit rounding picks the gradient's sign
    targets = [dict(boxes=ro.regularize_obb(torch.tensor([[20.3, 19.6, 16, 6, 0.4], [40.7, 41.2, 10, 8, -1.0]])),
                    labels=torch.tensor([1, 3]), size=(size, size), embeds=F.normalize(torch.randn(2, 32, generator=g), dim=-1)),
               dict(boxes=torch.tensor([[21.1, 30.4, 12, 6, 0.0]]), labels=torch.tensor([2]), size=(size, 48),
                    embeds=F.normalize(torch.randn(1, 32, generator=g), dim=-1))]
    small = dict(frozen_bn=True, dim=32, heads=2, enc_layers=1, dec_layers=2, ffn=64, num_queries=12,
                 num_dn_queries=0, gn_groups=8, dropout=0.0)
    rgb = [dict(modality="rgb", classes=[str(c) for c in range(5)], box_type="obb")]
    models = {}
    det = babelrs.build_detector(sources=rgb, backbone="resnet18", resnet="", **small)
    models["rotated DETR (ResNet-18)"] = (det, (images, masks, ["rgb", "rgb"], targets),
                                          lambda m, x: sum(m(*x)["losses"].values()))
    vit_det = babelrs.build_detector(sources=rgb, backbone="vit", vit_args=dict(dim=32, depth=4, heads=2, patch=8, image_size=size),
                                     **{k: v for k, v in small.items() if k != "frozen_bn"})
    models["ViT pyramid detector (BabelRS)"] = (vit_det, (images, masks, ["rgb", "rgb"], targets),
                                                lambda m, x: sum(m(*x)["losses"].values()))
    pre_det = detection.build_detector([dict(modality="rgb", classes=[f"c{i}" for i in range(8)], box_type="obb")],
                                       "resnet18", "", **small)
    pre = mutdet.MutDetPretrainer(pre_det, embed_dim=32, heads=2, mlp=64, dn_align=False)  # no DN queries here
    models["MutDet pre-trainer"] = (pre, (images, masks, targets), lambda m, x: sum(m(*x).values()))
    vit = babelrs.ViT(32, 4, 2, 8, 32)
    llm = babelrs.build_llm("", 200, 32, 1, 4, 2, 64)
    csia = babelrs.CSIA(vit, llm, 5, "lvsa", (1, 2, 3, 4), 10.0)
    T, per_tile = 24, (32 // 8) ** 2 // 4
    ids = torch.randint(10, 200, (2, T), generator=g)
    ids[:, 2:2 + per_tile] = 5
    labels = ids.clone()
    labels[:, :T - 8] = babelrs.IGNORE_INDEX
    pixels = torch.randn(2, 3, 32, 32, generator=g)
    models["CSIA (ViT + LVSA + projector + Qwen2)"] = (csia, (pixels, ids, torch.ones_like(ids), labels),
                                                      lambda m, x: m(*x, step=3)["loss"])
    sam = mutdet.build_sam("", size)
    models["SAM image encoder (proposals)"] = (sam, (images[:1],), lambda m, x: m.get_image_embeddings(*x).float().abs().mean())
    return models


def _check_models(device, dry_run: bool, rows: list | None = None) -> list:
    """Part 1: each model's loss (and gradients, float32) on the device against the CPU, then its
    loss under bf16 and fp16 autocast against the device's float32 loss; every value finite. Rows are
    appended to `rows` as they are measured (a later failure keeps them)."""
    import copy
    rows = [] if rows is None else rows
    for name, (model, inputs, loss_fn) in _gpu_models(dry_run).items():
        model.train()
        loss_ref = loss_fn(model, inputs)
        trains = loss_ref.requires_grad  # SAM is frozen in MutDet: inference only
        if trains:
            loss_ref.backward()
        ref = loss_ref.item()
        ref_grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
        dev_model, dev_inputs = copy.deepcopy(model).to(device), _to(inputs, device)
        dev_model.zero_grad(set_to_none=True)
        row = dict(model=name)
        for precision in ("float32", "bf16", "fp16"):
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
            dev_model.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = loss_fn(dev_model, dev_inputs)
            if trains:
                loss.float().backward()
            loss = loss.item()
            grads = [p.grad for p in dev_model.parameters() if p.grad is not None]
            finite = math.isfinite(loss) and all(bool(torch.isfinite(g).all()) for g in grads)
            rel = abs(loss - ref) / max(abs(ref), 1e-12)
            row[precision] = dict(loss=loss, cpu_loss=ref, rel_err=rel, finite=finite,
                                  ok=finite and rel <= LOSS_TOLERANCE[precision])
            if precision == "float32" and trains:
                scale = max(float(g.abs().max()) for g in ref_grads.values())
                dev_grads = {k: p.grad for k, p in dev_model.named_parameters() if p.grad is not None}
                missing = sorted(set(ref_grads) ^ set(dev_grads))  # a gradient on one side only
                err, worst = max((float((dev_grads[k].cpu() - g).abs().max()), k)
                                 for k, g in ref_grads.items() if k in dev_grads)
                rel_g = err / max(scale, 1e-12)
                row[precision].update(grad_rel_err=rel_g, worst_grad=worst, grad_one_side=missing,
                                      ok=row[precision]["ok"] and rel_g <= GRAD_TOLERANCE and not missing)
        rows.append(row)
        print(f"  {name:<40}" + "".join(f"  {p} {'ok' if row[p]['ok'] else 'FAIL'} ({row[p]['rel_err']:.1e})"
                                         for p in ("float32", "bf16", "fp16")))
        if "grad_rel_err" in row["float32"]:
            r = row["float32"]
            print(f"  {'':<40}  float32 gradients: max error / max |g| {r['grad_rel_err']:.1e} (at {r['worst_grad']})"
                  + (f"; on one side only: {r['grad_one_side'][:5]}" if r["grad_one_side"] else ""))
    # SAM's automatic masks (MutDet's proposals) on the device: thresholds of a random SAM may flip on
    # rounding, so the counts are reported, and the run itself is the check
    import mutdet
    sam = mutdet.build_sam("", 64)
    image = (torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(3)) * 255).to(torch.uint8)
    counts = [len(mutdet.generate_masks(m, image.to(d), points_per_side=4, pred_iou_thresh=-1.0,
                                        stability_score_thresh=0.0, box_nms_thresh=1.0)["masks"])
              for m, d in ((sam, torch.device("cpu")), (copy.deepcopy(sam).to(device), device))]
    rows.append(dict(model="SAM automatic masks (4 x 4 points)", cpu_masks=counts[0], device_masks=counts[1], ok=True))
    print(f"  {rows[-1]['model']:<40}  {counts[0]} masks on the CPU, {counts[1]} on the device")
    # rotated IoU and NMS: exact geometry, so float64 agrees to rounding and NMS keeps the same boxes
    b1, b2 = _boxes(200 if dry_run else 2000, 256.0, 0), _boxes(200 if dry_run else 2000, 256.0, 1)
    iou_cpu, iou_dev = ro.box_iou_rotated(b1, b2), ro.box_iou_rotated(b1.to(device), b2.to(device)).cpu()
    scores = torch.rand(len(b1), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    keep_cpu, keep_dev = ro.nms_rotated(b1, scores, 0.3), ro.nms_rotated(b1.to(device), scores.to(device), 0.3).cpu()
    geometry = dict(model="rotated IoU (float64) and NMS", iou_max_abs_err=float((iou_cpu - iou_dev).abs().max()),
                    nms_same=bool(torch.equal(keep_cpu, keep_dev)))
    geometry["ok"] = geometry["iou_max_abs_err"] <= 1e-10 and geometry["nms_same"]
    rows.append(geometry)
    print(f"  {geometry['model']:<40}  IoU max |err| {geometry['iou_max_abs_err']:.1e}, NMS "
          f"{'same boxes' if geometry['nms_same'] else 'DIFFERENT boxes'}")
    return rows


def _tiny_rows(work: Path, dry_run: bool) -> list:
    """Part 2: the tiny finetune and csia presets for a few dozen steps (with evaluation), then
    resumed for a few more, on the device train.py picks (CUDA when there is one)."""
    import train
    import datasets
    steps, more = (2, 3) if dry_run else (24, 32)
    size = ["--image_size", "64"] if dry_run else []
    synth = ["--synth_root", str(work / "synthsoi")]
    if dry_run:  # a small SynthSOI-RGB whose training images hold every class of its test images
        datasets.make_synthetic(work / "synthsoi", n_train=12, n_test=2, size=64, max_objects=4, modalities=("rgb",))
    rows = []
    for stage, argv in (("finetune", ["--stage", "finetune", "--resnet", ""] + size),
                        ("csia", ["--stage", "csia", "--vit", ""] + (["--image_size", "32"] if dry_run else []))):
        run = work / f"tiny-{stage}"
        t0 = time.perf_counter()
        first = train.main(argv + synth + ["--max-steps", str(steps), "--out", str(run)])
        t1 = time.perf_counter()
        second = train.main(["--resume", str(run), "--max-steps", str(more)]) if first == 0 else first
        log = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines()] if (run / "log.jsonl").exists() else []
        losses = [r["loss"] for r in log if "loss" in r]
        metrics = run / "metrics.json"
        row = dict(stage=stage, status=[first, second], steps=len(losses), seconds_first=t1 - t0,
                   seconds_a_step=(t1 - t0) / steps, final_loss=losses[-1] if losses else None,
                   metrics=json.loads(metrics.read_text()).get("sources", {}).get("rgb", {}).get("ap50")
                   if metrics.exists() and stage == "finetune" else None)
        row["ok"] = first == 0 and second == 0 and len(losses) == more and all(map(math.isfinite, losses))
        rows.append(row)
        print(f"  {stage}: {row['steps']} steps ({steps} + resume to {more}), {row['seconds_a_step']:.2f} s a step "
              f"with its start, final loss {row['final_loss']}: {'ok' if row['ok'] else 'FAIL'}")
    return rows


def _paper_steps(device, dry_run: bool) -> dict:
    """Part 3: one micro-batch of every stage at its paper preset (dry run: shrunk tiny presets),
    under bf16 autocast where the device has it: seconds, peak memory, FLOPs and TFLOP/s."""
    import tables
    import train
    out = {}
    for stage, preset in PAPER_STEPS:
        cfg = train.PRESETS[stage][preset]
        if dry_run:  # the same code path at the smallest sizes
            cfg = dataclasses.replace(train.PRESETS[stage]["tiny"], **DRY_RUN_SIZES.get(stage, {}),
                                      **({"source_ratio": [1, 1, 1]} if preset == "babelrs" else {}))
            if stage == "finetune" and preset == "babelrs":
                cfg = dataclasses.replace(cfg, backbone="vit", vit_dim=32, vit_depth=4, vit_heads=2, vit_patch=8)
        r = tables.measure_step(stage, cfg, device=device, amp=None if dry_run else "bf16",
                                sam_model="tiny" if dry_run else "vit-h")
        r["tflops_per_s"] = r["flops"] / r["seconds"] / 1e12
        out[f"{stage}:{preset}"] = r
        print(f"  {stage + ':' + preset:<24} micro-batch {r['micro']}: {r['seconds']:.3f} s, peak {r['peak_gb']:.1f} GB, "
              f"{r['flops'] / 1e12:.2f} TFLOP, {r['tflops_per_s']:.1f} TFLOP/s")
    return out


DRY_RUN_SIZES = {"finetune": dict(image_size=64, dim=32, heads=2, enc_layers=1, dec_layers=1, ffn=64, num_queries=10,
                                  num_dn_queries=4, batch_size=1, gn_groups=8),
                 "mutdet": dict(image_size=64, dim=32, heads=2, enc_layers=1, dec_layers=1, ffn=64, num_queries=10,
                                num_dn_queries=4, batch_size=1, gn_groups=8, enhance_heads=2, enhance_mlp=64),
                 "csia": dict(image_size=32, batch_size=1, llm_dim=32, llm_layers=1, llm_ffn=64)}


def _table_hours(steps: dict) -> dict:
    """GPU-hours of every table at --scale 1gpu from the step times measured on this device: each run's
    optimizer steps (tables.run_cost) x the micro-batches a step x the measured seconds a micro-batch."""
    import tables
    import train
    extra = dict(csia=[], finetune=[], sam=[], mutdet=[], weights=[])
    hours = {}
    for name in tables.SWEEPS:
        if name in tables.TINY_ONLY:
            continue
        total = 0.0
        for _, argv in tables.sweep_runs(name, "1gpu", extra):
            c = tables.run_cost([a.replace("{runs}", "runs/1gpu") for a in argv], "1gpu", 1.0, 1.0)
            key = f"{c['stage']}:{c['preset']}"
            if "missing" in c or key not in steps:
                continue
            m = steps[key]
            _, cfg = train.parse_config([a.replace("{runs}", "runs/1gpu") for a in argv], check_weights=False)
            micro_steps = 1 if c["stage"] == "sam" else cfg.global_batch / m["micro"]  # accumulation of a step
            total += c["steps"] * micro_steps * m["seconds"]
        hours[name] = total / 3600
    return hours


def _peers_on_device(device, dry_run: bool) -> list:
    """Part 4: ours against the peers on the device, in interleaved repeats: the DETR training step
    (transformers' Deformable DETR), the ViT forward + backward (InternVLVisionModel), rotated IoU
    (torchvision's kernel)."""
    import torchvision

    import babelrs
    import train

    def timed(fns, repeat):
        def sync(fn):
            def run():
                out = fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                return out
            return run
        return [t for t, _ in _interleaved([sync(f) for f in fns], repeat)]
    repeat = 1 if dry_run else 5
    rows = []
    # DETR step: the tiny preset's detector and its like-for-like peer
    cfg = dataclasses.replace(train.FINETUNE_PRESETS["tiny"], resnet="",
                              **(dict(DRY_RUN_SIZES["finetune"], num_queries=20) if dry_run else {}))
    size = 128 if dry_run else cfg.image_size
    g = torch.Generator().manual_seed(0)
    B = cfg.batch_size
    images = torch.randn(B, 3, size, size, generator=g).to(device)
    masks = torch.zeros(B, size, size, dtype=torch.bool, device=device)
    boxes = [ro.regularize_obb(torch.cat([torch.rand(8, 2, generator=g) * (size - 40) + 20, torch.rand(8, 2, generator=g) * 20 + 6,
                                          (torch.rand(8, 1, generator=g) - 0.5) * math.pi], 1)) for _ in range(B)]
    labels = [torch.randint(0, 5, (8,), generator=g) for _ in range(B)]
    sources = [dict(modality="rgb", classes=[str(c) for c in range(5)], box_type="obb")]
    ours = babelrs.build_detector(**train.model_args(cfg, sources)).to(device).train()
    tg = [dict(boxes=b.to(device), labels=l.to(device), size=(size, size)) for b, l in zip(boxes, labels)]
    peer = _peer_deformable_detr(cfg, 5).to(device)
    ptg = _to(_peer_targets(boxes, labels, size), device)

    def step(model, loss_fn, opt):
        def run():
            loss = loss_fn()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return run
    steps = [step(ours, lambda: sum(ours(images, masks, ["rgb"] * B, tg)["losses"].values()),
                  torch.optim.AdamW(ours.parameters(), lr=1e-5)),
             step(peer, lambda: peer(pixel_values=images, labels=ptg).loss, torch.optim.AdamW(peer.parameters(), lr=1e-5))]
    for s in steps:  # warm-up (cuDNN autotuning, allocator)
        s()
    t_ours, t_peer = timed(steps, repeat)
    rows.append(dict(work=f"rotated DETR training step, tiny preset at {size} px, batch {B}",
                     peer="transformers Deformable DETR, same size", ours_s=t_ours, peer_s=t_peer, ratio=t_ours / t_peer))
    # ViT: InternViT-300M (dry run: a small one) forward + backward
    paper = train.CSIA_PRESETS["paper"]
    if dry_run:
        paper = dataclasses.replace(paper, image_size=56, vit_dim=64, vit_depth=2, vit_heads=2, layers=[1, 2])
    vit = babelrs.ViT(paper.vit_dim, paper.vit_depth, paper.vit_heads, paper.patch, paper.image_size).to(device).train()
    peer_vit = _peer_internvit(paper).to(device)
    x = torch.randn(1 if dry_run else 8, 3, paper.image_size, paper.image_size, device=device)

    def ours_vit():
        vit.zero_grad()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = babelrs.merge_layers(vit(x), tuple(paper.layers), 0.5)
        out.float().sum().backward()

    def peer_fwd():
        peer_vit.zero_grad()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = babelrs.merge_layers(list(peer_vit(pixel_values=x, output_hidden_states=True).hidden_states),
                                       tuple(paper.layers), 0.5)
        out.float().sum().backward()
    ours_vit(), peer_fwd()
    t_ours, t_peer = timed([ours_vit, peer_fwd], repeat)
    rows.append(dict(work=f"InternViT ({paper.vit_dim}x{paper.vit_depth}, {paper.image_size} px, batch {len(x)}) "
                          "forward + backward, bf16 on a GPU", peer="transformers InternVLVisionModel, same size",
                     ours_s=t_ours, peer_s=t_peer, ratio=t_ours / t_peer))
    # rotated IoU: torchvision's kernel takes degrees counter-clockwise (-θ of our le90)
    n = 200 if dry_run else 4000
    for dtype in (torch.float32, torch.float64):
        b1, b2 = (_boxes(n, 1024.0, s).to(device=device, dtype=dtype) for s in (0, 1))
        d1, d2 = (torch.cat([b[:, :4], -torch.rad2deg(b[:, 4:])], 1) for b in (b1, b2))
        fns = [lambda: ro.box_iou_rotated(b1, b2), lambda: torchvision.ops.box_iou(d1, d2, fmt="cxcywhr")]
        try:  # the rotated kernel came with torchvision 0.29; an older one on the device is said so, not fatal
            fns[1]()
        except (TypeError, ValueError):
            fns = fns[:1]
        fns[0]()
        t_ours, t_peer = (timed(fns, repeat) + [math.nan])[:2]
        peer = f"torchvision {torchvision.__version__} box_iou(fmt='cxcywhr')" + ("" if len(fns) == 2 else " (not in this version)")
        rows.append(dict(work=f"rotated IoU {n} x {n}, {str(dtype)[6:]}", peer=peer, ours_s=t_ours, peer_s=t_peer,
                         ratio=t_ours / t_peer))
    for r in rows:
        print(f"  {r['work']}: ours {r['ours_s'] * 1e3:.1f} ms, {r['peer']} {r['peer_s'] * 1e3:.1f} ms, "
              f"ours / peer {r['ratio']:.2f}")
    return rows


def _gpu_markdown(report: dict) -> str:
    """The short table of a GPU check (results/gpu/<device>.md)."""
    lines = [f"# GPU check: {report['device']}", "",
             f"torch {report['torch']}, CUDA {report['cuda']}, {report['date']}; `python bench.py gpu`"
             + (" --dry-run (CPU, smallest sizes: no figure here is a GPU figure)" if report["dry_run"] else ""), "",
             "## 1. Correctness on the device (relative error of the loss against the CPU's float32; float32 "
             "gradients: max error / max |g|)", "",
             "| model | float32 | bf16 | fp16 |", "|---|---|---|---|"]
    for r in report["correctness"]:
        if "float32" in r:
            grad = f" (gradients {r['float32']['grad_rel_err']:.1e})" if "grad_rel_err" in r["float32"] else ""
            lines.append(f"| {r['model']} | " + " | ".join(
                f"{'ok' if r[p]['ok'] else '**FAIL**'} {r[p]['rel_err']:.1e}" + (grad if p == "float32" else "")
                for p in ("float32", "bf16", "fp16")) + " |")
        elif "cpu_masks" in r:
            lines.append(f"| {r['model']} | runs: {r['device_masks']} masks (CPU: {r['cpu_masks']}) | | |")
        else:
            lines.append(f"| {r['model']} | IoU max abs err {r['iou_max_abs_err']:.1e}; NMS "
                         f"{'same' if r['nms_same'] else '**different**'} | | |")
    lines += ["", "## 2. Tiny rows end to end (then resumed)", "", "| stage | steps | s a step | final loss | ok |",
              "|---|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['steps']} | {r['seconds_a_step']:.2f} | "
              f"{'-' if r['final_loss'] is None else format(r['final_loss'], '.4g')} | {r['ok']} |" for r in report["tiny_rows"]]
    lines += ["", "## 3. One micro-batch of each stage at its paper preset (bf16 autocast)", "",
              f"MFU against {report['peak_tflops']:.3g} TFLOP/s dense bf16 ({report['peak_source']}).", "",
              "| stage:preset | micro-batch | seconds | peak GB | TFLOP | TFLOP/s | MFU |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {k} | {r['micro']} | {r['seconds']:.3f} | {r['peak_gb']:.1f} | {r['flops'] / 1e12:.2f} | "
              f"{r['tflops_per_s']:.1f} | {r['mfu']:.2f} |" for k, r in report["paper_steps"].items()]
    lines += ["", "GPU-hours of each table at `--scale 1gpu`, from these step times:", "", "| table | GPU-hours |",
              "|---|---|"] + [f"| {k} | {v:.1f} |" for k, v in report["table_hours"].items()]
    lines += ["", "## 4. Peers on the device (interleaved repeats)", "", "| work | peer | ours / peer |", "|---|---|---|"]
    lines += [f"| {r['work']} | {r['peer']} | {r['ratio']:.2f} |" for r in report["peers"]]
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    if report.get("errors"):
        lines += ["", "## Parts that failed", ""]
        lines += [f"### {k}\n\n```\n{v.rstrip()}\n```" for k, v in report["errors"].items()]
    return "\n".join(lines) + "\n"


def bench_gpu(args):
    """`python bench.py gpu`: the four parts above on CUDA, into results/gpu/<device>.json and .md;
    `--dry-run`: every part at the smallest sizes on the CPU, nothing written unless --out is given."""
    import json
    import tempfile
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("error: bench.py gpu needs a CUDA device (none is visible); --dry-run runs every part on the CPU")
    device = torch.device("cpu" if args.dry_run else "cuda")
    name = "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name()
    if device.type == "cuda":  # the parity checks compare true float32 (TF32 would differ from the CPU by design)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    t_start = time.perf_counter()
    report = dict(device=name, dry_run=args.dry_run, torch=torch.__version__, cuda=torch.version.cuda or "",
                  date=time.strftime("%Y-%m-%d"), threads=torch.get_num_threads(), errors={})
    out = Path(args.out) if args.out else (None if args.dry_run else Path(__file__).resolve().parent / "results" / "gpu")
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")

    def part(key, fn, default):
        """One part; a failure is recorded with its traceback and the next part still runs (device
        time is short: a single visit must bring back everything that works). The report is
        rewritten after each part, so a visit cut short keeps what it measured."""
        import traceback
        try:
            report[key] = fn()
        except Exception:  # noqa: BLE001 - recorded in the report and fails the check
            report[key] = default
            report["errors"][key] = traceback.format_exc(limit=6)
            print(f"   {key} FAILED:\n{report['errors'][key]}")
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        print(f"GPU check on {name}\n1. correctness on the device against the CPU")
        rows = []
        part("correctness", lambda: _check_models(device, args.dry_run, rows), rows)
        print("2. tiny rows end to end, then resumed")
        part("tiny_rows", lambda: _tiny_rows(Path(tmp), args.dry_run), [])
    print("3. one micro-batch of every stage at its paper preset")
    part("paper_steps", lambda: _paper_steps(device, args.dry_run), {})
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
    report["peak_source"] = "data sheet" if peak else "measured bf16 matmul (device not in BF16_PEAK_TFLOPS)"
    if peak is None:
        n = 1024 if args.dry_run else 8192
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
        t, _ = _best_of(lambda: (a @ a, torch.cuda.synchronize() if device.type == "cuda" else None), 3)
        peak = 2 * n ** 3 / t / 1e12
    report["peak_tflops"] = peak
    for r in report["paper_steps"].values():
        r["mfu"] = r["tflops_per_s"] / peak
    part("table_hours", lambda: _table_hours(report["paper_steps"]), {})
    print("   GPU-hours at --scale 1gpu: " + ", ".join(f"{k} {v:.1f}" for k, v in report["table_hours"].items()))
    print("4. the peers on the device")
    part("peers", lambda: _peers_on_device(device, args.dry_run), [])
    report["seconds"] = time.perf_counter() - t_start
    report["ok"] = not report["errors"] and all(
        all(r[p]["ok"] for p in ("float32", "bf16", "fp16")) if "float32" in r else r["ok"]
        for r in report["correctness"]) and all(r["ok"] for r in report["tiny_rows"])
    if out is not None:
        (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / f"{stem}.md").write_text(_gpu_markdown(report))
        print(f"written to {out / stem}.json and .md")
    print(f"GPU check {'passed' if report['ok'] else 'FAILED'} in {report['seconds']:.0f} s")
    return 0 if report["ok"] else 1


QUICK = dict(n=60, repeat=1, images=20, dets=30, ref_fraction=10, size=128, boxes=20, batch=1)  # --quick sizes
QUICK_SYNTH = dict(n_train=4, n_test=1, size=64, max_objects=2)  # a small SynthSOI for --quick


def main(argv=None):
    import datasets
    p = datasets.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = datasets.ArgumentParser(add_help=False)
    common.add_argument("--quick", action="store_true",
                        help="small sizes, seconds: every path of the benchmark runs (the test suite runs each); "
                             "the figures of the README come from full runs")
    common.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads, pinned so that a figure does not depend on the machine's load "
                             "(default: all cores); printed with every result")
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("iou", parents=[common], help="rotated IoU vs shapely")
    q.add_argument("--n", type=int, default=1000)
    q.add_argument("--repeat", type=int, default=2)
    q.set_defaults(fn=bench_iou)
    q = sub.add_parser("eval", parents=[common], help="rotated VOC mAP on a DOTA-val-sized workload")
    q.add_argument("--images", type=int, default=2000)
    q.add_argument("--classes", type=int, default=15)
    q.add_argument("--dets", type=int, default=300)
    q.add_argument("--ref-fraction", type=int, default=400, help="the reference loop runs on 1/N of the images")
    q.set_defaults(fn=bench_eval)
    q = sub.add_parser("detr", parents=[common], help="rotated DETR training speed vs torchvision Faster R-CNN")
    q.add_argument("--size", type=int, default=800)
    q.add_argument("--repeat", type=int, default=2)
    q.add_argument("--compile", action="store_true", help="also time ours with --compile (train.compile_layers; "
                   "the first step compiles and is not timed)")
    q.set_defaults(fn=bench_detr)
    q = sub.add_parser("sam", parents=[common], help="sam stage images/s and SAM ViT-B mask generation time")
    q.add_argument("--images", type=int, default=3)
    q.set_defaults(fn=bench_sam)
    q = sub.add_parser("mutdet", parents=[common], help="MutDet pre-training step time vs the DETReg row")
    q.add_argument("--boxes", type=int, default=200, help="SAM boxes an image at paper size")
    q.add_argument("--repeat", type=int, default=2)
    q.set_defaults(fn=bench_mutdet)
    q = sub.add_parser("vit", parents=[common], help="CSIA step time and InternViT-300M forward+backward")
    q.add_argument("--batch", type=int, default=1)
    q.add_argument("--repeat", type=int, default=2)
    q.set_defaults(fn=bench_vit)
    q = sub.add_parser("paper", parents=[common], help="one step of each stage at the paper preset: time, memory, FLOPs")
    q.add_argument("--tiles", type=int, default=1, help="csia: tiles a sample (the paper's images: up to 6 + thumbnail)")
    q.add_argument("--only", nargs="*", default=[], help="stages to run (default all)")
    q.add_argument("--tiny", action="store_true", help="the tiny presets instead (results/tiny_step.json)")
    q.add_argument("--one", default="", help=argparse.SUPPRESS)  # STAGE:PRESET, run in a child process
    q.set_defaults(fn=bench_paper)
    q = sub.add_parser("tiny", parents=[common], help="every tiny step part by part, against this CPU's matmul rate")
    q.add_argument("--repeat", type=int, default=3, help="timed steps after one warm-up step")
    q.add_argument("--baseline", default="", metavar="COMMIT", help=f"also time COMMIT's code in the same run, "
                   f"alternating with this one (issue 29's baseline: {TINY_BASELINE}); results/tiny_speed.json")
    q.add_argument("--rounds", type=int, default=3, help="--baseline, --jobs: alternating rounds of both")
    q.add_argument("--jobs", action="store_true", help="one run at --threads against --threads 1-thread runs at once "
                   "(tables.py --sweep --jobs): the steps an hour of each; results/tiny_jobs.json")
    q.add_argument("--losses", default="", metavar="JSON", help="write the losses of 3 seeded steps of every tiny "
                   "step under --baseline's code (default TINY_BASELINE) to JSON (the fixture of the same-results test)")
    q.add_argument("--child", default="", help=argparse.SUPPRESS)
    q.set_defaults(fn=bench_tiny)
    q = sub.add_parser("gpu", parents=[common], help="the prepared GPU check: correctness on the device, a tiny row, "
                       "the paper presets' step costs, the peers (results/gpu/<device>.json and .md)")
    q.add_argument("--dry-run", action="store_true", help="every part at the smallest sizes on the CPU")
    q.add_argument("--out", default="", help="folder of the JSON and Markdown (default results/gpu; a dry run "
                   "writes only when given one)")
    q.set_defaults(fn=bench_gpu)
    args = p.parse_args(argv)
    args.warmup = 0 if args.quick else 1
    if args.quick:
        for k, v in QUICK.items():
            if hasattr(args, k):
                setattr(args, k, v)
    torch.set_num_threads(args.threads)
    return args.fn(args) or 0


if __name__ == "__main__":
    raise SystemExit(main())
