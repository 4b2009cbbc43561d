"""MutDet's model parts: the enhancement layer's attention and invariances, the contrastive
alignment loss against a per-row InfoNCE loop, and the pre-training model's losses and gradients;
the pseudo-label pieces, the sam cache, the mutdet stage and fine-tuning from it."""
import json
import math

import numpy as np

import pytest
import torch
import torch.nn.functional as F

import detection
import mutdet


def test_attention_is_softmax_qk_v():
    torch.manual_seed(0)
    attn = mutdet.Attention(8, 2)
    q, kv = torch.randn(3, 8), torch.randn(5, 8)
    Q, K, V = attn.q_proj(q), attn.k_proj(kv), attn.v_proj(kv)
    heads = []
    for h in range(2):
        s = slice(4 * h, 4 * h + 4)
        heads.append(torch.softmax(Q[:, s] @ K[:, s].T / 2.0, -1) @ V[:, s])
    assert torch.allclose(attn(q, kv, kv), attn.out_proj(torch.cat(heads, 1)), atol=1e-6)


def test_enhancement_layer_equations_and_permutations():
    torch.manual_seed(0)
    block = mutdet.TwoWayBlock(dim=16, heads=2, mlp=32)
    o, f = torch.randn(4, 16), torch.randn(10, 16)
    o1 = block.norm1(o + block.self_attn(o, o, o))
    o2 = block.norm2(o1 + block.token_to_image(o1, f, f))
    o3 = block.norm3(o2 + block.mlp(o2))
    f1 = block.norm4(f + block.image_to_token(f, o3, o3))
    got_o, got_f = block(o, f)
    assert torch.allclose(got_o, o3, atol=1e-6) and torch.allclose(got_f, f1, atol=1e-6)
    # objects are a set: permuting them permutes O_enh and leaves F_enh unchanged
    module = mutdet.MutualEnhancement(dim=16, heads=2, mlp=32, depth=3)
    perm = torch.tensor([2, 0, 3, 1])
    a_o, a_f = module(o, f)
    b_o, b_f = module(o[perm], f)
    assert torch.allclose(a_o[perm], b_o, atol=1e-5) and torch.allclose(a_f, b_f, atol=1e-5)


def test_contrastive_alignment_loss_against_a_loop():
    g = torch.Generator().manual_seed(0)
    z, o = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    q, k = F.normalize(z, dim=-1), F.normalize(o, dim=-1)
    total = 0.0
    for i in range(5):  # InfoNCE of row i in both directions
        s_qk = [float(q[i] @ k[j]) / 0.2 for j in range(5)]
        s_kq = [float(k[i] @ q[j]) / 0.2 for j in range(5)]
        total += -s_qk[i] + math.log(sum(math.exp(v) for v in s_qk))
        total += -s_kq[i] + math.log(sum(math.exp(v) for v in s_kq))
    want = 2 * 0.2 * total / 5
    assert math.isclose(float(mutdet.contrastive_alignment_loss(z, o)), want, rel_tol=1e-5)
    # perfect alignment of orthogonal embeddings: each CE is log(1 + (M-1)·e^{-1/τ})
    eye = torch.eye(3)
    assert math.isclose(float(mutdet.contrastive_alignment_loss(eye, 2 * eye)),
                        2 * 0.2 * 2 * math.log(1 + 2 * math.exp(-5)), rel_tol=1e-5)
    assert float(mutdet.contrastive_alignment_loss(torch.zeros(0, 4), torch.zeros(0, 4))) == 0.0


def _pretrainer(**kw):
    torch.manual_seed(0)
    det = detection.build_detector([dict(modality="rgb", classes=[f"cluster_{i}" for i in range(8)], box_type="obb")],
                                   backbone="resnet18", frozen_bn=False, dim=32, heads=2, enc_layers=1, dec_layers=2,
                                   ffn=32, num_queries=6, num_dn_queries=4, gn_groups=8)
    return mutdet.MutDetPretrainer(det, embed_dim=32, heads=2, mlp=64, **kw)


def _batch():
    g = torch.Generator().manual_seed(1)
    images, masks = torch.randn(2, 3, 64, 64, generator=g), torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[1, :, 48:] = True
    targets = [dict(boxes=torch.tensor([[20.0, 20, 16, 6, 0.4], [40, 40, 10, 8, -1.0], [30, 50, 12, 4, 0.1]]),
                    labels=torch.tensor([1, 5, 7]), size=(64, 64), embeds=torch.randn(3, 32, generator=g)),
               dict(boxes=torch.tensor([[20.0, 30, 12, 6, 0.0]]), labels=torch.tensor([2]), size=(64, 48),
                    embeds=torch.randn(1, 32, generator=g))]
    return images, masks, targets


def test_pretrainer_losses_and_gradients():
    model = _pretrainer()
    images, masks, targets = _batch()
    losses = model(images, masks, targets)
    for key in ("p_loss_cls", "p_enc_loss_angle", "p_dn_loss_giou", "p_loss_embed", "p_dn_loss_embed",
                "p_enc_loss_embed", "loss_cls", "d0.loss_bbox", "enc_loss_cls", "loss_embed", "dn_loss_embed"):
        assert key in losses and torch.isfinite(losses[key]), key
    assert "enc_loss_embed" not in losses  # the siamese encoder has no alignment term
    sum(losses.values()).backward()
    assert model.enhancement.layers[0].token_to_image.q_proj.weight.grad.abs().sum() > 0
    assert model.feature_embed[0].weight.grad.abs().sum() > 0
    assert model.patch_enc_decode[0].weight.grad.abs().sum() > 0
    assert model.detector.heads["rgb"].decoder[0].cross_attn.value_proj.weight.grad.abs().sum() > 0
    assert "head.query_embed.weight" not in model.state_dict()  # the head set is stored once


def test_frozen_backbone_keeps_weights_and_statistics():
    model = _pretrainer(freeze_backbone=True).train()
    before = {k: v.clone() for k, v in model.detector.backbone.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sum(model(*_batch()).values()).backward()
    opt.step()
    assert not model.detector.backbone.training and model.detector.neck.training
    assert all(p.grad is None for p in model.detector.backbone.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.detector.backbone.state_dict().items())
    assert model.detector.neck.convs[0][0].weight.grad is not None  # the neck trains (only the backbone is frozen)


def test_detreg_row_and_switches():
    images, masks, targets = _batch()
    losses = _pretrainer(enhance=False, align=False)(images, masks, targets)
    assert not any(k.startswith("p_") or "embed" in k for k in losses) and "loss_cls" in losses
    only_enhanced = _pretrainer(siamese=False)(images, masks, targets)
    assert "loss_cls" not in only_enhanced and "p_loss_embed" in only_enhanced
    with pytest.raises(ValueError, match="at least one"):
        _pretrainer(enhance=False, siamese=False)
    with pytest.raises(ValueError, match="raw"):
        mutdet.MutDetPretrainer(_pretrainer().detector, embed_dim=64)


def test_pretrainer_learns_a_batch():
    # The denoising queries are drawn anew every step, so one step's loss is noisy (±20 % here):
    # the last ten steps' mean is compared with the first step, whatever the CPU's rounding.
    model = _pretrainer()
    images, masks, targets = _batch()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    totals, aligns = [], []
    for _ in range(60):
        losses = model(images, masks, targets)
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 35)
        opt.step()
        totals.append(total.item())
        aligns.append(losses["p_loss_embed"].item())
    assert sum(totals[-10:]) / 10 < 0.6 * totals[0] and sum(aligns[-10:]) / 10 < aligns[0]


def test_l1_embedding_loss_for_the_detreg_row():
    images, masks, targets = _batch()
    model = _pretrainer(enhance=False, embed_loss="l1")
    losses = model(images, masks, targets)
    assert "loss_embed" in losses and not any(k.startswith("p_") for k in losses)
    pred, target = torch.randn(3, 32), torch.randn(3, 32)
    model.feature_embed = torch.nn.Identity()
    idx = [(torch.tensor([0, 2]), torch.tensor([1, 0])), (torch.tensor([1]), torch.tensor([0]))]
    hidden = torch.stack([pred, pred])
    got = model._alignment(hidden, idx, [target[:2], target[2:]])
    want = (torch.stack([pred[0], pred[2], pred[1]]) - torch.stack([target[1], target[0], target[2]])).abs().mean()
    assert torch.allclose(got, want)


def test_min_area_rect_matches_shapely():
    import shapely
    import rotated_ops as ro
    rng = np.random.default_rng(0)
    for trial in range(30):
        pts = rng.normal(size=(int(rng.integers(3, 40)), 2)) * rng.uniform(1, 50, size=2) @ \
            np.array([[np.cos(trial), np.sin(trial)], [-np.sin(trial), np.cos(trial)]]) + rng.uniform(0, 500, 2)
        box = mutdet.min_area_rect(pts)
        ref = shapely.minimum_rotated_rectangle(shapely.MultiPoint(pts))
        assert box[2] >= box[3] and -np.pi / 2 <= box[4] < np.pi / 2  # le90
        assert math.isclose(float(box[2] * box[3]), ref.area, rel_tol=1e-9, abs_tol=1e-9)
        poly = shapely.Polygon(ro.obb_corners(box[None])[0].numpy())
        assert poly.buffer(1e-6).contains(shapely.MultiPoint(pts))


def test_mask_to_obb_takes_the_main_part():
    from PIL import Image, ImageDraw
    import rotated_ops as ro
    box = torch.tensor([[60.0, 50.0, 60.0, 16.0, 0.5]], dtype=torch.float64)
    img = Image.new("L", (128, 100))
    draw = ImageDraw.Draw(img)
    draw.polygon([tuple(p) for p in ro.obb_corners(box)[0].tolist()], fill=1)
    draw.rectangle([5, 5, 8, 8], fill=1)  # a small second component
    got = mutdet.mask_to_obb(np.array(img) > 0)
    assert float(ro.box_iou_rotated(got[None], box, aligned=True)) > 0.85
    assert torch.equal(mutdet.mask_to_obb(np.zeros((5, 5), bool)), torch.zeros(5, dtype=torch.float64))


def test_pca_and_spherical_kmeans():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g, dtype=torch.float64) * torch.tensor([5.0, 3, 1, 0.5, 0.1, 0.05], dtype=torch.float64)
    x = x @ torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))[0] + 7
    A, b = mutdet.fit_pca(x, 3)
    assert torch.allclose(A @ A.T, torch.eye(3, dtype=torch.float64), atol=1e-10)
    evals, evecs = torch.linalg.eigh(torch.cov(x.T))
    for i in range(3):  # the top eigenvectors of the covariance, up to sign
        assert abs(float(A[i] @ evecs[:, -1 - i])) == pytest.approx(1.0, abs=1e-8)
    assert torch.allclose((x @ A.T + b).mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-9)
    # three tight clusters on the sphere are found exactly
    centres = F.normalize(torch.randn(3, 8, generator=g), dim=-1)
    pts = torch.cat([F.normalize(c + 0.05 * torch.randn(30, 8, generator=g), dim=-1) for c in centres])
    found = mutdet.kmeans_cosine(pts, 3, seed=1)
    assign = (F.normalize(pts, dim=-1) @ found.T).argmax(1)
    for k in range(3):
        assert len(set(assign[30 * k:30 * (k + 1)].tolist())) == 1
    assert len(set(assign.tolist())) == 3 and torch.allclose(found.norm(dim=1), torch.ones(3))


def test_point_grid_and_stability_score():
    grid = mutdet.build_point_grid(4)
    assert grid.shape == (16, 2) and torch.allclose(grid[0], torch.tensor([0.125, 0.125], dtype=torch.float64))
    assert torch.allclose(grid[1], torch.tensor([0.375, 0.125], dtype=torch.float64))  # x runs first
    logits = torch.tensor([[[-2.0, -0.5], [0.5, 3.0]]])
    # above +1: one pixel; above -1: three pixels
    assert torch.allclose(mutdet.stability_score(logits, 1.0), torch.tensor([1 / 3]))


def test_generate_masks_respects_every_filter():
    from torchvision.ops import box_iou
    torch.manual_seed(0)
    sam = mutdet.build_sam(image_size=128)
    image = (torch.rand(3, 96, 120) * 255).to(torch.uint8)
    out = mutdet.generate_masks(sam, image, points_per_side=8, points_per_batch=16, pred_iou_thresh=-1.0,
                                stability_score_thresh=0.0, box_nms_thresh=0.7)
    assert out["masks"].shape[1:] == (96, 120) and len(out["masks"]) >= 1
    iou = box_iou(out["boxes"], out["boxes"]) - torch.eye(len(out["boxes"]))
    assert (iou <= 0.7 + 1e-6).all()  # NMS
    for m, b in zip(out["masks"], out["boxes"]):  # boxes are the masks' extents
        ys, xs = torch.nonzero(m, as_tuple=True)
        assert b.tolist() == [xs.min().item(), ys.min().item(), xs.max().item(), ys.max().item()]
    strict = mutdet.generate_masks(sam, image, points_per_side=8, points_per_batch=16, pred_iou_thresh=0.5,
                                   stability_score_thresh=0.9)
    assert (strict["iou"] > 0.5).all() and (strict["stability"] >= 0.9).all()


def test_colour_components_find_flat_objects_on_a_noisy_ground():
    g = torch.Generator().manual_seed(0)
    image = (torch.tensor([90.0, 100, 70])[:, None, None] + 10 * torch.randn(3, 64, 64, generator=g)).clamp(0, 255)
    image[:, 10:20, 5:35] = torch.tensor([40.0, 80, 210])[:, None, None]  # 10 x 30
    image[:, 40:52, 40:52] = torch.tensor([240.0, 200, 40])[:, None, None]  # 12 x 12
    masks = mutdet.colour_components(image.to(torch.uint8))
    assert masks.shape == (2, 64, 64)
    assert masks[0].sum() == 300 and masks[0][10:20, 5:35].all()  # largest first
    assert masks[1].sum() == 144 and masks[1][40:52, 40:52].all()
    boxes, _ = mutdet.proposals_from_masks(masks)
    # cv2.minAreaRect on a contour spans pixel centres: a 30 x 10 px block gives 29 x 9
    assert torch.allclose(boxes[0], torch.tensor([19.5, 14.5, 29.0, 9.0, 0.0], dtype=boxes.dtype), atol=1e-6)


def test_proposals_keep_boxes_and_their_masks_together():
    masks = torch.zeros(4, 40, 40, dtype=torch.bool)
    masks[0, 5:10, 5:30] = True  # medium
    masks[1, 20, 20] = True  # a single pixel: w = h = 0, dropped
    masks[2, 2:38, 2:30] = True  # largest
    masks[3, 30:33, 30:39] = True  # small
    boxes, kept = mutdet.proposals_from_masks(masks)
    assert kept.tolist() == [2, 0, 3]  # by area, the dropped mask's index gone with its box
    assert torch.allclose(boxes[0], torch.tensor([15.5, 19.5, 35.0, 27.0, -np.pi / 2], dtype=torch.float64))
    assert mutdet.proposals_from_masks(masks, max_boxes=2)[1].tolist() == [2, 0]


class _Keep(torch.nn.Module):  # a "trunk" that keeps the whole crop as the embedding
    def forward(self, x):
        return x.flatten(1)[:, :, None, None]


def test_object_embeddings_follow_the_box_frame():
    g = torch.Generator().manual_seed(0)
    image = torch.randn(3, 40, 50, generator=g, dtype=torch.float64)
    boxes = torch.tensor([[20.0, 15.0, 12.0, 6.0, 0.3], [30.0, 25.0, 9.0, 9.0, -1.2]], dtype=torch.float64)
    emb = mutdet.object_embeddings(image, boxes, _Keep(), crop=8, chunk=1)
    assert emb.shape == (2, 3 * 8 * 8)
    # turning image and boxes by 90° counter-clockwise on screen leaves every crop unchanged
    W = image.shape[2]
    turned = torch.rot90(image, 1, dims=(1, 2))  # pixel (r, c) -> (W - 1 - c, r)
    tb = boxes.clone()
    tb[:, 0], tb[:, 1], tb[:, 4] = boxes[:, 1], W - boxes[:, 0], boxes[:, 4] - np.pi / 2
    assert torch.allclose(mutdet.object_embeddings(turned, tb, _Keep(), crop=8), emb, atol=1e-9)
    # the crop covers 1.5 x the box: with context 1 it is a different (tighter) crop
    assert not torch.allclose(mutdet.object_embeddings(image, boxes, _Keep(), crop=8, context=1.0), emb)
    trunk = mutdet.resnet_trunk("resnet18")
    assert mutdet.object_embeddings(image.float(), boxes.float(), trunk, crop=32).shape == (2, 512)
    assert mutdet.object_embeddings(image.float(), boxes[:0].float(), trunk, crop=32).shape == (0, 512)  # no box
    assert not any(p.requires_grad for p in trunk.parameters())


def test_sam_stage_caches_and_resumes(tmp_path):
    import json
    from safetensors.torch import load_file
    import datasets
    import train
    synth = datasets.make_synthetic(tmp_path / "synth", n_train=3, n_test=1, size=64, max_objects=2, modalities=("rgb",))
    argv = ["--stage", "sam", "--resnet", "", "--data", f"rgb:{synth / 'rgb'}", "--points_per_side", "3", "--sam_image_size", "64",
            "--image_size", "64", "--crop", "16", "--pca_dim", "8", "--clusters", "2", "--out", str(tmp_path / "cache")]
    assert train.main(argv + ["--max-steps", "2"]) == 0
    first = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache" / "raw").iterdir()}
    assert train.main(["--resume", str(tmp_path / "cache"), "--max-steps", "0"]) == 0  # the stage from config.json;
    #                                                               the two finished images are not recomputed
    raw = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache" / "raw").iterdir()}
    assert len(raw) == 3 and all(raw[k] == v for k, v in first.items())
    log = [json.loads(l) for l in (tmp_path / "cache" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 3
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert len(manifest["images"]) == 3 and manifest["classes"] == ["cluster_1", "cluster_2"]
    for im in manifest["images"]:
        c = load_file(str(tmp_path / "cache" / "cache" / f"{im['name']}.safetensors"))
        assert len(c["boxes"]) == len(c["labels"]) == len(c["embeds"]) == im["boxes"]  # filtered together
        assert torch.allclose(c["embeds"].norm(dim=1), torch.ones(len(c["embeds"])), atol=1e-5)
        assert (c["boxes"][:, 2] >= c["boxes"][:, 3]).all() and int(c["labels"].max()) < 2
    assert not list((tmp_path / "cache").rglob("*.tmp"))


# ---------------------------------------------------------------------------------------------
# train.py --stage mutdet and fine-tuning from it
# ---------------------------------------------------------------------------------------------

MODEL = ["--resnet", "", "--dim", "16", "--heads", "2", "--enc_layers", "1", "--dec_layers", "1", "--ffn", "16",
         "--num_queries", "8", "--num_dn_queries", "4", "--gn_groups", "4"]


@pytest.fixture(scope="module")
def sam_cache(tmp_path_factory):
    import datasets
    import train
    root = tmp_path_factory.mktemp("mutdet")
    synth = datasets.make_synthetic(root / "synth", n_train=4, n_test=2, size=64, max_objects=2, modalities=("rgb",))
    assert train.main(["--stage", "sam", "--resnet", "", "--data", f"rgb:{synth / 'rgb'}", "--points_per_side", "3",
                       "--sam_image_size", "64", "--image_size", "64", "--crop", "16", "--pca_dim", "16",
                       "--clusters", "3", "--out", str(root / "cache")]) == 0
    return root


def test_cache_items_keep_embeddings_with_their_boxes(sam_cache):
    import random
    import datasets
    data = mutdet.PseudoLabels(sam_cache / "cache")
    manifest = json.loads((sam_cache / "cache" / "manifest.json").read_text())
    assert len(data) == sum(im["boxes"] > 0 for im in manifest["images"])  # images without proposals skipped
    item = data[0]
    assert len(item["boxes"]) == len(item["labels"]) == len(item["embeds"]) > 0 and len(data.classes) == 3
    assert mutdet.PseudoLabels(sam_cache / "cache", class_agnostic=True)[0]["labels"].max() == 0
    # a rotation that pushes objects out drops their embeddings with them, row for row
    item["embeds"] = torch.arange(len(item["boxes"]), dtype=torch.float)[:, None].repeat(1, 2)
    item["labels"] = torch.arange(len(item["boxes"]))
    out = datasets.RandomRotate(1.0, generator=random.Random(3))(item)
    assert torch.equal(out["embeds"][:, 0].long(), out["labels"]) and len(out["embeds"]) == len(out["boxes"])


def test_cache_errors_name_the_file(sam_cache, tmp_path):
    import datasets
    with pytest.raises(datasets.DatasetError, match="no manifest.json"):
        mutdet.PseudoLabels(tmp_path)
    (tmp_path / "manifest.json").write_text('{"classes": [],\n "images": [,]}')
    with pytest.raises(datasets.DatasetError, match=r"manifest.json:2: not valid JSON"):
        mutdet.PseudoLabels(tmp_path)


def test_mutdet_stage_trains_resumes_and_feeds_finetuning(sam_cache, capsys):
    import json
    from safetensors.torch import load_file
    import train
    data = ["--data", str(sam_cache / "cache"), "--image_size", "64", "--batch_size", "2", "--global_batch", "2", "--enhance_heads", "2",
            "--enhance_mlp", "16"]
    straight, split = sam_cache / "straight", sam_cache / "split"
    assert train.main(["--stage", "mutdet"] + MODEL + data + ["--max-steps", "3", "--out", str(straight)]) == 0
    assert train.main(["--stage", "mutdet"] + MODEL + data + ["--max-steps", "2", "--out", str(split)]) == 0
    assert train.main(["--resume", str(split), "--max-steps", "3"]) == 0
    logs = [[json.loads(l) for l in (r / "log.jsonl").read_text().splitlines()] for r in (straight, split)]
    assert [r["step"] for r in logs[1]] == [1, 2, 3]
    for a, b in zip(*logs):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert {"p_loss_embed", "p_enc_loss_embed", "loss_embed", "dn_loss_embed", "p_loss_cls"} <= set(logs[0][-1])
    weights = load_file(str(straight / "model.safetensors"))

    # the DETReg row: no enhancement, L1, class-agnostic
    assert train.main(["--stage", "mutdet"] + MODEL + data + ["--no-enhance", "--embed-loss", "l1",
                                                              "--pseudo-classes", "1", "--max-steps", "1",
                                                              "--out", str(sam_cache / "detreg")]) == 0
    row = json.loads((sam_cache / "detreg" / "log.jsonl").read_text().splitlines()[-1])
    assert "loss_embed" in row and not any(k.startswith("p_") for k in row)
    assert load_file(str(sam_cache / "detreg" / "model.safetensors"))["detector.heads.rgb.cls_branches.0.bias"].shape == (1,)

    # fine-tuning from the MutDet run: prefix stripped, pre-training modules dropped, class head afresh
    capsys.readouterr()
    synth = sam_cache / "synth" / "rgb"
    assert train.main(MODEL + ["--data", f"rgb:{synth}", "--image_size", "64", "--batch_size", "2", "--global_batch", "2", "--eval", "false",
                               "--init", str(straight), "--max-steps", "1", "--lr", "0",
                               "--out", str(sam_cache / "ft")]) == 0
    printed = capsys.readouterr().out
    assert "a MutDet pre-training run; dropped" in printed and "enhancement (" in printed
    assert "feature_embed (" in printed and "class head (pseudo-classes)" in printed
    assert "missing: heads.rgb.cls_branches.0.weight" in printed and "unexpected:" not in printed
    tuned = load_file(str(sam_cache / "ft" / "model.safetensors"))
    neck = [k for k in tuned if k.startswith("neck.")][0]
    assert torch.equal(tuned[neck], weights["detector." + neck])  # lr 0: loaded as pre-trained
    assert torch.equal(tuned["heads.rgb.query_embed.weight"], weights["detector.heads.rgb.query_embed.weight"])
    import datasets  # the fine-tuning split's classes, not the 3 clusters
    classes = datasets.load_detection_split(datasets.find_split(synth, "train"), "rgb").classes
    assert tuned["heads.rgb.cls_branches.0.weight"].shape[0] == len(classes) != 3


def test_attention_of_a_pretraining_run(sam_cache, tmp_path, capsys):
    """eval.py --run MUTDET_RUN --predict IMAGE --attention K: the enhanced branch on an image of the run's
    cache, each query linked to its nearest objects by the cosine of Ẑ and O_enh (checked against a
    direct computation from the pre-trainer's own forward pieces)."""
    import datasets
    import eval as ev
    import train
    data = ["--data", str(sam_cache / "cache"), "--image_size", "64", "--batch_size", "2", "--global_batch", "2",
            "--enhance_heads", "2", "--enhance_mlp", "16"]
    run = tmp_path / "pre"
    assert train.main(["--stage", "mutdet"] + MODEL + data + ["--max-steps", "1", "--out", str(run)]) == 0
    cache = mutdet.PseudoLabels(sam_cache / "cache")
    record = cache.records[0]
    image, att = ev.mutdet_attention(run, record["name"], k=3, top=2)
    assert image.shape[:2] == tuple(cache[0]["image"].shape[-2:]) and att["links"].shape == (3, 2)
    assert len(att["objects"]) == record["boxes"] and (att["link_cos"].abs() <= 1 + 1e-5).all()
    assert (att["link_cos"][:, 0] >= att["link_cos"][:, 1]).all()
    # the same cosines from the pre-trainer's loss path: feature_embed on the decoder's hidden states vs O_enh
    import json
    import types
    from safetensors.torch import load_file
    cfg = types.SimpleNamespace(**json.loads((run / "config.json").read_text()))
    model = mutdet.build_pretrainer(cfg, cache.classes, cache.embed_dim).eval()
    model.load_state_dict(load_file(str(run / "model.safetensors")))
    item = datasets.Compose([datasets.Resize(64), datasets.Normalize()])(cache[0])
    batch = datasets.collate([item])
    with torch.no_grad():
        det = model.detector
        feats = det.neck(det.backbone(batch["images"]))
        masks = [torch.nn.functional.interpolate(batch["masks"][None].float(), size=f.shape[-2:])[0].bool() for f in feats]
        out, objects, _ = model.enhanced_pass(model.head.encode(feats, masks), [item["embeds"].float()])
        z = torch.nn.functional.normalize(model.feature_embed(out["hidden"][0, att["queries"]]), dim=-1)
        cos = z @ torch.nn.functional.normalize(objects[0], dim=-1).T
    assert torch.allclose(cos.gather(1, att["links"]), att["link_cos"], atol=1e-5)
    assert ev.main(["--run", str(run), "--predict", record["image"], "--attention", "2", "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / f"{record['name']}_attention.png").exists()
    other = tmp_path / "elsewhere.png"
    datasets.Image.fromarray(image).save(other)
    assert ev.main(["--run", str(run), "--predict", str(other), "--attention", "2", "--out", str(tmp_path / "o")]) == 2
    assert "not an image of" in capsys.readouterr().err
