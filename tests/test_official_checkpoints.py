"""Released mmrotate checkpoints (ARS-DETR, MutDet) load into our detector through the key map.

No released file is at hand here, so the checkpoints are built from the official names and shapes,
written below from the module definitions: httle/ARS-DETR 0d96c5e (`dn_ars_rotated_transformer.py`:
transformer, decoder with `ref_point_head`, the unused `angle_head` and `norm`; `ars_detr_head.py`,
`dn_ars_detr_head.py`: branches and `label_embedding`; the config's mmcv `BaseTransformerLayer` with
`attentions` / `ffns` (FFN `layers.0.0`, `layers.1`) / `norms`, `MultiheadAttention.attn`, mmdet's
`ChannelMapper` of `ConvModule`s (`conv`, `gn`, no bias) and ResNet, whose names are torchvision's)
and floatingstarZ/MutDet 097ce90 (`template_matching.py`: `feature_enhance` of SAM two-way blocks,
`patch_enc_*`; `DetReg_dn_ars_detr_headv7.py`: `feature_embed.layers`).
"""
import pytest
import torch
import torchvision

import babelrs
import detection
import mutdet

A = 180


def official_names(C=3, dim=32, ffn=64, heads=2, levels=4, points=2, enc=1, dec=2, queries=10, mutdet=0):
    """{official name: shape} of an mmrotate ARS-DETR R-18 (MutDet pre-training with `mutdet` two-way blocks)."""
    s = {f"backbone.{k}": tuple(v.shape) for k, v in torchvision.models.resnet18().state_dict().items()
         if not k.startswith("fc.")}
    for i, c in enumerate((128, 256, 512)):
        s[f"neck.convs.{i}.conv.weight"] = (dim, c, 1, 1)
        s[f"neck.convs.{i}.gn.weight"] = s[f"neck.convs.{i}.gn.bias"] = (dim,)
    s["neck.extra_convs.0.conv.weight"] = (dim, 512, 3, 3)
    s["neck.extra_convs.0.gn.weight"] = s["neck.extra_convs.0.gn.bias"] = (dim,)
    t = "bbox_head.transformer."

    def deform(prefix):
        s[prefix + "sampling_offsets.weight"], s[prefix + "sampling_offsets.bias"] = (heads * levels * points * 2, dim), (heads * levels * points * 2,)
        s[prefix + "attention_weights.weight"], s[prefix + "attention_weights.bias"] = (heads * levels * points, dim), (heads * levels * points,)
        for p in ("value_proj", "output_proj"):
            s[prefix + p + ".weight"], s[prefix + p + ".bias"] = (dim, dim), (dim,)

    def ffn_norms(prefix, norms):
        s[prefix + "ffns.0.layers.0.0.weight"], s[prefix + "ffns.0.layers.0.0.bias"] = (ffn, dim), (ffn,)
        s[prefix + "ffns.0.layers.1.weight"], s[prefix + "ffns.0.layers.1.bias"] = (dim, ffn), (dim,)
        for n in range(norms):
            s[prefix + f"norms.{n}.weight"] = s[prefix + f"norms.{n}.bias"] = (dim,)

    for i in range(enc):
        deform(f"{t}encoder.layers.{i}.attentions.0.")
        ffn_norms(f"{t}encoder.layers.{i}.", 2)
    for i in range(dec):
        a = f"{t}decoder.layers.{i}.attentions.0.attn."
        s[a + "in_proj_weight"], s[a + "in_proj_bias"] = (3 * dim, dim), (3 * dim,)
        s[a + "out_proj.weight"], s[a + "out_proj.bias"] = (dim, dim), (dim,)
        deform(f"{t}decoder.layers.{i}.attentions.1.")
        ffn_norms(f"{t}decoder.layers.{i}.", 3)
    for name, shape in (("ref_point_head.0", (dim, 2 * dim)), ("ref_point_head.2", (dim, dim)),
                        ("angle_head.0", (dim, dim)), ("angle_head.2", (dim, dim))):
        s[f"{t}decoder.{name}.weight"], s[f"{t}decoder.{name}.bias"] = shape, shape[:1]
    s[f"{t}decoder.norm.weight"] = s[f"{t}decoder.norm.bias"] = (dim,)
    s[t + "level_embeds"] = (5, dim)  # num_feature_levels=5 (dn_ars_rotated_transformer.py:88), whatever the neck gives
    s[t + "enc_output.weight"], s[t + "enc_output.bias"] = (dim, dim), (dim,)
    s[t + "enc_output_norm.weight"] = s[t + "enc_output_norm.bias"] = (dim,)
    s[t + "pos_trans.weight"], s[t + "pos_trans.bias"] = (2 * dim, 2 * dim), (2 * dim,)
    s[t + "pos_trans_norm.weight"] = s[t + "pos_trans_norm.bias"] = (2 * dim,)
    s[t + "query_embed.weight"] = (queries, dim)
    for i in range(dec + 1):
        s[f"bbox_head.cls_branches.{i}.weight"], s[f"bbox_head.cls_branches.{i}.bias"] = (C, dim), (C,)
        s[f"bbox_head.angle_branches.{i}.weight"], s[f"bbox_head.angle_branches.{i}.bias"] = (A, dim), (A,)
        for j, shape in ((0, (dim, dim)), (2, (dim, dim)), (4, (4, dim))):
            s[f"bbox_head.reg_branches.{i}.{j}.weight"], s[f"bbox_head.reg_branches.{i}.{j}.bias"] = shape, shape[:1]
    s["bbox_head.label_embedding.weight"] = (C, dim)
    for i in range(mutdet):
        b = f"{t}feature_enhance.layers.{i}."
        for att in ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token"):
            for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
                s[f"{b}{att}.{p}.weight"], s[f"{b}{att}.{p}.bias"] = (dim, dim), (dim,)
        for n in range(1, 5):
            s[f"{b}norm{n}.weight"] = s[f"{b}norm{n}.bias"] = (dim,)
        s[b + "mlp.lin1.weight"], s[b + "mlp.lin1.bias"] = (2048, dim), (2048,)
        s[b + "mlp.lin2.weight"], s[b + "mlp.lin2.bias"] = (dim, 2048), (dim,)
    if mutdet:
        s[t + "patch_enc_output.weight"], s[t + "patch_enc_output.bias"] = (dim, dim), (dim,)
        s[t + "patch_enc_output_norm.weight"] = s[t + "patch_enc_output_norm.bias"] = (dim,)
        s[t + "patch_enc_decode.0.weight"], s[t + "patch_enc_decode.0.bias"] = (1024, dim), (1024,)
        s[t + "patch_enc_decode.2.weight"], s[t + "patch_enc_decode.2.bias"] = (dim, 1024), (dim,)
        for j in range(2):
            s[f"bbox_head.feature_embed.layers.{j}.weight"], s[f"bbox_head.feature_embed.layers.{j}.bias"] = (dim, dim), (dim,)
    return s


def _checkpoint(path, names):
    g = torch.Generator().manual_seed(0)
    def value(name, shape):  # random, with BatchNorm statistics that a trained network could have
        last = name.split(".")[-1]
        if last == "num_batches_tracked":
            return torch.tensor(5)
        if last == "running_var":
            return torch.rand(shape, generator=g) + 0.5
        return torch.randn(shape, generator=g) * 0.1
    state = {k: value(k, shape) for k, shape in names.items()}
    torch.save({"state_dict": state, "meta": {"epoch": 36, "CLASSES": ("a", "b", "c")}}, path)
    return state


def _model(dec=2, classes=3, modalities=("rgb",)):
    return babelrs.build_detector(sources=[dict(modality=m, classes=[f"c{i}" for i in range(classes)], box_type="obb")
                                           for m in modalities], backbone="resnet18", frozen_bn=True, dim=32, heads=2,
                                  levels=4, points=2, enc_layers=1, dec_layers=dec, ffn=64, dropout=0.0,
                                  num_queries=10, num_dn_queries=4, gn_groups=8)


def test_ars_detr_checkpoint_loads_every_tensor_and_runs(tmp_path, capsys):
    official = _checkpoint(tmp_path / "ars.pth", official_names())
    model = _model(modalities=("rgb", "ir"))
    mutdet.load_official(model, str(tmp_path / "ars.pth"), detection.read_weights(str(tmp_path / "ars.pth")))
    out = capsys.readouterr().out
    assert "an mmrotate ARS-DETR checkpoint" in out and "0 start fresh" in out and "angle_head" in out
    head = model.heads["ir"]
    t = "bbox_head.transformer."
    assert torch.equal(head.encoder[0].ffn.net[3].weight, official[t + "encoder.layers.0.ffns.0.layers.1.weight"])
    assert torch.equal(head.decoder[1].norm3.bias, official[t + "decoder.layers.1.norms.2.bias"])
    assert torch.equal(head.decoder[0].cross_attn.sampling_offsets.weight,
                       official[t + "decoder.layers.0.attentions.1.sampling_offsets.weight"])
    assert torch.equal(head.decoder_norm.weight, official[t + "decoder.norm.weight"])
    assert torch.equal(model.neck.extra[0][1].weight, official["neck.extra_convs.0.gn.weight"])
    assert torch.equal(model.backbone.stem[1].running_var, official["backbone.bn1.running_var"])
    with torch.no_grad():
        dets = model.eval().predict(torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool), ["rgb"],
                                    [(64, 64)])
    assert dets[0]["boxes"].shape[1] == 5 and torch.isfinite(dets[0]["scores"]).all()


def test_a_missing_unknown_or_mismatched_tensor_is_an_error(tmp_path):
    names = official_names()
    del names["bbox_head.transformer.decoder.layers.1.norms.0.weight"]
    _checkpoint(tmp_path / "missing.pth", names)
    with pytest.raises(ValueError, match="missing heads.rgb.decoder.1.norm1.weight"):
        mutdet.load_official(_model(), "missing.pth", detection.read_weights(str(tmp_path / "missing.pth")))
    _checkpoint(tmp_path / "other.pth", dict(official_names(), **{"bbox_head.something_new.weight": (2, 2)}))
    with pytest.raises(ValueError, match="bbox_head.something_new.weight"):
        mutdet.load_official(_model(), "other.pth", detection.read_weights(str(tmp_path / "other.pth")))
    _checkpoint(tmp_path / "c5.pth", official_names(C=5))  # another label space
    with pytest.raises(ValueError, match=r"shape heads.rgb.cls_branches.0.weight: \(5, 32\)"):
        mutdet.load_official(_model(), "c5.pth", detection.read_weights(str(tmp_path / "c5.pth")))


def test_mutdet_pretraining_checkpoint_drops_its_modules_by_name(tmp_path, capsys):
    official = _checkpoint(tmp_path / "mutdet.pth", official_names(C=256, dec=2, mutdet=3))
    model = _model(dec=3, classes=3)  # 2/2 pre-training, 2/3 fine-tuning, a new label space
    mutdet.load_official(model, str(tmp_path / "mutdet.pth"), detection.read_weights(str(tmp_path / "mutdet.pth")))
    out = capsys.readouterr().out
    assert "MutDet / DETReg-row pre-training" in out
    assert "dropped: enhancement.layers.2.mlp.0.weight" in out and "dropped: feature_embed.2.weight" in out
    assert "start fresh: heads.rgb.cls_branches.0.weight" in out and "start fresh: heads.rgb.decoder.2.norm1.weight" in out
    # by name, the pre-training's encoder-proposal branch (index 2 of 2 layers) lands in decoder layer 3
    assert torch.equal(model.heads["rgb"].reg_branches[2][4].weight, official["bbox_head.reg_branches.2.4.weight"])


def test_a_released_checkpoint_scores_and_predicts_without_a_run_folder(tmp_path, capsys):
    """`eval.py --weights FILE --preset ars-detr-dota`: the architecture read off the official names and
    shapes, the preset's size and DOTA's class order; scored on a split beside the published 73.42, or
    used for prediction; a checkpoint of another class count is refused in one line."""
    import numpy as np
    from PIL import Image

    import datasets
    import eval as ev
    ckpt = tmp_path / "ars.pth"
    _checkpoint(ckpt, official_names(C=15, heads=8, points=1))
    model, sources = ev.build_weights_model(str(ckpt), "ars-detr-dota")
    head = model.heads["rgb"]
    assert (head.dim, len(head.encoder), len(head.decoder), head.num_queries) == (32, 1, 2, 10)
    assert sources[0]["classes"][0] == "plane" and sources[0]["image_size"] == 1024
    split = tmp_path / "dota" / "val"
    (split / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((96, 96, 3), np.uint8)).save(split / "images" / "p1.png")
    datasets.write_dota_txt(split / "labelTxt" / "p1.txt", np.array([[10, 10, 50, 10, 50, 30, 10, 30.0]]), ["ship"])
    capsys.readouterr()
    assert ev.main(["--weights", str(ckpt), "--preset", "ars-detr-dota", "--data", f"rgb:{tmp_path / 'dota'}"]) == 0
    assert "against 73.42" in capsys.readouterr().out
    out = tmp_path / "pred"
    assert ev.main(["--weights", str(ckpt), "--preset", "ars-detr-dota", "--predict", str(split / "images"),
                    "--out", str(out)]) == 0
    assert (out / "Task1_plane.txt").exists() and (out / "p1.png").exists()
    capsys.readouterr()
    assert ev.main(["--weights", str(ckpt), "--preset", "paper", "--predict", str(split / "images")]) == 2
    err = capsys.readouterr().err
    assert "15 classes, while --preset paper scores 20" in err and len(err.strip().splitlines()) == 1
