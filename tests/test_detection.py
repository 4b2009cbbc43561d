"""The rotated DETR checked part by part: deformable attention against a per-point loop, the
matcher against brute force, each loss term against hand-computed values, GIoU against torchvision,
denoising queries against their definition, post-processing, and a tiny model that overfits."""
import itertools
import math

import numpy as np
import pytest
import torch
import torchvision

import datasets
import detection
import rotated_ops as ro


# ---------------------------------------------------------------------------------------------
# Deformable attention
# ---------------------------------------------------------------------------------------------

def bilinear_zero_pad(img, x, y):
    """Sample img (C, H, W) at continuous pixel coordinates (x, y) (pixel centres at k + 0.5 in
    normalised*size units, i.e. grid_sample's align_corners=False), zero outside."""
    C, H, W = img.shape
    px, py = x - 0.5, y - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(C, dtype=img.dtype)
    for dx in (0, 1):
        for dy in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            w = (1 - abs(px - xi)) * (1 - abs(py - yi))
            if 0 <= xi < W and 0 <= yi < H:
                out += w * img[:, yi, xi]
    return out


def naive_deform_attn(value, shapes, locations, weights):
    B, S, nh, dh = value.shape
    _, Q, _, L, P, _ = locations.shape
    starts = np.cumsum([0] + [h * w for h, w in shapes])
    out = torch.zeros(B, Q, nh * dh, dtype=value.dtype)
    for b, q, h in itertools.product(range(B), range(Q), range(nh)):
        acc = torch.zeros(dh, dtype=value.dtype)
        for l, (hl, wl) in enumerate(shapes):
            img = value[b, starts[l]:starts[l + 1], h].T.reshape(dh, hl, wl)
            for p in range(P):
                x, y = locations[b, q, h, l, p].tolist()
                acc += weights[b, q, h, l, p] * bilinear_zero_pad(img, x * wl, y * hl)
        out[b, q, h * dh:(h + 1) * dh] = acc
    return out


def test_deform_attn_core_matches_per_point_loop():
    g = torch.Generator().manual_seed(0)
    shapes = [(5, 7), (3, 4)]
    B, Q, nh, dh, P = 2, 3, 2, 4, 3
    S = sum(h * w for h, w in shapes)
    value = torch.randn(B, S, nh, dh, generator=g, dtype=torch.float64)
    locations = torch.rand(B, Q, nh, len(shapes), P, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2  # some outside
    weights = torch.rand(B, Q, nh, len(shapes), P, generator=g, dtype=torch.float64)
    got = detection.ms_deform_attn_core(value, shapes, locations, weights)
    want = naive_deform_attn(value, shapes, locations, weights)
    assert torch.allclose(got, want, atol=1e-10)


def test_rotated_sampling_locations_turn_offsets_clockwise():
    attn = detection.MSDeformAttn(dim=8, heads=2, levels=2, points=2)
    g = torch.Generator().manual_seed(1)
    offsets = torch.randn(1, 3, 2, 2, 2, 2, generator=g)
    ref = torch.tensor([[0.5, 0.4, 0.2, 0.1], [0.3, 0.6, 0.1, 0.3], [0.7, 0.7, 0.2, 0.2]])[None, :, None].repeat(1, 1, 2, 1)
    theta = torch.tensor([[0.0, math.pi / 2, 0.3]])
    loc = attn.sampling_locations(offsets, ref, [(8, 8), (4, 4)], theta)
    for q in range(3):
        u, v = offsets[0, q, ..., 0], offsets[0, q, ..., 1]
        su, sv = u / 2 * ref[0, q, 0, 2] * 0.5, v / 2 * ref[0, q, 0, 3] * 0.5  # offset / P · wh / 2
        t = theta[0, q]
        # local (u, v) -> u·(cos θ, sin θ) + v·(-sin θ, cos θ): the w-axis of a le90 box
        x = ref[0, q, 0, 0] + su * math.cos(t) - sv * math.sin(t)
        y = ref[0, q, 0, 1] + su * math.sin(t) + sv * math.cos(t)
        assert torch.allclose(loc[0, q, ..., 0], x, atol=1e-6) and torch.allclose(loc[0, q, ..., 1], y, atol=1e-6)
    # no angle = angle zero; 2-d references scale offsets by the level size
    assert torch.allclose(attn.sampling_locations(offsets, ref, [(8, 8), (4, 4)], None),
                          attn.sampling_locations(offsets, ref, [(8, 8), (4, 4)], torch.zeros(1, 3)))
    pts = attn.sampling_locations(offsets, ref[..., :2], [(8, 16), (4, 4)])
    assert torch.allclose(pts[0, 0, :, 0, :, 0], ref[0, 0, 0, 0] + offsets[0, 0, :, 0, :, 0] / 16)


def test_deform_attn_gradcheck():
    torch.manual_seed(0)
    attn = detection.MSDeformAttn(dim=8, heads=2, levels=2, points=2, dropout=0.0).double()
    shapes = [(4, 4), (2, 2)]
    q = torch.randn(1, 3, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 20, 8, dtype=torch.float64, requires_grad=True)
    ref = torch.rand(1, 3, 2, 4, dtype=torch.float64) * 0.5 + 0.25
    theta = torch.tensor([[0.1, -0.7, 1.2]], dtype=torch.float64)
    mask = torch.zeros(1, 20, dtype=torch.bool)
    with torch.no_grad():  # make the offsets non-trivial
        attn.sampling_offsets.weight.normal_(0, 0.3)
    assert torch.autograd.gradcheck(lambda a, b: attn(a, None, b, mask, ref, shapes, theta), (q, v), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Matching and losses
# ---------------------------------------------------------------------------------------------

def test_giou_matches_torchvision():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(7, 4, generator=g)
    b = torch.rand(5, 4, generator=g)
    a = torch.cat([a[:, :2], a[:, :2] + a[:, 2:]], 1)
    b = torch.cat([b[:, :2], b[:, :2] + b[:, 2:]], 1)
    assert torch.allclose(detection.giou_xyxy(a, b), torchvision.ops.generalized_box_iou(a, b), atol=1e-6)
    assert torch.allclose(detection.giou_xyxy(a[:5], b, pairwise=False), torchvision.ops.generalized_box_iou(a[:5], b).diag(), atol=1e-6)


def _targets(head, boxes, labels, size=(100, 100)):
    return head.prepare_targets([torch.tensor(boxes, dtype=torch.float32)], [torch.tensor(labels)], [size])


def test_matcher_is_the_brute_force_optimum_and_permutes_with_targets():
    torch.manual_seed(0)
    head = detection.DETRHead(num_classes=3, dim=16, heads=2, enc_layers=1, dec_layers=1, ffn=16, num_queries=5)
    matcher = detection.HungarianMatcher()
    for trial in range(5):
        g = torch.Generator().manual_seed(trial)
        Q, M = 5, 3
        logits = torch.randn(1, Q, 3, generator=g)
        boxes = torch.rand(1, Q, 4, generator=g) * 0.5 + 0.2
        angle_logits = torch.randn(1, Q, ro.ANGLE_BINS, generator=g)
        gt = torch.cat([torch.rand(M, 2, generator=g) * 80 + 10, torch.rand(M, 2, generator=g) * 30 + 5,
                        torch.rand(M, 1, generator=g) * 3 - 1.5], 1)
        tgt = head.prepare_targets([ro.regularize_obb(gt)], [torch.randint(0, 3, (M,), generator=g)], [(100, 100)])
        cost = matcher.cost(logits[0], boxes[0], angle_logits[0], tgt[0])
        best = min(sum(cost[q, m] for m, q in enumerate(perm)) for perm in itertools.permutations(range(Q), M))
        rows, cols = matcher(logits, boxes, angle_logits, tgt)[0]
        assert math.isclose(float(cost[rows, cols].sum()), float(best), rel_tol=1e-6)
        # permuting the targets permutes the matches
        perm = torch.tensor([2, 0, 1])
        tgt_p = [{k: (v[perm] if k != "factor" else v) for k, v in tgt[0].items()}]
        rows_p, cols_p = matcher(logits, boxes, angle_logits, tgt_p)[0]
        assert dict(zip(rows.tolist(), cols.tolist())) == {r: int(perm[c]) for r, c in zip(rows_p.tolist(), cols_p.tolist())}


def test_matcher_cost_terms_by_hand():
    head = detection.DETRHead(num_classes=2, dim=16, heads=2, enc_layers=1, dec_layers=1, ffn=16, num_queries=2)
    tgt = _targets(head, [[50, 50, 20, 10, 0.0]], [1])[0]
    logits = torch.tensor([[0.0, 0.0]])
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.1]])  # the target exactly
    angle_logits = torch.zeros(1, ro.ANGLE_BINS)
    c = detection.HungarianMatcher().cost(logits, boxes, angle_logits, tgt)
    p = 0.5
    focal = 0.25 * (1 - p) ** 2 * -math.log(p) - 0.75 * p ** 2 * -math.log(1 - p)
    # zero logits: each bin's BCE is log 2 whatever the target; r = 2 -> weight 4/3
    want = 2 * focal + 0 - 5 * 1.0 + 2 * math.log(2) * (4 / 3)
    assert math.isclose(float(c), want, rel_tol=1e-5)


def test_each_loss_term_by_hand():
    head = detection.DETRHead(num_classes=2, dim=16, heads=2, enc_layers=1, dec_layers=1, ffn=16, num_queries=2)
    tgt = _targets(head, [[50, 50, 30, 10, 0.5]], [1])  # aspect ratio 3 -> angle weight 1.5
    crit = detection.SetCriterion(num_classes=2)
    logits = torch.zeros(1, 2, 2)
    boxes = torch.tensor([[[0.5, 0.5, 0.3, 0.1], [0.6, 0.5, 0.3, 0.1]]])
    angle_logits = torch.zeros(1, 2, ro.ANGLE_BINS)
    indices = [(torch.tensor([1]), torch.tensor([0]))]  # query 1 is the positive
    t = crit._terms(logits, boxes, angle_logits, tgt, indices)
    p, a = 0.5, 0.25
    pos = a * (1 - p) ** 2 * math.log(2)
    neg = (1 - a) * p ** 2 * math.log(2)
    # 4 entries: query 1 class 1 positive, the other three negative; 1 positive to normalise by
    assert math.isclose(float(t["cls"]), 2 * (pos + 3 * neg), rel_tol=1e-5)
    assert math.isclose(float(t["bbox"]), 2 * 0.1, rel_tol=1e-5)
    inter, union, hull = 0.2 * 0.1, 0.03 + 0.03 - 0.2 * 0.1, 0.4 * 0.1
    giou = inter / union - (hull - union) / hull
    assert math.isclose(float(t["giou"]), 5 * (1 - giou), rel_tol=1e-5)
    assert math.isclose(float(t["angle"]), 2 * 1.5 * math.log(2), rel_tol=1e-5)
    # at logits = logit(target) the soft-label BCE is at its minimum, the target's entropy
    target = tgt[0]["angle_targets"][0].double().clamp(1e-6, 1 - 1e-6)
    good = angle_logits.clone()
    good[0, 1] = torch.logit(target).float()
    entropy = -(target * target.log() + (1 - target) * (1 - target).log()).sum() / ro.ANGLE_BINS
    got = float(crit._terms(logits, boxes, good, tgt, indices)["angle"])
    assert math.isclose(got, 2 * 1.5 * float(entropy), rel_tol=1e-4) and got < float(t["angle"])


def test_criterion_names_and_matching_on_a_built_output():
    torch.manual_seed(0)
    head = detection.DETRHead(num_classes=2, dim=16, heads=2, enc_layers=1, dec_layers=2, ffn=16, num_queries=4,
                              num_dn_queries=4)
    feats = [torch.randn(1, 16, 8, 8), torch.randn(1, 16, 4, 4), torch.randn(1, 16, 2, 2), torch.randn(1, 16, 1, 1)]
    masks = [torch.zeros(1, *f.shape[-2:], dtype=torch.bool) for f in feats]
    tgt = _targets(head, [[30, 30, 20, 8, 0.3], [70, 60, 10, 10, -0.8]], [0, 1])
    out = head(feats, masks, tgt)
    assert out["pred_logits"].shape == (1, 4, 2) and out["pred_angle_logits"].shape == (1, 4, ro.ANGLE_BINS)
    assert (out["dn_meta"]["groups"], out["dn_meta"]["pad"]) == (2, 2) and out["dn_outputs"][0]["pred_boxes"].shape == (1, 8, 4)
    losses = head.criterion(out, tgt)
    expected = {f"{p}{k}" for p in ("", "d0.", "enc_", "dn_", "d0.dn_") for k in
                ("loss_cls", "loss_bbox", "loss_giou", "loss_angle")}
    assert set(losses) == {k.replace("enc_loss", "enc_loss").replace("dn_loss", "dn_loss") for k in expected}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert head.label_embedding.weight.grad is not None and head.query_embed.weight.grad is not None


# ---------------------------------------------------------------------------------------------
# Denoising queries
# ---------------------------------------------------------------------------------------------

def test_denoising_queries_follow_dino():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(5, 8)
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.1], [0.3, 0.3, 0.1, 0.1], [0.7, 0.2, 0.1, 0.3]])
    targets = [dict(boxes=boxes, angles=torch.tensor([0.5, -1.0, 1.2]), labels=torch.tensor([1, 2, 3])),
               dict(boxes=boxes[:1], angles=torch.tensor([0.2]), labels=torch.tensor([4]))]
    content, ref, angle, blocked, meta = detection.make_denoising_queries(targets, emb, 5, num_dn_queries=10)
    assert (meta["groups"], meta["pad"]) == (3, 3)  # 10 // 3 groups of 2·3 slots
    slots, objects = meta["positives"][0]
    assert slots.tolist() == [0, 1, 2, 6, 7, 8, 12, 13, 14] and objects.tolist() == [0, 1, 2] * 3
    assert meta["positives"][1][0].tolist() == [0, 6, 12]
    assert content.shape == (2, 18, 8) and ref.shape == (2, 18, 4) and angle.shape == (2, 18)
    noisy = ref.sigmoid()
    for g in range(3):
        pos = slice(6 * g, 6 * g + 3)
        neg = slice(6 * g + 3, 6 * g + 6)
        # side shifts: positives below 0.4·half-size, negatives between 0.4 and 0.8 times
        for sl, lo, hi in ((pos, 0.0, 0.4), (neg, 0.4, 0.8)):
            shift = (ro.hbb_cxcywh_to_xyxy(noisy[0, sl]) - ro.hbb_cxcywh_to_xyxy(boxes)).abs()
            half = boxes[:, 2:].repeat(1, 2) / 2
            inside = (ro.hbb_cxcywh_to_xyxy(noisy[0, sl]) > 1e-3) & (ro.hbb_cxcywh_to_xyxy(noisy[0, sl]) < 1 - 1e-3)
            r = (shift / half)[inside]
            assert (r <= hi + 1e-3).all() and (r >= lo - 1e-3).all()
        rel = ((angle[0, pos] - targets[0]["angles"]) / targets[0]["angles"]).abs()
        assert (rel <= 0.02 + 1e-6).all()
        # a group sees itself only
        assert not blocked[6 * g:6 * g + 6, 6 * g:6 * g + 6].any()
        assert blocked[6 * g:6 * g + 6].sum() == 6 * 12
    assert (content[1, 1:3] == 0).all()  # image 2 has one object: its other slots stay padding


def test_denoising_without_objects_keeps_the_embedding_in_the_graph():
    emb = torch.nn.Embedding(3, 4)
    content, ref, angle, blocked, meta = detection.make_denoising_queries(
        [dict(boxes=torch.zeros(0, 4), angles=torch.zeros(0), labels=torch.zeros(0, dtype=torch.long))], emb, 3)
    assert content.shape == (1, 0, 4) and (meta["groups"], meta["pad"]) == (1, 0)


# ---------------------------------------------------------------------------------------------
# Targets, post-processing, horizontal-box mode
# ---------------------------------------------------------------------------------------------

def test_prepare_targets_obb_and_hbb():
    obb = detection.DETRHead(num_classes=2, dim=16, heads=2, enc_layers=1, dec_layers=1, ffn=16)
    hbb = detection.DETRHead(num_classes=2, dim=16, heads=2, enc_layers=1, dec_layers=1, ffn=16, box_type="hbb")
    box = torch.tensor([[40.0, 30.0, 20.0, 10.0, -math.pi / 2]])  # a 10 x 20 upright box in le90 form
    t = obb.prepare_targets([box], [torch.tensor([1])], [(60, 80)])[0]
    assert torch.allclose(t["boxes"], torch.tensor([[0.5, 0.5, 0.25, 10 / 60]]))
    assert t["angle_targets"].shape == (1, ro.ANGLE_BINS) and float(t["aspect"]) == 2.0
    t = hbb.prepare_targets([box], [torch.tensor([1])], [(60, 80)])[0]
    assert torch.allclose(t["boxes"], torch.tensor([[0.5, 0.5, 10 / 80, 20 / 60]]), atol=1e-6)
    assert "angle_targets" not in t and hbb.angle_branches is None


def test_postprocess_topk_over_query_class_pairs_and_scales_back():
    head = detection.DETRHead(num_classes=3, dim=16, heads=2, enc_layers=1, dec_layers=1, ffn=16, num_queries=2)
    logits = torch.full((1, 2, 3), -10.0)
    logits[0, 1, 2], logits[0, 0, 0] = 3.0, 1.0
    angle_logits = torch.zeros(1, 2, ro.ANGLE_BINS)
    angle_logits[0, 1, 120] = 5  # bin 120 -> 30.5°
    out = dict(pred_logits=logits, pred_boxes=torch.tensor([[[0.5, 0.5, 0.1, 0.1], [0.25, 0.5, 0.5, 0.2]]]),
               pred_angle_logits=angle_logits)
    res = head.postprocess(out, [(100, 200)], [(0.5, 0.5)], max_per_image=2)[0]
    assert res["labels"].tolist() == [2, 0]
    assert torch.allclose(res["scores"], torch.sigmoid(torch.tensor([3.0, 1.0])))
    want = torch.tensor([100.0, 100.0, 200.0, 40.0, math.radians(30.5)])  # (50, 50, 100, 20) / 0.5
    assert torch.allclose(res["boxes"][0], want, atol=1e-3)
    hbb = detection.DETRHead(num_classes=3, dim=16, heads=2, enc_layers=1, dec_layers=1, ffn=16, num_queries=2,
                             box_type="hbb")
    res = hbb.postprocess(dict(pred_logits=logits, pred_boxes=out["pred_boxes"]), [(100, 200)], [(1.0, 2.0)])[0]
    xyxy = ro.obb2hbb(res["boxes"][:1])
    assert torch.allclose(xyxy, torch.tensor([[0.0, 40.0, 50.0, 60.0]]), atol=1e-4)  # x scaled by 1/2


def test_two_heads_share_the_backbone():
    torch.manual_seed(0)
    model = detection.build_detector([dict(modality="rgb", classes=["a", "b"], box_type="obb"),
                                      dict(modality="sar", classes=["a"], box_type="hbb")],
                                     backbone="resnet18", frozen_bn=False, dim=32, heads=2, enc_layers=1,
                                     dec_layers=1, ffn=32, num_queries=5, num_dn_queries=4, gn_groups=8,
                                     loss_weights={"rgb": 1.5})
    images, masks = torch.randn(3, 3, 64, 64), torch.zeros(3, 64, 64, dtype=torch.bool)
    masks[2, :, 48:] = True
    targets = [dict(boxes=torch.tensor([[20.0, 20, 12, 6, 0.4]]), labels=torch.tensor([1]), size=(64, 64)),
               dict(boxes=torch.tensor([[30.0, 30, 10, 10, 0.0]]), labels=torch.tensor([0]), size=(64, 64)),
               dict(boxes=torch.tensor([[20.0, 20, 12, 6, 0.0]]), labels=torch.tensor([0]), size=(64, 48))]
    out = model(images, masks, ["rgb", "sar", "rgb"], targets)
    assert out["outputs"]["rgb"]["index"] == [0, 2] and out["outputs"]["sar"]["index"] == [1]
    assert "rgb.loss_angle" in out["losses"] and "sar.loss_angle" not in out["losses"]
    sum(out["losses"].values()).backward()
    assert model.backbone.layer4[0].conv1.weight.grad is not None
    assert all(p.grad is None for p in model.backbone.layer1.parameters())  # frozen stage 1
    model.eval()
    dets = model.predict(images, masks, ["rgb", "sar", "rgb"], [(64, 64), (64, 64), (64, 48)])
    theta = dets[1]["boxes"][:, 4]  # horizontal boxes in le90 form: θ = 0 or -π/2
    assert (torch.isclose(theta, torch.tensor(0.0), atol=1e-6) | torch.isclose(theta, torch.tensor(-math.pi / 2))).all()
    with pytest.raises(ValueError, match="no head"):
        model(images, masks, ["rgb", "ir", "rgb"])


def test_tiny_model_overfits_two_images(tmp_path):
    """Two SynthSOI-RGB images, a small model, a few hundred steps on CPU: AP50 = 1.0 on them."""
    import eval as evaluation
    torch.manual_seed(0)
    root = datasets.make_synthetic(tmp_path / "synth", n_train=2, n_test=1, size=128, max_objects=3, seed=3,
                                   modalities=("rgb",))
    split = datasets.load_detection_split(root / "rgb" / "train", "rgb")
    model = detection.build_detector([dict(modality="rgb", classes=split.classes, box_type="obb")],
                                     backbone="resnet18", frozen_bn=False, dim=64, heads=4, enc_layers=1,
                                     dec_layers=2, ffn=128, dropout=0.0, num_queries=30, num_dn_queries=10)
    tf = datasets.Compose([datasets.Resize(128), datasets.Normalize()])
    items = [tf(split[i]) for i in range(len(split))]
    batch = datasets.collate(items)
    sizes = [tuple(it["image"].shape[-2:]) for it in items]
    targets = [dict(boxes=b, labels=l, size=s) for b, l, s in zip(batch["boxes"], batch["labels"], sizes)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-5)  # AP50 1.0 after about 100 steps
    annots = [dict(boxes=s.boxes, labels=s.labels, difficult=s.difficult) for s in split.samples]
    ap50 = 0.0
    for step in range(400):
        loss = sum(model(batch["images"], batch["masks"], ["rgb"] * len(items), targets)["losses"].values())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 35)
        opt.step()
        if step % 25 == 24:
            model.eval()
            dets = model.predict(batch["images"], batch["masks"], ["rgb"] * len(items), sizes,
                                 [it["scale"] for it in items])
            model.train()
            per_image = [[torch.cat([d["boxes"][d["labels"] == c], d["scores"][d["labels"] == c, None]], 1).numpy()
                          for c in range(len(split.classes))] for d in dets]
            ap50 = evaluation.eval_rbbox_map(per_image, annots, (0.5,), "area")["mean"]
            if ap50 == 1.0:
                break
    assert ap50 == 1.0


def test_resnet_loads_local_torchvision_weights(tmp_path):
    net = torchvision.models.resnet18(weights=None)
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    backbone = detection.ResNetBackbone("resnet18", str(tmp_path / "r18.pth"), frozen_bn=True)
    assert torch.equal(backbone.layer3[1].conv2.weight, net.layer3[1].conv2.weight)
    assert torch.equal(backbone.stem[1].running_var, net.bn1.running_var)  # into the frozen BatchNorm
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not a torchvision resnet18"):
        detection.ResNetBackbone("resnet18", str(tmp_path / "bad.pth"))


def test_frozen_batchnorm_is_torchvisions():
    from torchvision.ops.misc import FrozenBatchNorm2d
    g = torch.Generator().manual_seed(0)
    ours, ref = detection.FrozenBatchNorm(6), FrozenBatchNorm2d(6)
    bn = torch.nn.BatchNorm2d(6)
    for t in (bn.weight, bn.bias, bn.running_mean):
        t.data = torch.randn(6, generator=g)
    bn.running_var.data = torch.rand(6, generator=g) + 0.5
    ours.load_state_dict(bn.state_dict())  # a trainable BatchNorm's state (with num_batches_tracked)
    ref.load_state_dict(bn.state_dict())
    x = torch.randn(2, 6, 5, 7, generator=g, requires_grad=True)
    y1, y2 = ours(x), ref(x)
    assert torch.allclose(y1, y2, atol=1e-5)
    g1, = torch.autograd.grad(y1.square().sum(), x)
    g2, = torch.autograd.grad(y2.square().sum(), x)
    assert torch.allclose(g1, g2, atol=1e-4) and not any(p.requires_grad for p in ours.parameters())
