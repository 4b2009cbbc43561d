"""Record what the official code outputs on small random inputs, once, as test fixtures.

    pip install einops timm        # imports of the official InternViT file, not of this project
    python tests/record_official_fixtures.py --sm3det GIT --mutdet GIT --ars-detr GIT --mmcv GIT [--only PART...]

    # the detectors' state-dict names and shapes (part `state_dicts`): the official configs built by
    # mmcv 1.7.2, mmdet 2.x and mmrotate as the official training does (model code only, no compiled ops)
    pip install --target DEPS yapf==0.40.1 addict opencv-python-headless pandas terminaltables
    pip download mmdet==2.28.2 --no-deps && unzip mmdet-2.28.2-py3-none-any.whl 'mmdet/*' -d MMDET
    python tests/record_official_fixtures.py ... --only state_dicts --mmdet MMDET --deps DEPS

GIT is a clone (or a bare mirror) of zcablii/SM3Det, floatingstarZ/MutDet, httle/ARS-DETR or open-mmlab/mmcv. Each
official file is read with `git show COMMIT:PATH` at the commit below, and only pure-PyTorch
functions run: a class or function is taken from its file by name (the file's mmcv / mmdet imports
are not needed: registries and base classes are stubbed), or a whole file is imported when its
imports are plain (InternViT, SAM's two-way transformer). The outputs, the inputs and the weights
go to `tests/fixtures/official.safetensors` (the commits and files in its metadata);
`tests/test_official_parity.py` runs our code on the same inputs and compares. This script is not
part of the test suite: it needs the official repositories.
"""
import argparse
import ast
import importlib
import json
import math
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import babelrs  # noqa: E402  (the tiny tokenizer of the ChatML fixture)

COMMITS = {"sm3det": "b271f31", "mutdet": "097ce90", "ars-detr": "0d96c5e", "mmcv": "4c01b02"}  # mmcv: v1.7.2
FILES = {
    "internvit": ("sm3det", "BabelRS_pretrain/internvl/model/internvl_chat/modeling_intern_vit.py"),
    "internvit_config": ("sm3det", "BabelRS_pretrain/internvl/model/internvl_chat/configuration_intern_vit.py"),
    "internvl_chat": ("sm3det", "BabelRS_pretrain/internvl/model/internvl_chat/modeling_internvl_chat.py"),
    "dataset": ("sm3det", "BabelRS_pretrain/internvl/train/dataset.py"),
    "finetune": ("sm3det", "BabelRS_pretrain/internvl/train/internvl_chat_finetune.py"),
    "conversation": ("sm3det", "BabelRS_pretrain/internvl/conversation.py"),
    "constants": ("sm3det", "BabelRS_pretrain/internvl/train/constants.py"),
    "angle_coder": ("ars-detr", "mmrotate/core/bbox/coder/angle_coder.py"),
    "rotate_attn": ("ars-detr", "mmrotate/models/utils/multi_scale_rotate_deform_attn.py"),
    "denoising": ("ars-detr", "mmrotate/models/utils/query_denoising.py"),
    "two_way": ("mutdet", "AlignRotate/models/utils/transformer.py"),
    "two_way_common": ("mutdet", "AlignRotate/models/utils/common.py"),
    "template_matching": ("mutdet", "AlignRotate/models/utils/dn_ars_rotated_transformer_template_matching.py"),
    "adapter_modules": ("sm3det", "mmrotate/models/backbones/adapter_modules.py"),
    "vit_adapter": ("sm3det", "mmrotate/models/backbones/vit_adapter.py"),
    "sm3det_intern_vit": ("sm3det", "mmrotate/models/backbones/intern_vit.py"),
    "mmcv_msda": ("mmcv", "mmcv/ops/multi_scale_deform_attn.py"),
}

# ViT-Adapter shapes recorded: tiny (the tiny preset's width) and the paper's (InternViT-300M, 24 blocks)
ADAPTER_SHAPES = {"tiny": dict(dim=64, depth=4, heads=4, inplane=16, image=(96, 96)),
                  "paper": dict(dim=1024, depth=24, heads=16, inplane=64, image=(64, 64))}


class Registry:  # mmcv's `@X.register_module()` as a no-op
    def register_module(self, *a, **k):
        return lambda obj: obj


def read(repos: dict, key: str) -> str:
    repo, path = FILES[key]
    git = Path(repos[repo])
    gitdir = git / ".git" if (git / ".git").exists() else git
    return subprocess.run(["git", f"--git-dir={gitdir}", "show", f"{COMMITS[repo]}:{path}"], check=True,
                          capture_output=True, text=True).stdout


def take(source: str, names: list, namespace: dict) -> dict:
    """Execute the top-level classes / functions `names` of an official file in `namespace`
    (methods of a class are reached through the class)."""
    tree = ast.parse(source)
    nodes = [n for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name in names]
    missing = set(names) - {n.name for n in nodes}
    if missing:
        raise SystemExit(f"not found in the official file: {sorted(missing)}")
    exec(compile(ast.Module(body=nodes, type_ignores=[]), "<official>", "exec"), namespace)
    return namespace


def method(source: str, cls: str, name: str, namespace: dict):
    """One method of an official class, as a plain function of (self, ...)."""
    tree = ast.parse(source)
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == name:
                    exec(compile(ast.Module(body=[item], type_ignores=[]), "<official>", "exec"), namespace)
                    return namespace[name]
    raise SystemExit(f"{cls}.{name} not found in the official file")


def package(name: str, files: dict) -> types.ModuleType:
    """Official files written to a temporary package `name` and imported (files with plain imports)."""
    root = Path(tempfile.mkdtemp())
    pkg = root / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for module, text in files.items():
        (pkg / f"{module}.py").write_text(text)
    sys.path.insert(0, str(root))
    importlib.invalidate_caches()
    return importlib.import_module(name)


# ---------------------------------------------------------------------------------------------

def csl_coder_class(repos):
    """ARS-DETR's CSLCoder class, taken from its file (registry and base class stubbed)."""
    ns = dict(torch=torch, math=math, np=np, BaseBBoxCoder=object, ROTATED_BBOX_CODERS=Registry())
    return take(read(repos, "angle_coder"), ["CSLCoder"], ns)["CSLCoder"]


def internvit(repos, out):
    """InternViT forward (all hidden states, two input sizes) and `extract_feature` (LVSA, pixel
    shuffle, mlp1) at three steps of α(t)."""
    package("official_internvit", {"configuration_intern_vit": read(repos, "internvit_config"),
                                    "modeling_intern_vit": read(repos, "internvit")})
    cfg_mod = importlib.import_module("official_internvit.configuration_intern_vit")
    vit_mod = importlib.import_module("official_internvit.modeling_intern_vit")
    cfg = cfg_mod.InternVisionConfig(num_channels=3, patch_size=14, image_size=56, hidden_size=32,
                                     num_attention_heads=4, intermediate_size=128, num_hidden_layers=3,
                                     qkv_bias=True, norm_type="layer_norm", use_flash_attn=False, drop_path_rate=0.0,
                                     layer_norm_eps=1e-6, hidden_act="gelu", qk_normalization=False,
                                     initializer_factor=1.0)
    torch.manual_seed(0)
    vit = vit_mod.InternVisionModel(cfg).eval()
    with torch.no_grad():  # random, not the init values, so that every tensor matters
        for p in vit.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    for k, v in vit.state_dict().items():
        out[f"internvit.state.{k}"] = v.clone()
    for name, shape in (("square", (2, 3, 56, 56)), ("wide", (1, 3, 70, 84))):
        x = torch.randn(shape)
        with torch.no_grad():
            hidden = vit(pixel_values=x, output_hidden_states=True, return_dict=True).hidden_states
        out[f"internvit.{name}.pixels"] = x
        for i, h in enumerate(hidden):
            out[f"internvit.{name}.hidden.{i}"] = h.clone()

    src = read(repos, "internvl_chat")
    ns = dict(torch=torch, warnings=__import__("warnings"))
    extract, shuffle = method(src, "InternVLChatModel", "extract_feature", ns), method(src, "InternVLChatModel",
                                                                                       "pixel_shuffle", ns)
    mlp1 = nn.Sequential(nn.LayerNorm(4 * 32), nn.Linear(4 * 32, 24), nn.GELU(), nn.Linear(24, 24))
    for k, v in mlp1.state_dict().items():
        out[f"extract.mlp1.{k}"] = v.clone()
    x = out["internvit.square.pixels"]
    for step in (0, 4, 20):
        fake = types.SimpleNamespace(select_layer=[1, 2, 3], warmup_steps=10, step=step, vision_model=vit,
                                     downsample_ratio=0.5, ps_version="v2", mlp1=mlp1)
        fake.pixel_shuffle = types.MethodType(shuffle, fake)
        with torch.no_grad():
            out[f"extract.step{step}"] = extract(fake, x)


def chatml(repos, out, fixtures: Path):
    """`preprocess_internvl2_5` (and `multi_modal_get_item`'s `<image>\\n` prepend) on three
    conversations with a tiny tokenizer, stored beside the fixture."""
    texts = ["What is in the image?", "A ship and two planes.", "How many?", "Three.", "You are a tester.",
             "Describe <image> please.", "A harbor."] * 20 + [babelrs.SYSTEM_MESSAGE] * 20
    tok = babelrs.build_tokenizer(texts, vocab_size=400)
    tok.model_max_length = 4096
    tok.save_pretrained(str(fixtures / "chatml_tokenizer"))
    ns = dict(torch=torch, np=np, F=F, IGNORE_TOKEN_ID=-100, transformers=__import__("transformers"), Dict=dict)
    exec(read(repos, "constants"), ns)
    conv_ns = {}
    exec(read(repos, "conversation"), conv_ns)
    ns["get_conv_template"] = conv_ns["get_conv_template"]
    take(read(repos, "dataset"), ["preprocess_internvl2_5"], ns)
    samples = [
        [{"from": "human", "value": "<image>\nWhat is in the image?"}, {"from": "gpt", "value": "A ship and two planes."},
         {"from": "human", "value": "How many?"}, {"from": "gpt", "value": "Three."}],
        [{"from": "system", "value": "You are a tester."}, {"from": "human", "value": "<image>\nWhat is in the image?"},
         {"from": "gpt", "value": "A harbor."}],
        [{"from": "human", "value": "What is in the image?"}, {"from": "gpt", "value": "A harbor."}],
        [{"from": "human", "value": "<image>\nDescribe <image> please."}, {"from": "gpt", "value": "A harbor."}],
    ]
    for i, conv in enumerate(samples):
        conv = [dict(t) for t in conv]
        if "<image>" not in conv[0]["value"]:  # multi_modal_get_item, internvl_chat_finetune.py:453-454
            conv[0]["value"] = "<image>\n" + conv[0]["value"]
        ret = ns["preprocess_internvl2_5"]("internvl2_5", [conv], tok, [5], group_by_length=True)
        out[f"chatml.{i}.input_ids"] = ret["input_ids"][0]
        out[f"chatml.{i}.labels"] = ret["labels"][0]
    (fixtures / "chatml_conversations.json").write_text(json.dumps(samples, indent=1, ensure_ascii=False) + "\n")


def ar_csl(repos, out):
    """ARS-DETR's CSLCoder with the AR-CSL window (`window='aspect_ratio', normalize=True`)."""
    coder = csl_coder_class(repos)("le90", window="aspect_ratio", normalize=True)
    g = torch.Generator().manual_seed(1)
    theta = (torch.rand(64, 1, generator=g) - 0.5) * math.pi * 0.999
    ratio = torch.cat([torch.ones(4, 1), 1 + torch.rand(60, 1, generator=g) * 9])
    out["arcsl.theta"], out["arcsl.aspect"] = theta[:, 0], ratio[:, 0]
    out["arcsl.encoded"] = coder.encode(theta, ratio)
    logits = torch.randn(2, 16, 180, generator=g)
    out["arcsl.logits"], out["arcsl.decoded"] = logits, coder.decode(logits)


def sampling_locations(repos, out):
    """The rotated sampling points of ARS-DETR's deformable cross-attention (2-d and 4-d references)."""
    captured = {}

    def capture(value, shapes, locations, weights):
        captured["locations"], captured["weights"] = locations, weights
        return value.new_zeros(value.shape[0], locations.shape[1], value.shape[2] * value.shape[3])

    def constant_init(m, val, bias=0.0):
        nn.init.constant_(m.weight, val)
        nn.init.constant_(m.bias, bias)

    def xavier_init(m, distribution="uniform", bias=0.0):
        nn.init.xavier_uniform_(m.weight)
        nn.init.constant_(m.bias, bias)

    class BaseModule(nn.Module):
        def __init__(self, init_cfg=None):
            super().__init__()

    ns = dict(torch=torch, nn=nn, F=F, math=math, warnings=__import__("warnings"), Optional=__import__("typing").Optional,
              no_type_check=lambda f: f, deprecated_api_warning=lambda *a, **k: (lambda f: f), constant_init=constant_init,
              xavier_init=xavier_init, ATTENTION=Registry(), BaseModule=BaseModule,
              mmcv=types.SimpleNamespace(ConfigDict=dict),
              MultiScaleDeformableAttnFunction=None, multi_scale_deformable_attn_pytorch=capture)
    take(read(repos, "rotate_attn"), ["RotatedMultiScaleDeformableAttention"], ns)
    torch.manual_seed(2)
    attn = ns["RotatedMultiScaleDeformableAttention"](embed_dims=32, num_heads=4, num_levels=2, num_points=3,
                                                      batch_first=True)
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    for k, v in attn.state_dict().items():
        out[f"sampling.state.{k}"] = v.clone()
    shapes = torch.tensor([[4, 6], [2, 3]])
    value = torch.randn(2, 30, 32)
    query = torch.randn(2, 5, 32)
    angles = (torch.rand(2, 5, 1) - 0.5) * math.pi
    out["sampling.query"], out["sampling.value"], out["sampling.angles"] = query, value, angles[..., 0]
    for dim in (2, 4):
        ref = torch.rand(2, 5, 2, dim)
        with torch.no_grad():
            attn(query, value=value, reference_points=ref, reference_angles=angles, spatial_shapes=shapes,
                 level_start_index=torch.tensor([0, 24]))
        out[f"sampling.ref{dim}"] = ref
        out[f"sampling.ref{dim}.locations"] = captured["locations"].clone()
        out[f"sampling.ref{dim}.weights"] = captured["weights"].clone()


def denoising(repos, out):
    """ARS-DETR's DnQueryGenerator: groups, queries and attention mask, noise scales 0 (the noise
    is random; with it off, every slot is an exact, comparable function of the ground truth)."""
    def bbox_xyxy_to_cxcywh(b):
        x1, y1, x2, y2 = b.unbind(-1)
        return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], -1)

    ns = dict(torch=torch, bbox_xyxy_to_cxcywh=bbox_xyxy_to_cxcywh, CSLCoder=csl_coder_class(repos))
    take(read(repos, "denoising"), ["DnQueryGenerator", "inverse_sigmoid"], ns)
    gen = ns["DnQueryGenerator"](num_queries=7, hidden_dim=16, num_classes=5,
                                 noise_scale=dict(label=0.0, box=0.0, angle=0.0),
                                 group_cfg=dict(dynamic=True, num_groups=None, num_dn_queries=12))
    torch.manual_seed(3)
    label_embedding = nn.Embedding(5, 16)
    out["dn.label_embedding"] = label_embedding.weight.detach().clone()
    sizes = [(60, 80), (60, 80)]
    counts = [3, 2]
    gt_bboxes, gt_labels, metas = [], [], []
    for (h, w), n in zip(sizes, counts):  # pixels (cx, cy, w, h, θ) as mmrotate's gt_bboxes
        boxes = torch.cat([torch.rand(n, 2) * torch.tensor([w, h]), torch.rand(n, 2) * 20 + 5,
                           (torch.rand(n, 1) - 0.5) * math.pi], 1)
        gt_bboxes.append(boxes)
        gt_labels.append(torch.randint(0, 5, (n,)))
        metas.append(dict(img_shape=(h, w, 3)))
    for i, (b, l) in enumerate(zip(gt_bboxes, gt_labels)):
        out[f"dn.gt{i}.boxes"], out[f"dn.gt{i}.labels"] = b, l
    to, cuda = torch.Tensor.to, torch.Tensor.cuda  # the official generator moves tensors to "cuda": stay here
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.Tensor.to = lambda self, *a, **k: self if a == ("cuda",) else to(self, *a, **k)
    try:
        with torch.no_grad():
            result = gen(gt_bboxes, gt_labels, label_embedding, metas)
    finally:
        torch.Tensor.to, torch.Tensor.cuda = to, cuda
    names = ("query", "bbox", "mask", "meta")
    for name, value in zip(names, result):
        if isinstance(value, torch.Tensor):
            out[f"dn.{name}"] = value.clone()
        elif isinstance(value, dict):
            for k, v in value.items():
                out[f"dn.meta.{k}"] = torch.as_tensor(v)


def two_way(repos, out):
    """MutDet's enhancement layer: the SAM-derived `TwoWayAttentionBlock`."""
    package("official_twoway", {"common": read(repos, "two_way_common"), "transformer": read(repos, "two_way")})
    mod = importlib.import_module("official_twoway.transformer")
    torch.manual_seed(4)
    block = mod.TwoWayAttentionBlock(embedding_dim=32, num_heads=4, mlp_dim=64).eval()
    for k, v in block.state_dict().items():
        out[f"twoway.state.{k}"] = v.clone()
    objects, image = torch.randn(1, 6, 32), torch.randn(1, 20, 32)
    with torch.no_grad():
        o, f = block(objects, image)
    out["twoway.objects"], out["twoway.image"] = objects[0], image[0]
    out["twoway.objects_out"], out["twoway.image_out"] = o[0], f[0]


def topk_selection(repos, out):
    """MutDet's enhanced-branch query selection: the statements of the official loop over images
    (feature enhancement, Ẑ_enc, max-similarity × class-0 logit, top-k, boxes and angles of the
    chosen tokens), executed as written on a namespace of small random modules."""
    source = read(repos, "template_matching")
    tree = ast.parse(source)
    loop = next(n for n in ast.walk(tree) if isinstance(n, ast.For)
                and "patch_enc_outputs_max_sim" in ast.get_source_segment(source, n))
    body = next(f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and loop in f.body).body
    lists = [n for n in body[:body.index(loop)] if isinstance(n, ast.Assign)
             and getattr(n.targets[0], "id", "").startswith("all_")]
    code = compile(ast.Module(body=lists + [loop], type_ignores=[]), "<official>", "exec")
    package("official_twoway_topk", {"common": read(repos, "two_way_common"), "transformer": read(repos, "two_way")})
    two_way = importlib.import_module("official_twoway_topk.transformer")
    torch.manual_seed(5)
    D, C, S, K = 16, 3, 12, 5
    modules = dict(feature_enhance=two_way.TwoWayTransformer(depth=2, embedding_dim=D, num_heads=2, mlp_dim=2048),
                   patch_enc_decode=nn.Sequential(nn.Linear(D, 1024), nn.ReLU(), nn.Linear(1024, D)),
                   cls=nn.Linear(D, C), angle=nn.Linear(D, 180),
                   reg=nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Linear(D, D), nn.ReLU(), nn.Linear(D, 4)))
    for name, m in modules.items():
        m.eval()
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn_like(p) * 0.3)
        for k, v in m.state_dict().items():
            out[f"topk.{name}.{k}"] = v.clone()
    fake = types.SimpleNamespace(feature_enhance=modules["feature_enhance"],
                                 patch_enc_decode=modules["patch_enc_decode"],
                                 decoder=types.SimpleNamespace(num_layers=1), two_stage_num_proposals=K)
    patch_feats = [torch.randn(4, D), torch.randn(6, D)]
    memory, proposals = torch.randn(2, S, D), torch.randn(2, S, 4)
    ns = dict(torch=torch, self=fake, patch_feats=patch_feats, output_patch_memory=memory,
              output_proposals=proposals, cls_branches=[None, modules["cls"]], angle_braches=[None, modules["angle"]],
              reg_branches=[None, modules["reg"]],
              angle_coder=csl_coder_class(repos)("le90", window="aspect_ratio", normalize=True))
    with torch.no_grad():
        exec(code, ns)
    out["topk.objects.0"], out["topk.objects.1"] = patch_feats
    out["topk.memory"], out["topk.proposals"] = memory, proposals
    out["topk.coords"] = torch.cat(ns["all_patch_topk_coords_unact"])
    out["topk.angle"] = torch.cat(ns["all_patch_topk_angle"])


def seeded_weights(model: nn.Module, seed: int) -> None:
    """Deterministic, well-scaled values for every tensor of `model` (the fixtures store no weights:
    the test draws the same ones): matrices N(0, 1/fan_in), norm weights 1 + N(0, 0.1²), biases,
    layer scales and the injector's γ N(0, 0.1²), level embeddings N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.state_dict().items()):
            r = torch.randn(p.shape, generator=g)
            if p.dim() >= 2 and "level_embed" not in name and "position_embedding" not in name:
                p.copy_(r / math.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * r)
            elif "level_embed" in name or "position_embedding" in name:
                p.copy_(r)
            else:
                p.copy_(0.1 * r)


def official_msda_class(repos):
    """mmcv 1.7.2's MultiScaleDeformableAttention with its pure-PyTorch core (the CUDA path stubbed off)."""
    class BaseModule(nn.Module):
        def __init__(self, init_cfg=None):
            super().__init__()

    def constant_init(m, val, bias=0.0):
        nn.init.constant_(m.weight, val)
        nn.init.constant_(m.bias, bias)

    def xavier_init(m, gain=1, bias=0.0, distribution="normal"):
        nn.init.xavier_uniform_(m.weight, gain)
        nn.init.constant_(m.bias, bias)
    ns = dict(torch=torch, nn=nn, F=F, math=math, warnings=__import__("warnings"), Optional=__import__("typing").Optional,
              no_type_check=lambda f: f, deprecated_api_warning=lambda *a, **k: (lambda f: f), constant_init=constant_init,
              xavier_init=xavier_init, ATTENTION=Registry(), BaseModule=BaseModule, mmcv=types.SimpleNamespace(ConfigDict=dict),
              IS_CUDA_AVAILABLE=False, IS_MLU_AVAILABLE=False, MultiScaleDeformableAttnFunction=None)
    take(read(repos, "mmcv_msda"), ["multi_scale_deformable_attn_pytorch", "MultiScaleDeformableAttention"], ns)
    return ns["MultiScaleDeformableAttention"]


def vit_adapter(repos, out):
    """SM3Det's ViT-Adapter (InternViTAdapter.forward and adapter_modules.py with mmcv's attention) on
    random images, at the tiny and the paper shape: the four output maps, projected on 8 random
    directions (the weights are seeded, see `seeded_weights`; the ViT blocks are ours on both sides,
    their parity with InternViT's is the `internvit` fixture)."""
    import contextlib
    import functools
    ns = dict(torch=torch, nn=nn, F=F, math=math, partial=functools.partial, cp=torch.utils.checkpoint,
              autocast=lambda enabled=True: contextlib.nullcontext(), DropPath=None, MSDeformAttn=None,
              MultiScaleDeformableAttention=official_msda_class(repos),
              constant_=nn.init.constant_, xavier_uniform_=nn.init.xavier_uniform_)
    take(read(repos, "adapter_modules"), ["MMCVMSDeformAttn", "get_reference_points", "deform_inputs", "ConvFFN", "DWConv",
                                          "Extractor", "Injector", "InteractionBlock", "LayerNorm", "SpatialPriorModule"], ns)
    forward = method(read(repos, "vit_adapter"), "InternViTAdapter", "forward", dict(ns))
    add_level_embed = method(read(repos, "vit_adapter"), "InternViTAdapter", "_add_level_embed", dict(ns))
    forward_adapter = method(read(repos, "sm3det_intern_vit"), "InternVisionEmbeddings", "forward_adapter", dict(ns))
    for shape, a in ADAPTER_SHAPES.items():
        ours = babelrs.ViTAdapter(babelrs.ViT(a["dim"], a["depth"], a["heads"], 16, a["image"][0], cls_token=False),
                                  heads=a["heads"], conv_inplane=a["inplane"])
        seeded_weights(ours, 7)

        class Official(nn.Module):  # the modules of InternViTAdapter.__init__, built with its arguments
            def __init__(self):
                super().__init__()
                d, groups = a["dim"], babelrs.adapter_groups(a["depth"])
                self.interaction_indexes, self.out_indices, self.add_vit_feature = groups, (0, 1, 2, 3), True
                self.use_final_norm, self.only_feat_out, self.dtype = True, True, torch.float32
                self.level_embed = nn.Parameter(torch.zeros(3, d))
                self.spm = ns["SpatialPriorModule"](inplanes=a["inplane"], embed_dim=d, out_indices=(0, 1, 2, 3))
                self.interactions = nn.Sequential(*[
                    ns["InteractionBlock"](dim=d, num_heads=a["heads"], n_points=4, init_values=0.1, drop_path=0.0,
                                           norm_layer=nn.LayerNorm, with_cffn=True, cffn_ratio=0.25, deform_ratio=0.25,
                                           extra_extractor=i == len(groups) - 1, with_cp=False, mmcv_attn=True)
                    for i in range(len(groups))])
                self.up = nn.ConvTranspose2d(d, d, 2, 2)
                self.norm1, self.norm2, self.norm3, self.norm4 = (ns["LayerNorm"](d) for _ in range(4))

        official = Official()
        adapter_state = {k: v for k, v in ours.state_dict().items() if not k.startswith("vit.")}
        official.load_state_dict(adapter_state, strict=True)  # the official names are ours
        emb = types.SimpleNamespace(patch_embedding=ours.vit.embeddings.patch_embedding,
                                    position_embedding=ours.vit.embeddings.position_embedding)
        official.embeddings = types.SimpleNamespace(forward_adapter=lambda x: forward_adapter(emb, x))
        official.layers = [lambda x, H, W, blk=blk: blk(x) for blk in ours.vit.encoder.layers]
        official._add_level_embed = lambda c2, c3, c4: add_level_embed(official, c2, c3, c4)
        official.eval()
        g = torch.Generator().manual_seed(11)
        images = torch.randn(2, 3, *a["image"], generator=g)
        directions = torch.randn(a["dim"], 8, generator=g) / math.sqrt(a["dim"])
        with torch.no_grad():
            maps = forward(official, images)
        out[f"adapter.{shape}.images"] = images
        out[f"adapter.{shape}.directions"] = directions
        for i, m in enumerate(maps):
            out[f"adapter.{shape}.level{i}"] = torch.einsum("bchw,cd->bdhw", m, directions)


# ---------------------------------------------------------------------------------------------
# Released checkpoints: the official detectors built from their own configs, their every tensor's
# name and shape recorded (tests/fixtures/official_state_dicts.json; test_official_checkpoints.py
# builds its checkpoints from this record). A released .pth is this model's state_dict().
# ---------------------------------------------------------------------------------------------

DETECTORS = {  # name: (repository, config at its commit)
    # the released ARS-DETR R-50 of DOTA-v1.0 (73.42 AP50); its mmrotate runs on a pip mmdet 2.x
    "ars-detr-dota": ("ars-detr", "configs/ars_detr/dn_arw_arm_arcsl_rdetr_r50_dota.py"),
    # MutDet's pre-training on DOTA's SAM boxes and its fine-tuning on DIOR-R; MutDet ships its own mmdet
    "mutdet-pretrain-dota": ("mutdet", "configs/Step2_DetectionPretraining_Mutdet/MutDet_DOTA_Pretrain.py"),
    "mutdet-finetune-dior": ("mutdet", "configs/Step3_Finetuning/ars_detr_DIOR_MutDet.py"),
}


def build_official_detector(config: str, paths: list, mmcv_version: str) -> dict:
    """{name: shape} of every tensor of the official detector of `config` (run in a child process:
    the two repositories' mmdet / mmrotate packages share names). mmcv's compiled ops (`mmcv._ext`)
    and the rotation-equivariant `e2cnn` are imported by the packages but not used to build the
    model: both are stubbed. ARS-DETR's import check wants mmcv <= 1.5.0; the module names it
    builds are the same in 1.7.2."""
    from unittest import mock
    sys.path[:0] = paths
    ext = types.ModuleType("mmcv._ext")
    ext.__file__ = "<no compiled ops>"
    ext.__getattr__ = lambda name: (_ for _ in ()).throw(AttributeError(name)) if name.startswith("__") else (lambda *a, **k: None)
    sys.modules["mmcv._ext"] = ext
    for name in ("e2cnn", "e2cnn.nn", "e2cnn.gspaces"):
        sys.modules[name] = mock.MagicMock(__path__=[], __spec__=None)
    import mmcv
    mmcv.__version__ = mmcv_version
    from mmcv import Config
    from mmrotate.models import build_detector
    cfg = Config.fromfile(config)
    cfg.model.backbone.init_cfg = None  # the ImageNet weights are not fetched: names and shapes only
    model = build_detector(cfg.model)
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def state_dicts(repos, fixtures: Path, mmdet: str, deps: str):
    """Every tensor name and shape of the official detectors (DETECTORS), with where they came from."""
    root = Path(tempfile.mkdtemp())
    for repo in ("ars-detr", "mutdet", "mmcv"):
        git = Path(repos[repo])
        gitdir = git / ".git" if (git / ".git").exists() else git
        (root / repo).mkdir()
        archive = subprocess.run(["git", f"--git-dir={gitdir}", "archive", COMMITS[repo]], check=True, capture_output=True).stdout
        subprocess.run(["tar", "x", "-C", str(root / repo)], input=archive, check=True)
    record = {}
    for name, (repo, config) in DETECTORS.items():
        paths = [str(root / repo), str(root / "mmcv"), deps] + ([mmdet] if repo == "ars-detr" else [])
        version = "1.5.0" if repo == "ars-detr" else "1.7.2"
        child = subprocess.run([sys.executable, __file__, "--build-detector", config, "--paths", *paths,
                                "--mmcv-version", version], cwd=root / repo, capture_output=True, text=True)
        if child.returncode:
            raise SystemExit(f"{name}: building the official detector failed:\n{child.stderr[-3000:]}")
        tensors = json.loads(child.stdout.strip().splitlines()[-1])
        record[name] = dict(repository=repo, commit=COMMITS[repo], config=config, tensors=tensors)
        print(f"{name}: {len(tensors)} tensors ({repo} {COMMITS[repo]}, {config})")
    mmdet_version = "own copy (097ce90)" if not mmdet else (Path(mmdet) / "mmdet" / "version.py").read_text().split("'")[1]
    meta = dict(mmcv=f"v1.7.2 ({COMMITS['mmcv']})", mmdet_for_ars_detr=mmdet_version, torch=torch.__version__,
                recorded_by="tests/record_official_fixtures.py --only state_dicts")
    import re
    text = json.dumps(dict(meta=meta, detectors=record), indent=1)
    text = re.sub(r"\[\s*([\d,\s]*?)\s*\]", lambda m: "[" + ", ".join(m.group(1).split()).replace(",,", ",") + "]", text)
    (fixtures / "official_state_dicts.json").write_text(text + "\n")  # a tensor a line


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sm3det", required=True)
    p.add_argument("--mutdet", required=True)
    p.add_argument("--ars-detr", required=True)
    p.add_argument("--mmcv", required=True, help="open-mmlab/mmcv (its v1.7.2 deformable attention)")
    p.add_argument("--only", nargs="+", help="record these parts only, keeping the others of the existing file")
    p.add_argument("--out", default=str(HERE / "fixtures"))
    p.add_argument("--mmdet", default="", help="state_dicts: a folder holding mmdet 2.x (ARS-DETR's)")
    p.add_argument("--deps", default="", help="state_dicts: a folder of mmcv's pure-Python dependencies (pip --target)")
    if "--build-detector" in sys.argv:  # the child process of `state_dicts`
        c = argparse.ArgumentParser()
        c.add_argument("--build-detector")
        c.add_argument("--paths", nargs="+")
        c.add_argument("--mmcv-version")
        a = c.parse_args()
        print(json.dumps(build_official_detector(a.build_detector, a.paths, a.mmcv_version)))
        return
    args = p.parse_args()
    repos = {"sm3det": args.sm3det, "mutdet": args.mutdet, "ars-detr": args.ars_detr, "mmcv": args.mmcv}
    fixtures = Path(args.out)
    fixtures.mkdir(exist_ok=True)
    out = {}
    parts = dict(internvit=lambda: internvit(repos, out), chatml=lambda: chatml(repos, out, fixtures),
                 ar_csl=lambda: ar_csl(repos, out), sampling_locations=lambda: sampling_locations(repos, out),
                 denoising=lambda: denoising(repos, out), two_way=lambda: two_way(repos, out),
                 topk_selection=lambda: topk_selection(repos, out), vit_adapter=lambda: vit_adapter(repos, out),
                 state_dicts=lambda: state_dicts(repos, fixtures, args.mmdet, args.deps))
    if args.only:
        from safetensors.torch import load_file
        out.update(load_file(str(fixtures / "official.safetensors")))
    for name, record in parts.items():
        if not args.only or name in args.only:
            record()
    if args.only == ["state_dicts"]:  # a JSON of its own; the tensors file stays as it is
        return
    from safetensors.torch import save_file
    meta = {"commits": json.dumps(COMMITS), "files": json.dumps(FILES), "torch": torch.__version__}
    save_file({k: v.detach().contiguous() for k, v in out.items()}, str(fixtures / "official.safetensors"), meta)
    print(f"{len(out)} tensors -> {fixtures / 'official.safetensors'}")


if __name__ == "__main__":
    main()
