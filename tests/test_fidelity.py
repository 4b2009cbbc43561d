"""Each fix of the fidelity pass against the official code (issue 12), one test each: every test
fails on the code before the fix. The official-output comparisons are in test_official_parity.py."""
import math
import random

import pytest
import torch

import babelrs
import datasets
import detection
import mutdet
import rotated_ops as ro
import tables
import train


# 1. the detector reads the blocks CSIA aligns -------------------------------------------------

def test_pyramid_taps_the_adapter_group_ends():
    assert babelrs.group_end_blocks(24) == (3, 9, 18, 24)  # interaction_indexes [[0,2],[3,8],[9,17],[18,23]]
    assert babelrs.group_end_blocks(4) == (1, 2, 3, 4)
    tiny = train.FINETUNE_PRESETS["babelrs-tiny"]
    read = babelrs.group_end_blocks(tiny.vit_depth)
    assert set(read) <= set(train.CSIA_PRESETS["tiny"].layers)  # CSIA aligns every block the detector reads
    assert tiny.vit_depth == train.CSIA_PRESETS["tiny"].vit_depth
    torch.manual_seed(0)
    pyramid = babelrs.ViTPyramid(babelrs.ViT(dim=16, depth=4, heads=2, patch=8, image_size=64, cls_token=False))
    x = torch.randn(1, 3, 64, 64)
    before = [f.detach().clone() for f in pyramid(x)]
    with torch.no_grad():  # change the last block: only the level that reads it moves
        pyramid.vit.encoder.layers[3].mlp.fc2.bias.add_(1.0)
    after = pyramid(x)
    assert all(torch.equal(a, b) for a, b in zip(after[:3], before[:3])) and not torch.equal(after[3], before[3])
    assert [f.shape[-1] for f in after] == [8, 4, 2, 1]  # strides 8, 16, 32, 64


# 6. no CLS token in the detection ViT ----------------------------------------------------------

def test_detection_vit_has_no_cls_token_and_loads_internvit_weights(tmp_path):
    from safetensors.torch import save_file
    src = babelrs.ViT(dim=16, depth=2, heads=2, patch=8, image_size=32)
    save_file(src.state_dict(), str(tmp_path / "vit.safetensors"))
    det = babelrs.ViT(dim=16, depth=2, heads=2, patch=8, image_size=32, cls_token=False).eval()
    babelrs.load_vit_weights(det, str(tmp_path / "vit.safetensors"))  # strict: class_embedding dropped
    assert "embeddings.class_embedding" not in det.state_dict()
    x = torch.randn(1, 3, 32, 32)
    hidden = det(x)
    assert hidden[-1].shape == (1, 16, 16)  # patch tokens only
    # the patch tokens are the ViT with positions[:, 1:] and no CLS attending: not the CLS model's tokens
    assert not torch.allclose(hidden[-1], src.eval()(x)[-1][:, 1:])


# 2. augmentation per source -------------------------------------------------------------------

def _item(classes_present):
    box = torch.tensor([[40.0, 30.0, 30.0, 10.0, 0.3]])
    return dict(image=torch.zeros(3, 64, 96, dtype=torch.uint8), boxes=box, labels=torch.tensor(classes_present),
                difficult=torch.tensor([False]))


def test_sar_gets_only_horizontal_flips():
    seen = set()
    for s in range(60):
        t = datasets.detection_transform(96, True, 0.5, random.Random(s), "sar", ["ship"])
        box = t(_item([0]))["boxes"][0]
        seen.add((round(float(box[0])), round(float(box[1]))))
    assert seen == {(40, 30), (56, 30)}  # the centre: untouched or mirrored left-right, never moved in y


def test_rect_classes_turn_by_quarter_turns_only():
    classes = ["plane", "storage-tank"]
    angles = set()
    for s in range(40):
        gen = random.Random(s)
        t = datasets.RandomRotate(1.0, rect_classes=(1,), generator=gen)
        out = t(_item([1]))
        angles.add(round(math.degrees(float(ro.norm_angle(out["boxes"][0, 4] - 0.3))) % 90, 3))
    assert angles <= {0.0, 90.0}  # multiples of 90°
    rect = [i for i, c in enumerate(classes) if c in datasets.RECT_CLASSES]
    assert rect == [1]


def test_rotation_angles_follow_the_official_distribution(monkeypatch):
    """mmrotate's PolyRandomRotate (ARS-DETR 0d96c5e transforms.py): a rect-class image turns by the first
    of [90, 180, -90, -180] shuffled, so +90 and -90 with 1/4 each and a half turn with 1/2; any other
    image by an angle uniform in ±angles_range = ±180 degrees."""
    from torchvision.transforms.v2 import functional as TF
    drawn = []
    real = TF.rotate
    monkeypatch.setattr(TF, "rotate", lambda x, angle, *a, **k: (drawn.append(angle), real(x, angle, *a, **k))[1])
    gen = random.Random(0)
    for _ in range(2000):
        datasets.RandomRotate(1.0, rect_classes=(1,), generator=gen)(_item([1]))
    turns = [a for a in drawn[::2]]  # image and polygons turn by the same angle
    share = {k: turns.count(k) / len(turns) for k in (90.0, -90.0)}
    half = sum(abs(a) == 180.0 for a in turns) / len(turns)
    assert abs(share[90.0] - 0.25) < 0.03 and abs(share[-90.0] - 0.25) < 0.03 and abs(half - 0.5) < 0.03
    drawn.clear()
    for _ in range(2000):
        datasets.RandomRotate(1.0, generator=gen)(_item([0]))
    free = drawn[::2]
    assert min(free) < -170 and max(free) > 170 and abs(sum(a > 90 or a < -90 for a in free) / len(free) - 0.5) < 0.05


# 3. the DETReg row --------------------------------------------------------------------------

def _pretrainer(**kw):
    torch.manual_seed(0)
    det = detection.build_detector([dict(modality="rgb", classes=["a", "b"], box_type="obb")], backbone="resnet18",
                                   frozen_bn=False, dim=32, heads=2, enc_layers=1, dec_layers=2, ffn=32, num_queries=6,
                                   num_dn_queries=4, gn_groups=8)
    return mutdet.MutDetPretrainer(det, embed_dim=32, heads=2, mlp=64, **kw)


def _batch():
    g = torch.Generator().manual_seed(1)
    targets = [dict(boxes=torch.tensor([[20.0, 20, 16, 6, 0.4], [40, 40, 10, 8, -1.0]]), labels=torch.tensor([0, 1]),
                    size=(64, 64), embeds=torch.randn(2, 32, generator=g))]
    return torch.randn(1, 3, 64, 64, generator=g), torch.zeros(1, 64, 64, dtype=torch.bool), targets


def test_detreg_row_has_no_dn_alignment():
    losses = _pretrainer(enhance=False, embed_loss="l1", dn_align=False)(*_batch())
    assert "loss_embed" in losses and not any("dn_loss_embed" in k for k in losses)
    runs = dict(tables.sweep_runs("mutdet-table2", "tiny", dict(sam=[], mutdet=[], finetune=[], csia=[], weights=[])))
    assert "--no-dn-align" in runs["pre-detreg"] and "--no-dn-align" not in runs["pre-mutdet"]


# 4. one set of DN queries for both MutDet branches ---------------------------------------------

def test_both_branches_decode_the_same_denoising_queries(monkeypatch):
    model = _pretrainer()
    seen = []
    real = detection.make_denoising_queries

    def spy(*a, **k):
        out = real(*a, **k)
        seen.append(out)
        return out
    monkeypatch.setattr(detection, "make_denoising_queries", spy)
    decoded = []
    decode = model.head.decode

    def spy_decode(content, reference, angle, *a, **k):
        decoded.append((content, reference, a[-1] if a else k.get("attn_mask")))
        return decode(content, reference, angle, *a, **k)
    monkeypatch.setattr(model.head, "decode", spy_decode)
    model(*_batch())
    assert len(seen) == 1 and len(decoded) == 2
    n_dn = seen[0][0].shape[1]
    (c1, r1, m1), (c2, r2, m2) = decoded
    assert torch.equal(c1[:, :n_dn], c2[:, :n_dn]) and torch.equal(r1[:, :n_dn], r2[:, :n_dn]) and torch.equal(m1, m2)


# 5. initialisation as the official code ------------------------------------------------------

def test_initialisation_as_the_official_code():
    torch.manual_seed(0)
    head = detection.DETRHead(num_classes=3, dim=64, heads=4, enc_layers=1, dec_layers=3, ffn=64, num_queries=10)
    enc, dec = head.encoder[0].self_attn, head.decoder[0].cross_attn
    assert enc.sampling_offsets.weight.abs().sum() == 0 and enc.attention_weights.weight.abs().sum() == 0
    bound = math.sqrt(6 / (64 + dec.sampling_offsets.weight.shape[0]))  # Xavier-uniform
    w = dec.sampling_offsets.weight
    assert w.abs().max() <= bound and w.std() > bound / 3
    assert torch.equal(dec.sampling_offsets.bias, enc.sampling_offsets.bias)  # the grid init stays on the bias
    assert abs(float(head.label_embedding.weight.detach().std()) - 1) < 0.1  # nn.Embedding's N(0, 1)
    for branches in (head.cls_branches, head.angle_branches, head.reg_branches):
        first = branches[0].state_dict()
        assert all(torch.equal(first[k], b.state_dict()[k]) for b in branches[1:] for k in first)  # equal copies
    lin = head.angle_branches[0].weight  # PyTorch's Linear init: U(±1/√in)
    assert lin.abs().max() <= 1 / math.sqrt(64) and lin.abs().max() > 0.9 / math.sqrt(64)
    assert torch.all(head.cls_branches[0].bias == -math.log(99))
    neck = detection.ChannelMapper([16, 32], 32, num_outs=3, groups=8)
    assert all(m.bias is None for m in neck.modules() if isinstance(m, torch.nn.Conv2d))
    model = _pretrainer()
    q = model.enhancement.layers[0].self_attn.q_proj.weight
    assert q.abs().max() > 1 / math.sqrt(32)  # Xavier (√(6/64) ≈ 0.31), beyond Linear's 1/√32 ≈ 0.18
    assert model.patch_enc_output.weight.abs().max() > 1 / math.sqrt(32)


# 7. the matcher's L1 format and its own weights ------------------------------------------------

def test_matcher_l1_formats_and_weights():
    g = torch.Generator().manual_seed(0)
    logits, boxes = torch.randn(5, 2, generator=g), torch.rand(5, 4, generator=g) * 0.5 + 0.2
    tgt = dict(labels=torch.tensor([0, 1]), boxes=torch.rand(2, 4, generator=g) * 0.5 + 0.2)
    only_l1 = dict(cost_class=0.0, cost_bbox=1.0, cost_giou=0.0, cost_angle=0.0)
    ours = detection.HungarianMatcher(**only_l1).cost(logits, boxes, None, tgt)
    official = detection.HungarianMatcher(**only_l1, l1_format="official").cost(logits, boxes, None, tgt)
    torch.testing.assert_close(ours, torch.cdist(boxes, tgt["boxes"], p=1))
    torch.testing.assert_close(official, torch.cdist(ro.hbb_cxcywh_to_xyxy(boxes), tgt["boxes"], p=1))
    head = detection.DETRHead(num_classes=2, dim=32, heads=2, enc_layers=1, dec_layers=1, ffn=32, num_queries=4,
                              match_costs=(1.0, 3.0, 4.0, 0.5), match_l1="official")
    m = head.criterion.matcher
    assert (m.cost_class, m.cost_bbox, m.cost_giou, m.cost_angle, m.l1_format) == (1.0, 3.0, 4.0, 0.5, "official")
    assert head.criterion.weights == dict(cls=2.0, bbox=2.0, giou=5.0, angle=2.0)  # the loss keeps its own
    with pytest.raises(ValueError, match="l1_format"):
        detection.HungarianMatcher(l1_format="xyxy")


# 8, 9. official data reading ---------------------------------------------------------------------

def test_instruction_meta_opens_annotations_from_the_working_folder(tmp_path, monkeypatch):
    import json
    (tmp_path / "anns").mkdir()
    (tmp_path / "imgs").mkdir()
    row = {"image": "a.png", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ho"}]}
    (tmp_path / "anns" / "x.jsonl").write_text(json.dumps(row) + "\n")
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "meta.json").write_text(json.dumps({"s": dict(root="imgs", annotation="anns/x.jsonl")}))
    monkeypatch.chdir(tmp_path)  # the official loader: annotation as given, root only joins images
    rec = babelrs.read_instruction_meta(tmp_path / "meta" / "meta.json")
    assert rec[0]["image"] == babelrs.Path("imgs") / "a.png"


def test_conversation_system_turn_and_image_placeholders():
    tok = babelrs.build_tokenizer(["hi", "ho", "sys"] * 5, vocab_size=300)
    ids, _ = babelrs.build_conversation(tok, [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ho"}], 3)
    text = tok.decode(ids)
    assert "<img><IMG_CONTEXT><IMG_CONTEXT><IMG_CONTEXT></img>\nhi" in text and babelrs.SYSTEM_MESSAGE in text
    ids, _ = babelrs.build_conversation(tok, [{"from": "human", "value": "<image> a <image>"}, {"from": "gpt", "value": "ho"}], 2)
    text = tok.decode(ids)
    assert text.count("<IMG_CONTEXT>") == 2 and text.count("<image>") == 1  # one image a sample
    with pytest.raises(ValueError, match="no <image>"):
        babelrs.build_conversation(tok, [{"from": "system", "value": "sys"}, {"from": "human", "value": "hi"},
                                         {"from": "gpt", "value": "ho"}], 2)


def test_tiles_are_resized_as_pil():
    import numpy as np
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    image = (torch.rand(3, 90, 130, generator=g) * 255).round()
    ours = babelrs.resize_like_pil(image, (28, 40))
    pil = Image.fromarray(image.permute(1, 2, 0).byte().numpy()).resize((40, 28), Image.BICUBIC)
    ref = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float()
    assert (ours - ref).abs().mean() < 0.6 and (ours - ref).abs().max() <= 3
    plain = torch.nn.functional.interpolate(image[None], size=(28, 40), mode="bicubic", align_corners=False)[0]
    assert (plain - ref).abs().mean() > 2 * (ours - ref).abs().mean()  # without antialiasing: aliased


# 10, 11. presets ----------------------------------------------------------------------------------

def test_paper_csia_needs_weights_and_strict_init_names_tensors(tmp_path):
    with pytest.raises(SystemExit, match="--llm"):
        train.parse_config(["--stage", "csia", "--preset", "paper"])
    model = torch.nn.Linear(3, 2)
    from safetensors.torch import save_file
    save_file({"weight": torch.zeros(2, 4), "extra": torch.zeros(1)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match="weight.*extra|extra.*weight"):
        detection.load_init(model, str(tmp_path / "w.safetensors"), strict=True)
    detection.load_init(model, str(tmp_path / "w.safetensors"))  # non-strict: skips and lists


def test_ars_detr_dota_preset():
    dota, dior = train.FINETUNE_PRESETS["ars-detr-dota"], train.FINETUNE_PRESETS["paper"]
    assert (dota.image_size, dior.image_size) == (1024, 800) and dota.epochs == 36 and dota.lr == 1e-4


# 12. AR-CSL closed form -------------------------------------------------------------------------

def test_ar_csl_closed_form_equals_exact_iou():
    r = torch.cat([torch.tensor([1.0, 1.0 + 1e-4, 1.5, 2.0, 7.0, 30.0]), 1 + torch.rand(50) * 12]).double()
    torch.testing.assert_close(ro.ar_csl_window(r), ro.ar_csl_window_exact(r), rtol=0, atol=1e-9)
    square = ro.ar_csl_window(torch.ones(1, dtype=torch.float64))[0]
    assert float(square[0]) == pytest.approx(1.0, abs=1e-12) and square[90] == 1.0  # a square turned by -90° is itself


def test_paper_presets_follow_the_official_training_setup(tmp_path, capsys):
    """ARS-DETR 0d96c5e / MutDet: empty training images are left out (mmdet filter_empty_gt=True), the L1
    matching cost is the official one, and training starts from ImageNet's ResNet-50, never a random one."""
    assert all(train.FINETUNE_PRESETS[p].match_l1 == "official" for p in ("paper", "ars-detr-dota"))
    assert train.MUTDET_PRESETS["paper"].match_l1 == "official"
    for stage, preset in (("finetune", "paper"), ("finetune", "ars-detr-dota"), ("mutdet", "paper"), ("sam", "paper")):
        with pytest.raises(SystemExit, match="--resnet FILE"):
            train.parse_config(["--stage", stage, "--preset", preset])
    assert train.parse_config(["--preset", "paper", "--resnet", "r50.pth"])[1].resnet == "r50.pth"
    assert train.parse_config(["--preset", "paper", "--init", "runs/pre"])[1].init == "runs/pre"
    root = datasets.make_synthetic(tmp_path / "synth", n_train=4, n_test=1, size=64, max_objects=2)
    from PIL import Image
    Image.new("RGB", (64, 64)).save(root / "rgb" / "train" / "images" / "empty.png")
    (root / "rgb" / "train" / "labelTxt" / "empty.txt").write_text("")
    argv = ["--stage", "finetune", "--resnet", "", "--data", f"rgb:{root / 'rgb'}", "--image_size", "64",
            "--max-steps", "1", "--eval", "false"]
    assert train.main(argv + ["--out", str(tmp_path / "a")]) == 0
    assert "1 training images without objects left out" in capsys.readouterr().out
    assert train.main(argv + ["--out", str(tmp_path / "b"), "--no-filter-empty"]) == 0
    assert "without objects" not in capsys.readouterr().out
