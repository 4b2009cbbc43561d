"""Our parts against the official code's own outputs on the same inputs.

The fixtures were recorded once by `tests/record_official_fixtures.py`, which runs the official
functions (SM3Det b271f31, ARS-DETR 0d96c5e, MutDet 097ce90, mmcv v1.7.2; the files are in the
fixture's metadata) on small random inputs and weights.
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import babelrs
import detection
import mutdet
import rotated_ops as ro

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="module")
def official():
    return load_file(str(FIXTURES / "official.safetensors"))


def prefixed(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def test_fixture_names_its_sources():
    with safe_open(str(FIXTURES / "official.safetensors"), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["commits"]) == {"sm3det": "b271f31", "mutdet": "097ce90", "ars-detr": "0d96c5e", "mmcv": "4c01b02"}
    assert "modeling_intern_vit.py" in json.loads(meta["files"])["internvit"][1]


def official_vit(official):
    vit = babelrs.ViT(dim=32, depth=3, heads=4, patch=14, image_size=56).eval()
    vit.load_state_dict(prefixed(official, "internvit.state."), strict=True)
    return vit


@pytest.mark.parametrize("size", ["square", "wide"])
def test_internvit_hidden_states(official, size):
    vit = official_vit(official)
    with torch.no_grad():
        ours = vit(official[f"internvit.{size}.pixels"])
    for i, h in enumerate(ours):
        torch.testing.assert_close(h, official[f"internvit.{size}.hidden.{i}"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("step", [0, 4, 20])
def test_extract_feature_lvsa_pixel_shuffle_mlp1(official, step):
    llm = babelrs.build_llm("", vocab_size=16, dim=24, layers=1, heads=2, kv_heads=1, ffn=32)
    model = babelrs.CSIA(official_vit(official), llm, img_context_id=0, merge="lvsa", layers=(1, 2, 3), tau=10).eval()
    model.mlp1.load_state_dict(prefixed(official, "extract.mlp1."))
    with torch.no_grad():
        ours = model.visual_tokens(official["internvit.square.pixels"], step)
    torch.testing.assert_close(ours, official[f"extract.step{step}"], rtol=1e-5, atol=1e-5)


def test_chatml_tokens_and_labels(official):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(FIXTURES / "chatml_tokenizer"), local_files_only=True)
    conversations = json.loads((FIXTURES / "chatml_conversations.json").read_text())
    for i, conv in enumerate(conversations):  # two rounds; a system turn; no <image>; two <image>
        ids, labels = babelrs.build_conversation(tok, conv, num_image_tokens=5)
        assert ids.tolist() == official[f"chatml.{i}.input_ids"].tolist(), i
        assert labels.tolist() == official[f"chatml.{i}.labels"].tolist(), i


def test_ar_csl_coder(official):
    ours = ro.csl_encode(official["arcsl.theta"], official["arcsl.aspect"])
    torch.testing.assert_close(ours, official["arcsl.encoded"], rtol=0, atol=2e-5)
    decoded = ro.csl_decode(official["arcsl.logits"])
    torch.testing.assert_close(ro.norm_angle(decoded), ro.norm_angle(official["arcsl.decoded"].float()))


@pytest.mark.parametrize("dim", [2, 4])
def test_rotated_sampling_locations(official, dim):
    attn = detection.MSDeformAttn(dim=32, heads=4, levels=2, points=3, dropout=0.0)
    attn.load_state_dict(prefixed(official, "sampling.state."))
    query, angles = official["sampling.query"], official["sampling.angles"]
    B, Q, _ = query.shape
    offsets = attn.sampling_offsets(query).view(B, Q, 4, 2, 3, 2)
    with torch.no_grad():
        ours = attn.sampling_locations(offsets, official[f"sampling.ref{dim}"], [(4, 6), (2, 3)], angles)
    torch.testing.assert_close(ours, official[f"sampling.ref{dim}.locations"], rtol=1e-5, atol=1e-5)


def test_denoising_queries_and_mask(official):
    label_embedding = torch.nn.Embedding(5, 16)
    label_embedding.weight.data.copy_(official["dn.label_embedding"])
    factor = torch.tensor([80.0, 60.0, 80.0, 60.0])
    targets = [dict(boxes=official[f"dn.gt{i}.boxes"][:, :4] / factor, angles=official[f"dn.gt{i}.boxes"][:, 4],
                    labels=official[f"dn.gt{i}.labels"]) for i in range(2)]
    with torch.no_grad():
        content, reference, angle, blocked, meta = detection.make_denoising_queries(
            targets, label_embedding, num_classes=5, num_dn_queries=12, label_noise=0.0, box_noise=0.0,
            angle_noise=0.0)
    assert (meta["groups"], 2 * meta["groups"] * meta["pad"]) == (int(official["dn.meta.num_dn_group"]),
                                                                   int(official["dn.meta.pad_size"]))
    torch.testing.assert_close(content, official["dn.query"])
    torch.testing.assert_close(reference, official["dn.bbox"][..., :4], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(angle, official["dn.bbox"][..., 4])
    assert torch.equal(detection.denoising_attention_mask(blocked, num_queries=7), official["dn.mask"])


def two_way_names(state: dict) -> dict:
    """SAM's TwoWayAttentionBlock names (MutDet `transformer.py`) -> ours."""
    names = {"cross_attn_token_to_image.": "token_to_image.", "cross_attn_image_to_token.": "image_to_token.",
             "mlp.lin1.": "mlp.0.", "mlp.lin2.": "mlp.2."}
    out = {}
    for k, v in state.items():
        for old, new in names.items():
            k = k.replace(old, new)
        out[k] = v
    return out


def test_two_way_block(official):
    block = mutdet.TwoWayBlock(dim=32, heads=4, mlp=64).eval()
    block.load_state_dict(two_way_names(prefixed(official, "twoway.state.")), strict=True)
    with torch.no_grad():
        objects, image = block(official["twoway.objects"], official["twoway.image"])
    torch.testing.assert_close(objects, official["twoway.objects_out"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(image, official["twoway.image_out"], rtol=1e-5, atol=1e-5)


def test_mutdet_topk_selection(official, monkeypatch):
    D, K = 16, 5
    head = detection.DETRHead(num_classes=3, dim=D, heads=2, levels=1, points=1, enc_layers=0, dec_layers=1, ffn=16,
                              num_queries=K)
    head.cls_branches[1].load_state_dict(prefixed(official, "topk.cls."))
    head.reg_branches[1].load_state_dict(prefixed(official, "topk.reg."))
    head.angle_branches[1].load_state_dict(prefixed(official, "topk.angle."))
    enhance = mutdet.MutualEnhancement(dim=D, heads=2, mlp=2048, depth=2).eval()
    enhance.load_state_dict(two_way_names(prefixed(official, "topk.feature_enhance.")), strict=True)
    decode = torch.nn.Sequential(torch.nn.Linear(D, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, D))
    decode.load_state_dict(prefixed(official, "topk.patch_enc_decode."))
    memory, proposals = official["topk.memory"], official["topk.proposals"]
    monkeypatch.setattr(head, "proposals", lambda m, mask, shapes: (m, proposals))  # the official anchors
    with torch.no_grad():
        pairs = [enhance(official[f"topk.objects.{i}"], memory[i]) for i in range(2)]
        objects = [o for o, _ in pairs]
        image = torch.stack([f for _, f in pairs])  # (B, S, D)
        z_enc = torch.nn.functional.normalize(decode(image), dim=-1)
        sel = head.select_queries(memory, torch.zeros(2, 12, dtype=torch.bool), [(3, 4)], tokens=image,
                                  scores=mutdet.enhanced_scores(z_enc, objects))
    torch.testing.assert_close(sel["reference"], official["topk.coords"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ro.norm_angle(sel["angle"]), ro.norm_angle(official["topk.angle"].float()))


@pytest.mark.parametrize("shape", ["tiny", "paper"])
def test_vit_adapter_matches_sm3det(official, shape):
    """ViT-Adapter (SM3Det's InternViTAdapter with mmcv's deformable attention): hidden states in, the
    four levels out, at the tiny preset's width and at InternViT-300M's (24 blocks, groups
    [[0, 2], [3, 8], [9, 17], [18, 23]]), to float32 rounding. The official modules loaded our state
    dict by name (strict), so an adapter trained there loads here."""
    from record_official_fixtures import ADAPTER_SHAPES, seeded_weights
    a = ADAPTER_SHAPES[shape]
    with torch.device("meta"):  # every value is drawn below: skip the 300M-parameter initialisation
        ours = babelrs.ViTAdapter(babelrs.ViT(a["dim"], a["depth"], a["heads"], 16, a["image"][0], cls_token=False),
                                  heads=a["heads"], conv_inplane=a["inplane"])
    ours = ours.to_empty(device="cpu").eval()
    seeded_weights(ours, 7)
    assert ours.interaction_indexes == ([[0, 2], [3, 8], [9, 17], [18, 23]] if shape == "paper" else [[0, 0], [1, 1], [2, 2], [3, 3]])
    with torch.no_grad():
        maps = ours(official[f"adapter.{shape}.images"])
    directions = official[f"adapter.{shape}.directions"]
    assert [tuple(m.shape[-2:]) for m in maps] == [(a["image"][0] // s, a["image"][1] // s) for s in (4, 8, 16, 32)]
    for i, m in enumerate(maps):
        want = official[f"adapter.{shape}.level{i}"]
        got = torch.einsum("bchw,cd->bdhw", m, directions)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max())), (shape, i, float((got - want).abs().max()))
