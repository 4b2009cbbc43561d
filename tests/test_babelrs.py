"""BabelRS checked against its equations and the official conventions: the answer-only label mask,
α(t) and the LVSA mixture, the merge variants, InternViT parameter names, pixel shuffle, tiling,
layer-wise lr decay, a tiny CSIA model learning, and the csia stage end to end."""
import json
import math

import pytest
import torch

import babelrs
import datasets
import train

TEXTS = ["What is the category visible in the area? A tank.", "How many objects? There are 3 objects: 2 ships, 1 plane.",
         babelrs.SYSTEM_MESSAGE]


@pytest.fixture(scope="module")
def tokenizer():
    return babelrs.build_tokenizer(TEXTS * 20, vocab_size=300)


def test_label_mask_keeps_only_answers_and_im_end(tokenizer):
    conv = [dict(value="<image>\nWhat is the category visible in the area?", **{"from": "human"}),
            dict(value="A tank.", **{"from": "gpt"}),
            dict(value="How many objects?", **{"from": "human"}),
            dict(value="There are 3 objects: 2 ships, 1 plane.", **{"from": "gpt"})]
    ids, labels = babelrs.build_conversation(tokenizer, conv, num_image_tokens=5)
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\n" + babelrs.SYSTEM_MESSAGE + "<|im_end|>\n<|im_start|>user\n<img>")
    assert text.count("<IMG_CONTEXT>") == 5 and "</img>\nWhat is" in text
    supervised = labels != babelrs.IGNORE_INDEX
    assert torch.equal(labels[supervised], ids[supervised])
    # the supervised spans, read back: exactly the answers with their <|im_end|>
    spans, cur = [], []
    for t, s in zip(ids.tolist(), supervised.tolist()):
        if s:
            cur.append(t)
        elif cur:
            spans.append(tokenizer.decode(cur))
            cur = []
    assert spans == ["A tank.<|im_end|>", "There are 3 objects: 2 ships, 1 plane.<|im_end|>"]
    assert text.endswith("<|im_end|>\n") and not supervised[-1]  # the trailing newline has no loss
    with pytest.raises(ValueError, match="alternates"):
        babelrs.build_conversation(tokenizer, conv[:1], 5)


def test_alpha_and_lvsa_mixture_follow_the_equation():
    assert babelrs.lvsa_alpha(0, 6000) == 0 and babelrs.lvsa_alpha(3000, 6000) == 0.5
    assert babelrs.lvsa_alpha(9000, 6000) == 1 and babelrs.lvsa_alpha(5, 0) == 1
    g = torch.Generator().manual_seed(0)
    hidden = [torch.randn(2, 5, 3, generator=g) for _ in range(25)]
    layers = babelrs.OFFICIAL_LAYERS
    for alpha in (0.0, 0.3, 1.0):
        got = babelrs.merge_layers(hidden, layers, alpha)
        want = (1 - alpha) * hidden[23] + alpha * (hidden[2] + hidden[8] + hidden[17] + hidden[23]) / 4
        assert torch.allclose(got, want, atol=1e-6)
        # the official code's form: w_last = (1 - α) + α / N on F_L, α / N on the others
        official = hidden[23] * ((1 - alpha) + alpha / 4) + (hidden[2] + hidden[8] + hidden[17]) * (alpha / 4)
        assert torch.allclose(got, official, atol=1e-6)
    assert torch.equal(babelrs.merge_layers(hidden, layers, 0.0), hidden[23])


def test_pixel_shuffle_groups_2x2_neighbours():
    x = torch.randn(2, 4, 6, 3)  # (B, rows, cols, C)
    y = babelrs.pixel_shuffle(x)
    assert y.shape == (2, 2, 3, 12)
    for r in range(2):
        for c in range(3):
            want = torch.cat([x[:, 2 * r, 2 * c], x[:, 2 * r, 2 * c + 1], x[:, 2 * r + 1, 2 * c], x[:, 2 * r + 1, 2 * c + 1]], -1)
            assert torch.equal(y[:, r, c], want)


def internvit_keys(depth):
    """The parameter names of InternViT-300M (qk_normalization off), written out by hand."""
    keys = {"embeddings.class_embedding", "embeddings.patch_embedding.weight", "embeddings.patch_embedding.bias",
            "embeddings.position_embedding"}
    for i in range(depth):
        for part in ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                     "attn.proj.bias", "ls1", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                     "mlp.fc2.weight", "mlp.fc2.bias", "ls2"):
            keys.add(f"encoder.layers.{i}.{part}")
    return keys


def test_vit_has_internvit_names_and_loads_strictly(tmp_path):
    from safetensors.torch import save_file
    vit = babelrs.ViT(dim=32, depth=2, heads=4, patch=14, image_size=56)
    assert set(vit.state_dict()) == internvit_keys(2)
    src = babelrs.ViT(dim=32, depth=2, heads=4, patch=14, image_size=56)
    save_file({f"vision_model.{k}": v.contiguous() for k, v in src.state_dict().items()} | {"mlp1.0.weight": torch.ones(4)},
              str(tmp_path / "internvl.safetensors"))
    babelrs.load_vit_weights(vit, str(tmp_path / "internvl.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(vit.state_dict().values(), src.state_dict().values()))
    # BabelRS's detector: 14-px kernel -> 16 px, 4x4 position grid -> 5x5, both bicubic
    det = babelrs.ViT(dim=32, depth=2, heads=4, patch=16, image_size=80)
    babelrs.load_vit_weights(det, str(tmp_path / "internvl.safetensors"))
    assert det.embeddings.patch_embedding.weight.shape[-1] == 16
    assert torch.equal(det.embeddings.position_embedding[:, :1], src.embeddings.position_embedding[:, :1])
    hidden = det(torch.randn(1, 3, 96, 64))  # any size: positions resized to the 6 x 4 grid
    assert len(hidden) == 3 and hidden[0].shape == (1, 1 + 24, 32)
    with pytest.raises(ValueError, match="not an InternViT"):
        babelrs.load_vit_weights(babelrs.ViT(dim=48, depth=2, heads=4, patch=14, image_size=56),
                                 str(tmp_path / "internvl.safetensors"))


def test_hidden_states_are_embeddings_then_block_outputs():
    vit = babelrs.ViT(dim=16, depth=3, heads=2, patch=8, image_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    hidden = vit(x)
    assert torch.allclose(hidden[0], vit.embeddings(x))
    for k in range(3):
        assert torch.allclose(hidden[k + 1], vit.encoder.layers[k](hidden[k]))


def _tiny_csia(tokenizer, merge="lvsa", tau=10.0):
    torch.manual_seed(0)
    vit = babelrs.ViT(dim=32, depth=3, heads=4, patch=8, image_size=32)
    llm = babelrs.build_llm("", len(tokenizer), dim=32, layers=1, heads=2, kv_heads=1, ffn=64)
    return babelrs.CSIA(vit, llm, tokenizer.convert_tokens_to_ids(babelrs.IMG_CONTEXT), merge, (1, 2, 3), tau)


@pytest.mark.parametrize("merge", ["last", "concat", "sum", "per-layer", "lvsa"])
def test_each_merge_variant(tokenizer, merge):
    model = _tiny_csia(tokenizer, merge)
    tokens = model.visual_tokens(torch.randn(3, 3, 32, 32), step=5)
    assert tokens.shape == (3, 4, 32)  # (32/8)^2 = 16 patches -> 4 tokens after the 2x2 shuffle
    n_proj = 3 if merge == "per-layer" else 1
    assert 1 + len(model.extra_projectors) == n_proj
    assert model.mlp1[0].normalized_shape[0] == 4 * 32 * (3 if merge == "concat" else 1)


def test_tiny_csia_drives_the_alignment_loss_down(tokenizer):
    model = _tiny_csia(tokenizer)
    convs = [[dict(value="<image>\nWhat is the category visible in the area?", **{"from": "human"}),
              dict(value=a, **{"from": "gpt"})] for a in ("A tank.", "There are 3 objects: 2 ships, 1 plane.")]
    items = []
    for i, c in enumerate(convs * 2):
        ids, labels = babelrs.build_conversation(tokenizer, c, 4)
        items.append(dict(pixels=torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(i)),
                          input_ids=ids, labels=labels, modality="rgb"))
    batch = babelrs.collate_instructions(items, tokenizer.pad_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(60):
        out = model(batch["pixels"], batch["input_ids"], batch["attention_mask"], batch["labels"], step=step)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert out["alpha"] == 1.0 and losses[-1] < 0.2 * losses[0]
    assert model.vit.embeddings.patch_embedding.weight.grad.abs().sum() > 0  # the ViT trains too


def test_image_token_count_is_checked(tokenizer):
    model = _tiny_csia(tokenizer)
    ids, labels = babelrs.build_conversation(tokenizer, [dict(value="<image>\nq", **{"from": "human"}),
                                                         dict(value="a", **{"from": "gpt"})], 3)
    with pytest.raises(ValueError, match="IMG_CONTEXT"):
        model(torch.randn(1, 3, 32, 32), ids[None], torch.ones_like(ids)[None], labels[None])


def test_dynamic_tiles():
    assert babelrs.dynamic_tiles(torch.randn(3, 100, 200), 32).shape == (3, 3, 32, 32)  # 2 x 1 grid + thumbnail
    # a square image keeps one tile while it is small (area <= half of the 2x2 grid's), then takes 2 x 2
    assert babelrs.dynamic_tiles(torch.randn(3, 30, 30), 32).shape == (1, 3, 32, 32)
    assert babelrs.dynamic_tiles(torch.randn(3, 90, 90), 32).shape == (5, 3, 32, 32)
    assert babelrs.dynamic_tiles(torch.randn(3, 50, 300), 32, max_tiles=6).shape == (7, 3, 32, 32)


def test_instruction_meta_repeat_time(tmp_path):
    rows = [dict(image="a.png", conversations=[dict(value="<image>\nq", **{"from": "human"}),
                                               dict(value=str(i), **{"from": "gpt"})]) for i in range(10)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    meta = dict(half=dict(root=str(tmp_path), annotation="a.jsonl", repeat_time=0.5, modality="sar"),
                twice=dict(root=str(tmp_path), annotation="a.jsonl", repeat_time=2, modality="ir"))
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    recs = babelrs.read_instruction_meta(tmp_path / "meta.json")
    assert [r["conversations"][1]["value"] for r in recs if r["source"] == "half"] == ["0", "1", "2", "3", "4"]
    assert sum(r["source"] == "twice" for r in recs) == 20 and recs[-1]["modality"] == "ir"
    meta["half"]["repeat_time"] = 1.5
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(datasets.DatasetError, match="integer"):
        babelrs.read_instruction_meta(tmp_path / "meta.json")


def test_layer_decay_groups():
    model = babelrs.build_detector(sources=[dict(modality="rgb", classes=["a"], box_type="obb")],
                                   vit_args=dict(dim=32, depth=2, heads=4, patch=16, image_size=64), dim=32, heads=2,
                                   enc_layers=1, dec_layers=1, ffn=32, num_queries=5, gn_groups=8)
    groups = babelrs.layer_decay_groups(model, "backbone.vit.", 2, 0.9, 0.05)
    by_param = {id(p): g for g in groups for p in g["params"]}
    assert by_param[id(model.backbone.vit.embeddings.patch_embedding.weight)]["lr_mult"] == pytest.approx(0.9 ** 3)
    assert by_param[id(model.backbone.vit.encoder.layers[0].attn.qkv.weight)]["lr_mult"] == pytest.approx(0.9 ** 2)
    assert by_param[id(model.backbone.vit.encoder.layers[1].mlp.fc1.weight)]["lr_mult"] == pytest.approx(0.9)
    assert by_param[id(model.heads["rgb"].query_embed.weight)]["lr_mult"] == 1.0
    assert by_param[id(model.backbone.vit.encoder.layers[1].mlp.fc1.bias)]["weight_decay"] == 0.0
    assert by_param[id(model.backbone.vit.encoder.layers[1].ls1)]["weight_decay"] == 0.0
    assert by_param[id(model.heads["rgb"].query_embed.weight)]["weight_decay"] == 0.05
    feats = model.backbone(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape[-2:]) for f in feats] == [(8, 12), (4, 6), (2, 3), (1, 1)]  # strides 8-64 from patch 16


CSIA_SMALL = ["--stage", "csia", "--vit", "", "--image_size", "32", "--batch_size", "4", "--global_batch", "4", "--steps", "10", "--vocab_size", "400",
              "--llm_dim", "32", "--llm_layers", "1", "--llm_ffn", "64"]


def test_csia_stage_resumes_exactly_and_feeds_finetuning(tmp_path, capsys):
    synth = datasets.make_synthetic(tmp_path / "synth", n_train=4, n_test=2, size=64, max_objects=2)
    data = ["--synth_root", str(synth)]
    assert train.main(CSIA_SMALL + data + ["--max-steps", "4", "--out", str(tmp_path / "straight")]) == 0
    assert train.main(CSIA_SMALL + data + ["--max-steps", "2", "--out", str(tmp_path / "split")]) == 0
    assert train.main(["--resume", str(tmp_path / "split"), "--max-steps", "4"]) == 0
    read = [[json.loads(l) for l in (tmp_path / r / "log.jsonl").read_text().splitlines()] for r in ("straight", "split")]
    assert [r["step"] for r in read[1]] == [1, 2, 3, 4]
    for a, b in zip(*read):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["alpha"] == b["alpha"]
    assert read[0][0]["alpha"] == 0.0 and (tmp_path / "split" / "tokenizer" / "tokenizer.json").exists()
    # --init an InternVL-style folder: vision_model.* / mlp1.* / language_model.* tensors
    from safetensors.torch import load_file, save_file
    state = load_file(str(tmp_path / "split" / "model.safetensors"))
    (tmp_path / "internvl").mkdir()
    save_file({k.replace("vit.", "vision_model.", 1).replace("llm.", "language_model.", 1): v for k, v in state.items()},
              str(tmp_path / "internvl" / "model.safetensors"))
    capsys.readouterr()
    assert train.main(CSIA_SMALL + data + ["--max-steps", "1", "--init", str(tmp_path / "internvl"),
                                           "--out", str(tmp_path / "from_internvl")]) == 0
    assert f"loaded {len(state)} tensors; skipped 0 missing, 0 unexpected, 0 shape-mismatched" in capsys.readouterr().out
    # fine-tune the ViT of that run on two SynthSOI modalities
    capsys.readouterr()
    argv = ["--preset", "babelrs-tiny", "--synth_root", str(synth), "--synth_modalities", "sar", "rgb",
            "--source_ratio", "1", "1", "--loss_weights", "1", "1.5", "--image_size", "64", "--dim", "32", "--heads", "2",
            "--enc_layers", "1", "--dec_layers", "1", "--ffn", "32", "--num_queries", "10", "--num_dn_queries", "4",
            "--gn_groups", "8", "--max-steps", "1", "--init", str(tmp_path / "split"), "--out", str(tmp_path / "det")]
    assert train.main(argv) == 0
    assert "loaded the ViT" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "det" / "metrics.json").read_text())
    assert set(metrics["sources"]) == {"sar", "rgb"} and "h_map" in metrics


@pytest.mark.parametrize("family", ["clip", "dinov2"])
def test_tab3_baselines_load_from_transformers_and_match_its_hidden_states(tmp_path, family):
    """CLIP and DINOv2 vision towers built by `transformers` itself, saved, converted to InternViT
    names and loaded strictly: every hidden state equals the library's."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model
    torch.manual_seed(0)
    kw = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
    ref = (CLIPVisionModel(CLIPVisionConfig(**kw)) if family == "clip" else Dinov2Model(Dinov2Config(**kw))).eval()
    with torch.no_grad():  # non-trivial layer scales and biases
        for name, p in ref.named_parameters():
            if "lambda1" in name or name.endswith("bias"):
                p.normal_(0, 0.5)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "w.safetensors"))
    vit = babelrs.ViT(dim=32, depth=2, heads=4, patch=8, image_size=32, **babelrs.VIT_FAMILIES[family]).eval()
    babelrs.load_vit_weights(vit, str(tmp_path / "w.safetensors"), family=family)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = ref(pixel_values=x, output_hidden_states=True).hidden_states
        got = vit(x)
    assert len(got) == len(want) == 3
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


def test_two_processes_train_as_one_with_accumulation(tmp_path):
    """The global batch fixes the optimisation: 2 processes x 4 samples (no accumulation) and 1
    process x 4 samples x 2 micro-batches give the same losses and weights (tiny preset, gloo)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import torch
    from safetensors.torch import load_file
    root = Path(__file__).resolve().parents[1]
    synth = datasets.make_synthetic(tmp_path / "synth", n_train=4, n_test=2, size=64, max_objects=2)
    argv = CSIA_SMALL + ["--synth_root", str(synth), "--max-steps", "3", "--global_batch", "8"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29523",
           str(root / "train.py")] + argv + ["--out", str(tmp_path / "ddp")]
    res = subprocess.run(cmd, cwd=root, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-2000:]
    assert train.main(argv + ["--out", str(tmp_path / "accum")]) == 0
    logs = [[json.loads(l) for l in (tmp_path / r / "log.jsonl").read_text().splitlines()] for r in ("ddp", "accum")]
    assert [r["step"] for r in logs[0]] == [1, 2, 3] and all(math.isfinite(r["loss_align"]) for r in logs[0])
    for a, b in zip(*logs):
        assert a["loss_align"] == pytest.approx(b["loss_align"], rel=1e-4)
    w = [load_file(str(tmp_path / r / "model.safetensors")) for r in ("ddp", "accum")]
    for k in w[0]:
        torch.testing.assert_close(w[0][k], w[1][k], rtol=1e-4, atol=1e-5)
    with pytest.raises(SystemExit, match="not a multiple"):
        train.accumulation(global_batch=12, micro=8, world=1)


def test_truncation_never_splits_the_image(tokenizer):
    conv = [dict(value="<image>\nWhat is the category visible in the area?", **{"from": "human"}),
            dict(value="There are 3 objects: 2 ships, 1 plane.", **{"from": "gpt"})]
    full, _ = babelrs.build_conversation(tokenizer, conv, 20)
    ids, labels = babelrs.build_conversation(tokenizer, conv, 20, max_length=len(full) - 3)
    assert len(ids) == len(full) - 3 and (labels != babelrs.IGNORE_INDEX).any()  # the answer is cut, not the image
    ids, labels = babelrs.build_conversation(tokenizer, conv, 20, max_length=15)
    img = tokenizer.convert_tokens_to_ids(babelrs.IMG_CONTEXT)
    assert int((ids == img).sum()) == 20 and (labels == babelrs.IGNORE_INDEX).all()


def test_csia_continues_internvl_with_its_own_language_model(tmp_path, synthsoi):
    """As the official CSIA: `--init INTERNVL_FOLDER` alone gives the ViT, the projector, the language
    model built from the folder's own `llm_config` (its vocabulary) and its tokenizer, so every tensor
    loads; an LM of another vocabulary is a one-line error at the paper preset, not skipped embeddings."""
    import detection
    from safetensors.torch import save_file
    synth = synthsoi
    records = babelrs.read_instruction_meta(synth / "instructions" / "meta.json")
    folder = tmp_path / "InternVL-tiny"
    tok = babelrs.load_tokenizer(folder, records, "", 300)  # written to folder/tokenizer
    for f in (folder / "tokenizer").iterdir():
        f.rename(folder / f.name)
    torch.manual_seed(0)
    llm = babelrs.build_llm("", len(tok), 32, 1, 4, 2, 64)
    model = babelrs.CSIA(babelrs.ViT(64, 4, 4, 8, 32), llm, tok.convert_tokens_to_ids(babelrs.IMG_CONTEXT), "lvsa",
                         (1, 2, 3, 4), 10.0)
    names = {"vit.": "vision_model.", "llm.": "language_model."}
    state = {next((names[p] + k[len(p):] for p in names if k.startswith(p)), k): v.contiguous()
             for k, v in model.state_dict().items() if "lm_head" not in k}
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"llm_config": llm.config.to_dict()}))
    run = tmp_path / "run"
    assert train.main(["--stage", "csia", "--synth_root", str(synth), "--init", str(folder), "--image_size", "32",
                       "--max-steps", "1", "--out", str(run)]) == 0
    stored = json.loads((run / "llm" / "config.json").read_text())
    assert stored["vocab_size"] == len(tok) and (run / "tokenizer" / "tokenizer.json").read_text() == \
        (folder / "tokenizer.json").read_text()
    other = babelrs.CSIA(babelrs.ViT(64, 4, 4, 8, 32), babelrs.build_llm("", len(tok) + 50, 32, 1, 4, 2, 64), 5,
                         "lvsa", (1, 2, 3, 4), 10.0)
    with pytest.raises(ValueError, match="embed_tokens.weight"):
        detection.load_init(other, str(folder), {k.replace("language_model.", "llm.").replace("vision_model.", "vit."): v
                                                 for k, v in state.items()}, strict_shapes=True)


def test_babelrs_trains_and_scores_on_a_subset_of_the_modalities(tmp_path, capsys, synthsoi):
    """The babelrs presets on SAR + RGB only: each keeps its share of the 2 : 1 : 1 batch and its loss
    weight, a step keeps its micro-batches, H-mAP is over the two present, and the tables say so."""
    import json

    import tables
    synth = synthsoi  # every class in train and test
    run = tmp_path / "run"
    argv = ["--stage", "finetune", "--preset", "babelrs-tiny", "--init", "", "--image_size", "64", "--max-steps", "2",
            "--data", f"rgb:{synth / 'rgb'}", f"sar:{synth / 'sar'}", "--out", str(run)]
    assert train.main(argv) == 0
    out = capsys.readouterr().out
    assert "modalities rgb + sar of SAR, RGB, IR: ratio 1 : 2, loss weights [1.5, 1.0], global batch 3" in out
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["source_ratio"] == [1, 2] and cfg["global_batch"] == 3
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["sources"]) == {"rgb", "sar"} and "h_map" in metrics
    assert "[rgb + sar only: H-mAP over 2]" in tables.format_table_runs("babelrs-table3", [run])["markdown"]
    assert train.main(["--resume", str(run), "--max-steps", "3"]) == 0  # resumes as it started


def test_finetune_with_the_official_vit_adapter(tmp_path, synthsoi):
    """--vit_pyramid adapter (the babelrs preset's default): the detector reads ViT-Adapter's strides 8,
    16, 32 plus the neck's 64, trains, is rebuilt from model.json by eval.py, and the adapter's level
    embeddings decay with the patch embedding (official layer ids)."""
    import eval as ev
    synth = synthsoi  # every class in train and test
    run = tmp_path / "run"
    assert train.main(["--stage", "finetune", "--preset", "babelrs-tiny", "--init", "", "--image_size", "64", "--eval",
                       "false", "--max-steps", "1", "--data", f"rgb:{synth / 'rgb'}", "--vit_pyramid", "adapter", "--vit_patch", "16",
                       "--layer_decay", "0.9", "--out", str(run)]) == 0
    model, _ = ev.build_run_model(run)
    assert isinstance(model.backbone, babelrs.ViTAdapter) and model.backbone.strides == [8, 16, 32]
    assert [len(c) for c in (model.neck.convs, model.neck.extra)] == [3, 1]
    groups = babelrs.layer_decay_groups(model, "backbone.vit.", 4, 0.9, 0.05)
    level = next(g for g in groups if any(p is model.backbone.level_embed for p in g["params"]))
    assert level["lr_mult"] == pytest.approx(0.9 ** 5)
    with pytest.raises(ValueError, match="patch 16"):
        babelrs.ViTAdapter(babelrs.ViT(32, 2, 2, 8, 64, cls_token=False))


def test_shuffled_answers_control(tmp_path):
    """--shuffle_answers: the same images, prompts and answers, the answers dealt to other samples by a
    seeded permutation; the first losses differ from the real run's only through the pairing."""
    records = [dict(image=f"{i}.png", modality="rgb", conversations=[
        dict(**{"from": "human"}, value=f"<image>\nq{i}"), dict(**{"from": "gpt"}, value=f"a{i}")]) for i in range(20)]
    shuffled = babelrs.shuffle_answers(records, seed=3)
    answers = [r["conversations"][1]["value"] for r in shuffled]
    assert sorted(answers) == sorted(f"a{i}" for i in range(20)) and answers != [f"a{i}" for i in range(20)]
    assert [r["conversations"][0]["value"] for r in shuffled] == [f"<image>\nq{i}" for i in range(20)]
    assert [r["image"] for r in shuffled] == [r["image"] for r in records] and records[0]["conversations"][1]["value"] == "a0"
    assert babelrs.shuffle_answers(records, seed=3) == shuffled and babelrs.shuffle_answers(records, seed=4) != shuffled
    synth = datasets.make_synthetic(tmp_path / "synth", n_train=4, n_test=2, size=64, max_objects=2)
    data = ["--synth_root", str(synth), "--max-steps", "1"]
    assert train.main(CSIA_SMALL + data + ["--out", str(tmp_path / "real")]) == 0
    assert train.main(CSIA_SMALL + data + ["--shuffle_answers", "--out", str(tmp_path / "control")]) == 0
    real, control = (json.loads((tmp_path / r / "log.jsonl").read_text().splitlines()[0])["loss"] for r in ("real", "control"))
    assert real != control and json.loads((tmp_path / "control" / "config.json").read_text())["shuffle_answers"] is True
