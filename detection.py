"""Rotated DETR: ARS-DETR, the DINO-style two-stage rotated Deformable DETR both papers fine-tune.

Zeng et al., "ARS-DETR: Aspect Ratio Sensitive Oriented Object Detection with Transformer",
arXiv 2303.04989, as configured by MutDet (`configs/Step3_Finetuning/base_ars_detr.py`); DINO
(Zhang et al., arXiv 2203.03605) for query selection and contrastive denoising; Deformable DETR
(Zhu et al., arXiv 2010.04159) for the attention.

Paper / official code -> this file
    ResNet-50 C3-C5, frozen stem + stage 1, frozen BN         ResNetBackbone
    ChannelMapper (1x1 conv + GN, extra 3x3/2 on C5)            ChannelMapper
    sine positional encoding + level embeddings                sine_position_encoding, DETRHead
    multi-scale deformable attention (Deformable DETR Eq. 3)    MSDeformAttn, ms_deform_attn_core
    rotated deformable cross-attention (ARS-DETR Sec. 3.3)      MSDeformAttn(reference_angle=...)
    encoder (6 layers, post-norm)                               EncoderLayer
    two-stage query selection, top-k by class-0 logit (DINO)    DETRHead.select_queries
    decoder, look-forward-twice box refinement                  DecoderLayer, DETRHead.decode
    AR-CSL angle classification, re-predicted every layer       angle_branches + rotated_ops.csl_*
    contrastive denoising (DINO Sec. 3.3; label 0.5, box 0.4, angle 0.02)   make_denoising_queries
    Hungarian matching, costs focal 2 / L1 2 / GIoU 5 / angle BCE 2·2r/(r+1)  HungarianMatcher
    losses on every decoder layer, encoder proposals and DN     SetCriterion
    inference: top-k over (query, class), no NMS               DETRHead.postprocess
    one head set per modality on a shared backbone (BabelRS Sec. 3.3)   RotatedDETR

Differences from the official code
    - The L1 matching cost compares predicted and ground-truth (cx, cy, w, h); the official
      `BBoxL1Cost(box_format='xywh')` compares predicted (x1, y1, x2, y2) with ground-truth
      (cx, cy, w, h), a format mix-up (MutDet notes §1). `match_l1="official"` reproduces it.
    - Boxes are scaled back to pixels by the image's width *and* height; the official head scales
      by the width only, which assumes square inputs.
    - Deformable attention is pure PyTorch (`grid_sample`), always in float32, as mmcv's CPU path.
    - The DN attention mask keeps denoising groups apart and hides them from the matching queries,
      which is what the official mask intends (its loop also works for one group).
    - `box_type="hbb"` is our horizontal-box mode for SAR / COCO data (BabelRS uses a GFL head
      there): no angle branch, GIoU and L1 on the axis-aligned box, reference angle 0.

Shape letters: B images, S memory tokens (all levels), L levels, Q queries (denoising + matching),
M ground-truth objects, C classes or channels, D model width, P sampling points, A angle bins.
Boxes inside the model are (cx, cy, w, h) normalised by the image's own width and height (padding
excluded) plus a le90 angle θ in radians; `postprocess` returns le90 boxes in pixels.

May import: rotated_ops (DESIGN.md).
"""
import copy
import math
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

import rotated_ops as ro

A = ro.ANGLE_BINS  # 180 angle classes, one per degree (ARS-DETR)
FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0  # sigmoid focal loss and cost (mmdet defaults, ARS-DETR config)


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------

def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class MLP(nn.Sequential):
    """Linear-ReLU-...-Linear with `num_layers` Linear layers."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_layers: int):
        dims = [in_dim] + [hidden] * (num_layers - 1)
        layers = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        super().__init__(*layers, nn.Linear(dims[-1], out_dim))


def _clones(module: nn.Module, n: int) -> nn.ModuleList:
    """n deep copies of one freshly initialised module: equal weights, separate parameters."""
    return nn.ModuleList(copy.deepcopy(module) for _ in range(n))


def sine_position_encoding(mask: torch.Tensor, num_feats: int, temperature: float = 10000.0,
                           offset: float = -0.5) -> torch.Tensor:
    """DETR's normalised sine encoding of pixel positions (mmdet `SinePositionalEncoding(normalize=True,
    offset=-0.5)`): (B, H, W) padding mask -> (B, 2·num_feats, H, W), y features then x features."""
    not_mask = (~mask).float()
    y = not_mask.cumsum(1)
    x = not_mask.cumsum(2)
    y = (y + offset) / (y[:, -1:, :] + 1e-6) * (2 * math.pi)  # positions in (0, 2π) over the valid area
    x = (x + offset) / (x[:, :, -1:] + 1e-6) * (2 * math.pi)
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=mask.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_feats)
    px = x[..., None] / dim_t  # (B, H, W, F)
    py = y[..., None] / dim_t
    px = torch.stack([px[..., 0::2].sin(), px[..., 1::2].cos()], dim=4).flatten(3)
    py = torch.stack([py[..., 0::2].sin(), py[..., 1::2].cos()], dim=4).flatten(3)
    return torch.cat([py, px], dim=3).permute(0, 3, 1, 2)  # (B, 2F, H, W)


def sine_embed_boxes(boxes: torch.Tensor, num_feats: int, temperature: float = 10000.0) -> torch.Tensor:
    """Sine embedding of normalised (cx, cy, w, h): (B, Q, 4) -> (B, Q, 4·num_feats), ordered y, x, w, h
    as DINO's `gen_sineembed_for_position`."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=boxes.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_feats)
    parts = []
    for k in (1, 0, 2, 3):
        p = boxes[..., k, None] * (2 * math.pi) / dim_t  # (B, Q, F)
        parts.append(torch.stack([p[..., 0::2].sin(), p[..., 1::2].cos()], dim=-1).flatten(-2))
    return torch.cat(parts, dim=-1)


def _mean_over_ranks(x: float, device) -> torch.Tensor:
    """Average a number over DDP ranks (mmdet `reduce_mean`), clamped to >= 1: loss normaliser. A
    0-d tensor on `device`, so that a GPU step does not wait for the host here."""
    t = torch.tensor(float(x), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
        t = t / dist.get_world_size()
    return t.clamp(min=1.0)


# ---------------------------------------------------------------------------------------------
# Backbone and neck
# ---------------------------------------------------------------------------------------------

class FrozenBatchNorm(nn.Module):
    """BatchNorm with frozen statistics and affine parameters (mmcv `norm_eval=True,
    requires_grad=False`): torchvision's FrozenBatchNorm2d buffers (weight, bias, running_mean,
    running_var, so its state dicts load), computed by one native eval-mode batch_norm instead of
    two elementwise passes, which matters on the large early feature maps."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(name, torch.full((num_features,), value))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)  # a trainable BatchNorm's counter
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class ResNetBackbone(nn.Module):
    """torchvision ResNet returning C3, C4, C5 (strides 8, 16, 32), MutDet's `out_indices=(1, 2, 3)`.

    `frozen_stages=1`: the stem and the first stage get no gradient; `frozen_bn`: BatchNorm is
    replaced by FrozenBatchNorm (ARS-DETR `norm_eval=True, requires_grad=False`).
    Weights load from a local file (`weights`: a torchvision state dict, .pth or .safetensors);
    without one the network is randomly initialised.
    """

    def __init__(self, depth: Literal["resnet50", "resnet18"] = "resnet50", weights: str = "",
                 frozen_bn: bool = True, frozen_stages: int = 1):
        super().__init__()
        import torchvision
        if depth not in ("resnet50", "resnet18"):
            raise ValueError(f"unknown backbone {depth!r}; choose resnet50 or resnet18")
        net = getattr(torchvision.models, depth)(weights=None, norm_layer=FrozenBatchNorm if frozen_bn else None)
        if weights:
            state = load_state_file(weights)
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            try:
                missing, unexpected = net.load_state_dict(state, strict=False)
            except RuntimeError as e:  # shape mismatches
                raise ValueError(f"{weights}: not a torchvision {depth} state dict ({str(e).splitlines()[1].strip()})") from None
            missing = [k for k in missing if not k.startswith("fc.")]
            if missing or unexpected:
                raise ValueError(f"{weights}: not a torchvision {depth} state dict "
                                 f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        for module in [self.stem, self.layer1][:frozen_stages + 1]:
            for p in module.parameters():
                p.requires_grad_(False)
        c = 512 if depth == "resnet50" else 128
        self.out_channels = [c, 2 * c, 4 * c]
        self.strides = [8, 16, 32]

    def forward(self, images: torch.Tensor) -> list:
        x = self.layer1(self.stem(images))  # (B, C2, H/4, W/4)
        c3 = self.layer2(x)  # (B, C3, H/8, W/8)
        c4 = self.layer3(c3)  # (B, C4, H/16, W/16)
        c5 = self.layer4(c4)  # (B, C5, H/32, W/32)
        return [c3, c4, c5]


def load_state_file(path: str) -> dict:
    """A state dict from a .safetensors file or a torch file (loaded with weights_only=True); a
    checkpoint that wraps it under 'state_dict' or 'model' is unwrapped."""
    if str(path).endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except SafetensorError as e:
            raise ValueError(f"{path}: not a readable .safetensors file ({e})") from None
    import pickle
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as e:  # objects beyond tensors and plain types in the file
        raise ValueError(f"{path}: cannot be read with weights_only=True ({str(e).splitlines()[0][:120]}); save its "
                         "state_dict alone (torch.save(ckpt['state_dict'], ...)) or as .safetensors") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def read_weights(path: str) -> dict:
    """All tensors of a run folder / folder of .safetensors files, or of one weight file."""
    p = Path(path)
    files = sorted(p.glob("*.safetensors")) if p.is_dir() else [p]
    if not files or not files[0].exists():
        raise FileNotFoundError(f"{path}: no checkpoint (.safetensors weights) found")
    state = {}
    for f in files:
        state.update(load_state_file(str(f)))
    return state


def load_init(model, path: str, state: dict = None, strict: bool = False, strict_shapes: bool = False) -> None:
    """Load any checkpoint of this project (a run folder or a weight file) and print what was
    skipped: parameters missing from the file, unexpected ones, and shape mismatches (e.g. a
    256-way pseudo-class head from MutDet pre-training). With `strict` (`--init_strict`) any of
    them is an error naming the tensors, and nothing is loaded; with `strict_shapes` a tensor of
    the file that the model holds in another shape is (the paper presets: nothing silently random)."""
    state = read_weights(path) if state is None else state
    own = model.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if strict_shapes and mismatched:
        more = f" (and {len(mismatched) - 3} more)" if len(mismatched) > 3 else ""
        raise ValueError(f"--init {path}: {len(mismatched)} tensors have another shape here, which a paper preset "
                         "does not skip: " + "; ".join(f"{k} {tuple(state[k].shape)} in the file, "
                                                       f"{tuple(own[k].shape)} here" for k in mismatched[:3]) + more)
    if strict:
        problems = ([f"missing {k}" for k in own if k not in state] + [f"unexpected {k}" for k in state if k not in own]
                    + [f"shape {k}: {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} here" for k in mismatched])
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise ValueError(f"--init {path} --init_strict: {len(problems)} tensors do not match: "
                             + "; ".join(problems[:5]) + more)
    state = {k: v for k, v in state.items() if k not in mismatched}
    missing, unexpected = model.load_state_dict(state, strict=False)
    print(f"--init {path}: loaded {len(state) - len(unexpected)} tensors; skipped "
          f"{len(missing)} missing, {len(unexpected)} unexpected, {len(mismatched)} shape-mismatched")
    for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        for k in keys:
            print(f"  {name}: {k}")


class ChannelMapper(nn.Module):
    """mmdet ChannelMapper: a 1x1 conv + GroupNorm per input level to D channels, and extra levels
    from a 3x3 stride-2 conv + GN, the first on the last *input* map (C5), as the official neck."""

    def __init__(self, in_channels: list, dim: int, num_outs: int = 4, groups: int = 32):
        super().__init__()
        # no conv bias: GroupNorm follows and would remove it (mmcv ConvModule(bias="auto"))
        self.convs = nn.ModuleList(nn.Sequential(nn.Conv2d(c, dim, 1, bias=False), nn.GroupNorm(groups, dim))
                                   for c in in_channels)
        extra_in = [in_channels[-1]] + [dim] * (num_outs - len(in_channels) - 1)
        self.extra = nn.ModuleList(nn.Sequential(nn.Conv2d(c, dim, 3, stride=2, padding=1, bias=False),
                                                 nn.GroupNorm(groups, dim))
                                   for c in extra_in[:num_outs - len(in_channels)])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)

    def forward(self, feats: list) -> list:
        outs = [conv(f) for conv, f in zip(self.convs, feats)]  # each (B, D, H_l, W_l)
        x = feats[-1]
        for conv in self.extra:
            x = conv(x)
            outs.append(x)
        return outs


# ---------------------------------------------------------------------------------------------
# Official checkpoints: mmrotate (ARS-DETR, MutDet) parameter names -> ours
# ---------------------------------------------------------------------------------------------

# (pattern, replacement) over the official names, from the module definitions of ARS-DETR 0d96c5e
# (`dn_ars_rotated_transformer.py`, `dn_ars_detr_head.py`, `ars_detr_head.py`) with mmcv's
# BaseTransformerLayer (`attentions`, `ffns`, `norms`), FFN (`layers.0.0`, `layers.1`),
# MultiheadAttention (`attn`) and ConvModule (`conv`, `gn`), and mmdet's ResNet (torchvision names).
# "H." stands for the head set; `mmrotate_to_ours` puts it under each modality.
MMROTATE_NAMES = [
    (r"^backbone\.conv1\.", "backbone.stem.0."),
    (r"^backbone\.bn1\.", "backbone.stem.1."),
    (r"^backbone\.(layer[1-4]\..*)$", r"backbone.\1"),
    (r"^neck\.convs\.(\d+)\.conv\.", r"neck.convs.\1.0."),
    (r"^neck\.convs\.(\d+)\.gn\.", r"neck.convs.\1.1."),
    (r"^neck\.extra_convs\.(\d+)\.conv\.", r"neck.extra.\1.0."),
    (r"^neck\.extra_convs\.(\d+)\.gn\.", r"neck.extra.\1.1."),
    (r"^bbox_head\.transformer\.encoder\.layers\.(\d+)\.attentions\.0\.", r"H.encoder.\1.self_attn."),
    (r"^bbox_head\.transformer\.decoder\.layers\.(\d+)\.attentions\.0\.attn\.", r"H.decoder.\1.self_attn."),
    (r"^bbox_head\.transformer\.decoder\.layers\.(\d+)\.attentions\.1\.", r"H.decoder.\1.cross_attn."),
    (r"^bbox_head\.transformer\.(en|de)coder\.layers\.(\d+)\.norms\.(\d)\.",
     lambda m: f"H.{m[1]}coder.{m[2]}.norm{int(m[3]) + 1}."),
    (r"^bbox_head\.transformer\.(en|de)coder\.layers\.(\d+)\.ffns\.0\.layers\.0\.0\.", r"H.\1coder.\2.ffn.net.0."),
    (r"^bbox_head\.transformer\.(en|de)coder\.layers\.(\d+)\.ffns\.0\.layers\.1\.", r"H.\1coder.\2.ffn.net.3."),
    (r"^bbox_head\.transformer\.decoder\.ref_point_head\.", "H.ref_point_head."),
    (r"^bbox_head\.transformer\.decoder\.norm\.", "H.decoder_norm."),
    (r"^bbox_head\.transformer\.level_embeds$", "H.level_embed"),
    (r"^bbox_head\.transformer\.(enc_output|enc_output_norm|query_embed)\.", r"H.\1."),
    (r"^bbox_head\.(cls_branches|reg_branches|angle_branches|label_embedding)\.", r"H.\1."),
    # MutDet pre-training (`template_matching.py`, `DetReg_dn_ars_detr_headv7.py`)
    (r"^bbox_head\.transformer\.feature_enhance\.layers\.(\d+)\.cross_attn_token_to_image\.",
     r"enhancement.layers.\1.token_to_image."),
    (r"^bbox_head\.transformer\.feature_enhance\.layers\.(\d+)\.cross_attn_image_to_token\.",
     r"enhancement.layers.\1.image_to_token."),
    (r"^bbox_head\.transformer\.feature_enhance\.layers\.(\d+)\.mlp\.lin1\.", r"enhancement.layers.\1.mlp.0."),
    (r"^bbox_head\.transformer\.feature_enhance\.layers\.(\d+)\.mlp\.lin2\.", r"enhancement.layers.\1.mlp.2."),
    (r"^bbox_head\.transformer\.feature_enhance\.layers\.(\d+)\.(self_attn|norm\d)\.", r"enhancement.layers.\1.\2."),
    (r"^bbox_head\.transformer\.(patch_enc_output|patch_enc_output_norm)\.", r"\1."),
    (r"^bbox_head\.transformer\.patch_enc_decode\.", "patch_enc_decode."),
    (r"^bbox_head\.feature_embed\.layers\.(\d)\.", lambda m: f"feature_embed.{2 * int(m[1])}."),
]
# official parameters the official forward never uses
MMROTATE_UNUSED = (r"^bbox_head\.transformer\.pos_trans(_norm)?\.",  # Deformable DETR two-stage leftovers
                   r"^bbox_head\.transformer\.decoder\.angle_head\.",  # built in _init_layers, never called
                   r"\.num_batches_tracked$")  # BatchNorm's counter (frozen BN has none)


def is_mmrotate_state(state: dict) -> bool:
    return any(k.startswith("bbox_head.") for k in state)


def mmrotate_to_ours(state: dict) -> tuple:
    """An mmrotate checkpoint's state dict (ARS-DETR fine-tuned, or MutDet / DETReg-row pre-training)
    in our names: (state with the head set under "H.", MutDet's modules under their pre-trainer
    names; the unused official tensors dropped, listed). A name the map does not know is an
    error naming it: nothing is skipped silently."""
    import re
    out, unused = {}, []
    for key, value in state.items():
        if any(re.search(p, key) for p in MMROTATE_UNUSED):
            unused.append(key)
            continue
        for pattern, replacement in MMROTATE_NAMES:
            new, n = re.subn(pattern, replacement, key)
            if n:
                out[new] = value
                break
        else:
            raise ValueError(f"official tensor {key} {tuple(value.shape)} has no counterpart here")
    return out, unused


# ---------------------------------------------------------------------------------------------
# Multi-scale deformable attention (Deformable DETR Eq. 3), with ARS-DETR's rotated offsets
# ---------------------------------------------------------------------------------------------

def ms_deform_attn_core(value: torch.Tensor, shapes: list, locations: torch.Tensor,
                        weights: torch.Tensor) -> torch.Tensor:
    """Σ_l Σ_p A_lqp · V_l(φ_l(p̂_q) + Δp_lqp), bilinear sampling by `grid_sample`.

    Args:
        value: (B, S, H, Dh) projected values of all levels, levels concatenated.
        shapes: [(H_l, W_l)] per level.
        locations: (B, Q, H, L, P, 2) sampling points, (x, y) normalised to [0, 1] per level.
        weights: (B, Q, H, L, P) attention weights (softmax over L·P).
    Returns:
        (B, Q, H·Dh).
    """
    B, S, nh, dh = value.shape
    _, Q, _, L, P, _ = locations.shape
    values = value.split([h * w for h, w in shapes], dim=1)
    # one copy into level-major layouts, so each level's grid and weights are contiguous; the points
    # before the queries, so that the weighted sum (and its backward) runs along Q, not along P = 4
    grids = (2 * locations - 1).permute(3, 0, 2, 4, 1, 5).reshape(L, B * nh, P, Q, 2)  # grid_sample wants [-1, 1]
    a = weights.permute(3, 0, 2, 4, 1).reshape(L, B * nh, 1, P, Q)
    out = 0
    for l, (h, w) in enumerate(shapes):  # level by level: no (B·H, Dh, L·P, Q) stack of every sample
        v = values[l].flatten(2).transpose(1, 2).reshape(B * nh, dh, h, w)  # (B·H, Dh, H_l, W_l)
        sampled = F.grid_sample(v, grids[l], mode="bilinear", padding_mode="zeros", align_corners=False)  # (B·H, Dh, P, Q)
        out = out + (sampled * a[l]).sum(2)  # (B·H, Dh, Q)
    return out.view(B, nh * dh, Q).transpose(1, 2)  # (B, Q, H·Dh)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention; with `reference_angle`, ARS-DETR's rotated version.

    The sampling offsets of a query are turned by the angle of its reference box (clockwise on
    screen, le90), so the points follow an oriented object:
        2-d reference: p = ref_xy + (Δ @ R(θ)) / (W_l, H_l)
        4-d reference: p = ref_xy + (Δ / P · ref_wh / 2) @ R(θ),  R(θ) = [[cos θ, sin θ], [-sin θ, cos θ]]
    (row vectors: the local offset (u, v) maps to u·(cos θ, sin θ) + v·(-sin θ, cos θ)).
    Residual and dropout are inside, as mmcv's module.
    """

    def __init__(self, dim: int = 256, heads: int = 8, levels: int = 4, points: int = 4, dropout: float = 0.1):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} not divisible by heads {heads}")
        self.heads, self.levels, self.points = heads, levels, points
        self.sampling_offsets = nn.Linear(dim, heads * levels * points * 2)
        self.attention_weights = nn.Linear(dim, heads * levels * points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self):
        # Deformable DETR init: head h starts with points along direction 2πh/H at radii 1..P
        nn.init.zeros_(self.sampling_offsets.weight)
        t = torch.arange(self.heads, dtype=torch.float32) * (2 * math.pi / self.heads)
        grid = torch.stack([t.cos(), t.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True).values
        grid = grid.view(self.heads, 1, 1, 2).repeat(1, self.levels, self.points, 1)
        grid *= torch.arange(1, self.points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def sampling_locations(self, offsets, reference, shapes, reference_angle=None):
        """(B, Q, H, L, P, 2) raw offsets -> (B, Q, H, L, P, 2) sampling points in [0, 1] per level.
        Offsets are scaled (by the level size, or by the reference box's w, h) in the box's own frame
        first and then turned by its angle, so a sampling grid follows the oriented box."""
        ref = reference[:, :, None, :, None]  # (B, Q, 1, L, 1, 2|4)
        if reference.shape[-1] == 2:
            local = offsets
        elif reference.shape[-1] == 4:
            local = offsets / self.points * ref[..., 2:] * 0.5
        else:
            raise ValueError(f"reference must end in 2 or 4 values, got {tuple(reference.shape)}")
        if reference_angle is not None:
            c, s = reference_angle.cos(), reference_angle.sin()
            R = torch.stack([torch.stack([c, s], -1), torch.stack([-s, c], -1)], -2)  # (B, Q, 2, 2)
            local = local @ R[:, :, None, None]  # (B, Q, H, L, P, 2) turned by θ
        if reference.shape[-1] == 2:
            normalizer = torch.tensor([[w, h] for h, w in shapes], dtype=offsets.dtype, device=offsets.device)
            return ref + local / normalizer[None, None, None, :, None]
        return ref[..., :2] + local

    def sampling(self, query, reference, shapes, reference_angle=None):
        """Where each query looks and how much: attention weights (B, Q, H, L, P), softmax over a head's
        L x P points, and sampling locations (B, Q, H, L, P, 2) in [0, 1] per level (eval.py --attention
        draws them). `query` includes its positional embedding."""
        B, Q, _ = query.shape
        H, L, P = self.heads, self.levels, self.points
        weights = self.attention_weights(query).view(B, Q, H, L * P).softmax(-1).view(B, Q, H, L, P)
        offsets = self.sampling_offsets(query).view(B, Q, H, L, P, 2)
        return weights, self.sampling_locations(offsets, reference, shapes, reference_angle)

    def forward(self, query, query_pos, value, value_mask, reference, shapes, reference_angle=None, identity=None):
        """
        Args:
            query: (B, Q, D); query_pos: (B, Q, D) or None; value: (B, S, D);
            value_mask: (B, S) True at padding; reference: (B, Q, L, 2) points or (B, Q, L, 4) boxes,
            normalised per level; shapes: [(H_l, W_l)]; reference_angle: (B, Q) radians or None;
            identity: what the output is added to (default the query, as mmcv's `identity`).
        Returns:
            (B, Q, D): identity + dropout(attention output).
        """
        identity = query if identity is None else identity
        if query_pos is not None:
            query = query + query_pos
        B, Q, _ = query.shape
        v = self.value_proj(value).masked_fill(value_mask[..., None], 0.0)
        v = v.view(B, v.shape[1], self.heads, -1)  # (B, S, H, Dh)
        weights, locations = self.sampling(query, reference, shapes, reference_angle)
        dt = torch.float64 if v.dtype == torch.float64 else torch.float32  # half precision samples in float32
        with torch.autocast(device_type=query.device.type, enabled=False):
            out = ms_deform_attn_core(v.to(dt), shapes, locations.to(dt), weights.to(dt))
        return identity + self.dropout(self.output_proj(out.to(query.dtype)))


# ---------------------------------------------------------------------------------------------
# Encoder and decoder layers (post-norm, as mmcv's operation order)
# ---------------------------------------------------------------------------------------------

class FFN(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, dim),
                                 nn.Dropout(dropout))

    def forward(self, x):
        return x + self.net(x)


class EncoderLayer(nn.Module):
    """self deformable attention -> norm -> FFN -> norm."""

    def __init__(self, dim, heads, levels, points, ffn, dropout):
        super().__init__()
        self.self_attn = MSDeformAttn(dim, heads, levels, points, dropout)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn = FFN(dim, ffn, dropout)

    def forward(self, x, pos, mask, reference, shapes):
        x = self.norm1(self.self_attn(x, pos, x, mask, reference, shapes))  # (B, S, D)
        return self.norm2(self.ffn(x))


class DecoderLayer(nn.Module):
    """self-attention (with the DN mask) -> norm -> rotated deformable cross-attention -> norm -> FFN -> norm."""

    def __init__(self, dim, heads, levels, points, ffn, dropout):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.cross_attn = MSDeformAttn(dim, heads, levels, points, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn = FFN(dim, ffn, dropout)

    def forward(self, x, pos, memory, memory_mask, reference, shapes, reference_angle, attn_mask):
        q = x + pos
        x = self.norm1(x + self.drop(self.self_attn(q, q, x, attn_mask=attn_mask, need_weights=False)[0]))
        x = self.norm2(self.cross_attn(x, pos, memory, memory_mask, reference, shapes, reference_angle))
        return self.norm3(self.ffn(x))  # (B, Q, D)


# ---------------------------------------------------------------------------------------------
# Contrastive denoising queries (DINO Sec. 3.3, ARS-DETR's angle noise)
# ---------------------------------------------------------------------------------------------

def _signed_noise(like: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """±u per entry, u ∈ [0, 1) on positive copies and [1, 2) on negative ones (rows of `negative`)."""
    sign = torch.randint(0, 2, like.shape, device=like.device).to(like.dtype) * 2 - 1
    u = torch.rand_like(like) + negative.view(-1, *[1] * (like.dim() - 1)).to(like.dtype)
    return sign * u


def make_denoising_queries(targets: list, label_embedding: nn.Embedding, num_classes: int,
                           num_dn_queries: int = 100, label_noise: float = 0.5, box_noise: float = 0.4,
                           angle_noise: float = 0.02, with_angle: bool = True):
    """Noised copies of the ground truth that the decoder must reconstruct (positives) or reject
    (negatives), DINO's contrastive denoising as ARS-DETR's `DnQueryGenerator` does it.

    Groups: G = max(1, num_dn_queries // max_m M_m) (dynamic). Each group holds, per image, a
    positive block and a negative block of `pad = max M` slots each, so the DN part has 2·G·pad
    queries. Label noise: a label is replaced by a random class with probability label_noise/2.
    Box noise: each side of the (x1, y1, x2, y2) box moves by ±u·box_noise·(w or h)/2, u ∈ [0, 1)
    for positives and [1, 2) for negatives. Angle noise (multiplicative, as the official code):
    θ += ±u·θ·angle_noise, same u.

    Args:
        targets: per image dict(boxes (M, 4) normalised cxcywh, angles (M,), labels (M,)).
    Returns:
        content (B, 2·G·pad, D), reference (B, 2·G·pad, 4) in inverse-sigmoid space,
        angle (B, 2·G·pad) or None, blocked (2·G·pad, 2·G·pad) bool attention mask with True =
        blocked, meta dict(groups, pad, positives = per image (slot indices, object indices) of the
        positive copies, the pairs the denoising loss uses).
    """
    device = label_embedding.weight.device
    counts = [len(t["labels"]) for t in targets]
    pad = max(counts) if counts else 0
    groups = max(1, num_dn_queries // pad) if pad > 0 else 1
    B, D = len(targets), label_embedding.embedding_dim
    n_dn = 2 * groups * pad
    content = torch.zeros(B, n_dn, D, device=device)
    reference = torch.zeros(B, n_dn, 4, device=device)
    angle = torch.zeros(B, n_dn, device=device)
    positives = [(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))] * B
    for b, t in enumerate(targets):
        m = counts[b]
        if m == 0:
            continue
        labels = t["labels"].repeat(2 * groups)  # (2G·M,) copies ordered [pos g0, neg g0, pos g1, ...]
        boxes = t["boxes"].repeat(2 * groups, 1)  # (2G·M, 4)
        negative = torch.arange(2 * groups, device=device).repeat_interleave(m) % 2 == 1
        if label_noise > 0:
            flip = torch.rand(len(labels), device=device) < label_noise * 0.5
            labels = torch.where(flip, torch.randint_like(labels, 0, num_classes), labels)
        if box_noise > 0:
            xyxy = ro.hbb_cxcywh_to_xyxy(boxes)
            half = boxes[:, 2:].repeat(1, 2) / 2  # (2G·M, 4) half sizes per side
            xyxy = (xyxy + _signed_noise(xyxy, negative) * half * box_noise).clamp(0, 1)
            boxes = ro.hbb_xyxy_to_cxcywh(xyxy)
        slots = (torch.arange(2 * groups, device=device)[:, None] * pad + torch.arange(m, device=device)).flatten()
        positives[b] = (slots[~negative].cpu(), torch.arange(m).repeat(groups))
        content[b, slots] = label_embedding(labels)
        reference[b, slots] = inverse_sigmoid(boxes, eps=1e-3)
        if with_angle:
            theta = t["angles"].repeat(2 * groups)
            if angle_noise > 0:
                theta = ro.norm_angle(theta + _signed_noise(theta, negative) * theta * angle_noise)
            angle[b, slots] = theta
    blocked = torch.zeros(n_dn, n_dn, dtype=torch.bool, device=device)
    for g in range(groups):  # a group sees only itself
        lo, hi = 2 * g * pad, 2 * (g + 1) * pad
        blocked[lo:hi, :lo] = True
        blocked[lo:hi, hi:] = True
    if pad == 0:  # keep the label embedding in the graph (DDP needs every parameter used)
        content = content + 0.0 * label_embedding.weight[0, 0]
    meta = dict(groups=groups, pad=pad, positives=positives)
    return content, reference, angle if with_angle else None, blocked, meta


def denoising_attention_mask(blocked: torch.Tensor, num_queries: int) -> torch.Tensor:
    """The decoder's self-attention mask over [denoising queries, matching queries], True = blocked:
    the DN groups as `blocked` (n_dn, n_dn) says, and the matching queries never see a DN query
    (they would read the ground truth). -> (n_dn + K, n_dn + K)."""
    n_dn = len(blocked)
    mask = torch.zeros(n_dn + num_queries, n_dn + num_queries, dtype=torch.bool, device=blocked.device)
    mask[:n_dn, :n_dn] = blocked
    mask[n_dn:, :n_dn] = True
    return mask


# ---------------------------------------------------------------------------------------------
# Matching and losses
# ---------------------------------------------------------------------------------------------

def giou_xyxy(a: torch.Tensor, b: torch.Tensor, pairwise: bool = True) -> torch.Tensor:
    """Generalised IoU of horizontal boxes: (N, 4), (M, 4) -> (N, M), or (N,) when not pairwise."""
    if pairwise:
        a, b = a[:, None], b[None]
    area_a = (a[..., 2] - a[..., 0]).clamp(min=0) * (a[..., 3] - a[..., 1]).clamp(min=0)
    area_b = (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)
    lt, rb = torch.maximum(a[..., :2], b[..., :2]), torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area_a + area_b - inter
    iou = inter / union.clamp(min=1e-6)
    hull = (torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])).clamp(min=0).prod(-1)
    return iou - (hull - union) / hull.clamp(min=1e-6)


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Element-wise focal loss (Lin et al. Eq. 5), α = 0.25, γ = 2; targets in {0, 1}."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = FOCAL_ALPHA * targets + (1 - FOCAL_ALPHA) * (1 - targets)
    return alpha_t * (1 - p_t) ** FOCAL_GAMMA * ce


def angle_weight(aspect_ratio: torch.Tensor) -> torch.Tensor:
    """ARS-DETR's aspect-ratio weight of the angle cost and loss: 2r / (r + 1), r = long / short side.
    Near-square boxes (r → 1) weigh 1, elongated ones up to 2: their angle matters more to the IoU."""
    return 2 * aspect_ratio / (aspect_ratio + 1)


class HungarianMatcher(nn.Module):
    """One-to-one matching of queries to objects by the ARS-DETR cost
        C = 2·C_focal + 2·|b̂ - b|_1 + 5·(-GIoU(b̂, b)) + 2·BCE(angle logits, AR-CSL(θ))·2r/(r+1),
    with the box terms on the horizontal (cx, cy, w, h) box (the angle only enters through the
    angle term). The cost weights are the assigner's (`train_cfg.assigner` of the official config),
    separate from the loss weights although both are (2, 2, 5, 2) there.

    `l1_format`: "cxcywh" (ours, the default) compares (cx, cy, w, h) on both sides; "official"
    reproduces ARS-DETR, whose head hands the assigner predicted (x1, y1, x2, y2) while
    `BBoxL1Cost(box_format='xywh')` converts only the ground truth to (cx, cy, w, h), so the L1 cost
    there mixes the two formats (`ars_detr_head.py:594`, `ars_hungarian_assigner.py:129`). Use it for
    a run meant to match the official code number for number.
    """

    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 2.0, cost_giou: float = 5.0, cost_angle: float = 2.0,
                 l1_format: Literal["cxcywh", "official"] = "cxcywh"):
        super().__init__()
        if l1_format not in ("cxcywh", "official"):
            raise ValueError(f"l1_format must be 'cxcywh' or 'official', got {l1_format!r}")
        self.cost_class, self.cost_bbox, self.cost_giou, self.cost_angle = cost_class, cost_bbox, cost_giou, cost_angle
        self.l1_format = l1_format

    @torch.no_grad()
    def cost(self, logits, boxes, angle_logits, tgt):
        """(Q, C) logits, (Q, 4) boxes, (Q, A) angle logits or None, targets of one image -> (Q, M) cost."""
        p = logits.float().sigmoid()[:, tgt["labels"]]  # (Q, M)
        pos = -(p + 1e-12).log() * FOCAL_ALPHA * (1 - p) ** FOCAL_GAMMA
        neg = -(1 - p + 1e-12).log() * (1 - FOCAL_ALPHA) * p ** FOCAL_GAMMA
        c = self.cost_class * (pos - neg)
        pred = boxes.float() if self.l1_format == "cxcywh" else ro.hbb_cxcywh_to_xyxy(boxes.float())
        c = c + self.cost_bbox * torch.cdist(pred, tgt["boxes"], p=1)  # (Q, M)
        c = c - self.cost_giou * giou_xyxy(ro.hbb_cxcywh_to_xyxy(boxes.float()), ro.hbb_cxcywh_to_xyxy(tgt["boxes"]))
        if angle_logits is not None:
            x = angle_logits.float()
            bce_pos = F.binary_cross_entropy_with_logits(x, torch.ones_like(x), reduction="none")  # (Q, A)
            bce_neg = F.binary_cross_entropy_with_logits(x, torch.zeros_like(x), reduction="none")
            bce = (bce_pos @ tgt["angle_targets"].T + bce_neg @ (1 - tgt["angle_targets"]).T) / A  # (Q, M)
            c = c + self.cost_angle * bce * angle_weight(tgt["aspect"])[None]
        return c

    @torch.no_grad()
    def forward(self, logits, boxes, angle_logits, targets):
        """Per image (query indices, target indices), like DETR's matcher; batched (B, Q, ...) inputs."""
        out = []
        for b, tgt in enumerate(targets):
            if len(tgt["labels"]) == 0:
                out.append((torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)))
                continue
            c = self.cost(logits[b], boxes[b], None if angle_logits is None else angle_logits[b], tgt)
            # a diverged model gives NaN costs; match anyway so that the loss, not the matcher, reports it
            c = torch.nan_to_num(c, nan=1e8, posinf=1e8, neginf=-1e8)
            rows, cols = linear_sum_assignment(c.cpu().numpy())
            out.append((torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)))
        return out


class SetCriterion(nn.Module):
    """ARS-DETR losses, weighted as the official config: focal 2 (normalised by the number of
    positives), L1 2 on normalised (cx, cy, w, h), GIoU 5 on the horizontal box, angle BCE 2 against
    the AR-CSL soft label with per-object weight 2r/(r+1) (normalised by positives·A). They are
    computed on every decoder layer (`d{i}.` prefix, the last without), the encoder proposals with
    all labels set to class 0 (`enc_`), and the denoising queries (`dn_`, GIoU in pixels as the
    official DN branch)."""

    def __init__(self, num_classes: int, with_angle: bool = True, loss_cls: float = 2.0, loss_bbox: float = 2.0,
                 loss_giou: float = 5.0, loss_angle: float = 2.0, matcher: HungarianMatcher = None):
        super().__init__()
        self.num_classes, self.with_angle = num_classes, with_angle
        self.weights = dict(cls=loss_cls, bbox=loss_bbox, giou=loss_giou, angle=loss_angle)
        self.matcher = matcher if matcher is not None else HungarianMatcher()

    def _terms(self, logits, boxes, angle_logits, targets, indices, pixel_giou=False):
        """The four weighted losses of one prediction set given (query, target) index pairs per image."""
        B, Q, C = logits.shape
        batch_idx = torch.cat([torch.full_like(r, b) for b, (r, _) in enumerate(indices)]).to(logits.device)
        query_idx = torch.cat([r for r, _ in indices]).to(logits.device)

        def matched(key):  # the targets' `key` in the order of the matched queries
            return torch.cat([t[key][c.to(t[key].device)] for t, (_, c) in zip(targets, indices)])

        labels = torch.zeros(B, Q, C, device=logits.device)
        labels[batch_idx, query_idx, matched("labels")] = 1.0
        num_pos = _mean_over_ranks(len(query_idx), logits.device)
        out = dict(cls=self.weights["cls"] * sigmoid_focal_loss(logits.float(), labels).sum() / num_pos)
        pred, gt = boxes[batch_idx, query_idx].float(), matched("boxes")  # (N, 4) each
        out["bbox"] = self.weights["bbox"] * (pred - gt).abs().sum() / num_pos
        pxy, gxy = ro.hbb_cxcywh_to_xyxy(pred), ro.hbb_cxcywh_to_xyxy(gt)
        if pixel_giou:
            factor = torch.cat([t["factor"].expand(len(c), 4) for t, (_, c) in zip(targets, indices)])
            pxy, gxy = pxy * factor, gxy * factor
        out["giou"] = self.weights["giou"] * (1 - giou_xyxy(pxy, gxy, pairwise=False)).sum() / num_pos
        if self.with_angle:
            a_pred = angle_logits[batch_idx, query_idx].float()  # (N, A)
            bce = F.binary_cross_entropy_with_logits(a_pred, matched("angle_targets"), reduction="none")
            out["angle"] = self.weights["angle"] * (bce * angle_weight(matched("aspect"))[:, None]).sum() / (num_pos * A)
        return out

    def forward(self, outputs: dict, targets: list, matches: dict = None) -> dict:
        """outputs: `DETRHead.forward`'s dict; targets: `DETRHead.prepare_targets`'s list. A dict
        passed as `matches` receives the (query, target) pairs of the last layer ("last") and of
        the encoder proposals ("enc"), for losses built on top (MutDet's contrastive alignment)."""
        matches = {} if matches is None else matches
        losses = {}
        layers = outputs["aux_outputs"] + [outputs]
        for i, o in enumerate(layers):
            idx = self.matcher(o["pred_logits"], o["pred_boxes"], o.get("pred_angle_logits"), targets)
            prefix = "" if i == len(layers) - 1 else f"d{i}."
            matches["last"] = idx
            for k, v in self._terms(o["pred_logits"], o["pred_boxes"], o.get("pred_angle_logits"), targets, idx).items():
                losses[f"{prefix}loss_{k}"] = v
        if "enc_outputs" in outputs:  # class-agnostic proposals: every object is class 0
            e = outputs["enc_outputs"]
            binary = [dict(t, labels=torch.zeros_like(t["labels"])) for t in targets]
            idx = matches["enc"] = self.matcher(e["pred_logits"], e["pred_boxes"], e.get("pred_angle_logits"), binary)
            for k, v in self._terms(e["pred_logits"], e["pred_boxes"], e.get("pred_angle_logits"), binary, idx).items():
                losses[f"enc_loss_{k}"] = v
        if "dn_outputs" in outputs:
            idx = outputs["dn_meta"]["positives"]  # positive copies reconstruct their object
            dn = outputs["dn_outputs"]
            for i, o in enumerate(dn):
                prefix = "" if i == len(dn) - 1 else f"d{i}."
                for k, v in self._terms(o["pred_logits"], o["pred_boxes"], o.get("pred_angle_logits"), targets, idx,
                                        pixel_giou=True).items():
                    losses[f"{prefix}dn_loss_{k}"] = v
        return losses


# ---------------------------------------------------------------------------------------------
# Targets, encoder reference points, two-stage anchors, post-processing (pure functions of the head)
# ---------------------------------------------------------------------------------------------

def normalised_targets(boxes: list, labels: list, sizes: list, with_angle: bool, device) -> list:
    """Per image: le90 boxes (M, 5) in pixels, labels (M,), unpadded (h, w) -> normalised targets:
    boxes (M, 4) (cx, cy, w, h) / (W, H, W, H), angles (M,), labels, angle_targets (M, A) AR-CSL,
    aspect (M,) = long / short side, factor (1, 4) = (W, H, W, H). Without `with_angle` (horizontal
    boxes) the box is the axis-aligned extent at angle 0."""
    out = []
    for b, l, (h, w) in zip(boxes, labels, sizes):
        b, l = b.to(device).float(), l.to(device).long()
        factor = torch.tensor([[w, h, w, h]], dtype=torch.float32, device=device)
        if with_angle:
            cxcywh, theta = b[:, :4], b[:, 4]
        else:
            cxcywh, theta = ro.hbb_xyxy_to_cxcywh(ro.obb2hbb(b)), torch.zeros_like(b[:, 4])
        aspect = (torch.maximum(cxcywh[:, 2], cxcywh[:, 3]) / torch.minimum(cxcywh[:, 2], cxcywh[:, 3]).clamp(min=1e-6))
        t = dict(boxes=cxcywh / factor, angles=theta, labels=l, aspect=aspect, factor=factor)
        if with_angle:
            t["angle_targets"] = ro.csl_encode(theta, aspect).float() if len(l) else torch.zeros(0, A, device=device)
        out.append(t)
    return out


def encoder_reference_points(masks: list) -> tuple:
    """masks: L (B, H_l, W_l), True at padding -> (reference (B, S, L, 2): every token's cell centre,
    normalised by the valid area of its level and scaled to each level's valid area, as Deformable
    DETR's `get_reference_points`; valid ratios (B, L, 2) as (w, h))."""
    valid = torch.stack([torch.stack([(~m[:, 0, :]).sum(1), (~m[:, :, 0]).sum(1)], -1).float()
                         / torch.tensor([m.shape[2], m.shape[1]], device=m.device) for m in masks], 1)  # (B, L, 2)
    refs = []
    for l, m in enumerate(masks):
        h, w = m.shape[-2:]
        ys, xs = torch.meshgrid(torch.arange(h, device=m.device) + 0.5, torch.arange(w, device=m.device) + 0.5,
                                indexing="ij")
        refs.append(torch.stack([xs.flatten()[None] / (valid[:, None, l, 0] * w),
                                 ys.flatten()[None] / (valid[:, None, l, 1] * h)], -1))  # (B, HW, 2)
    return torch.cat(refs, 1)[:, :, None] * valid[:, None], valid


def two_stage_anchors(mask: torch.Tensor, shapes: list) -> tuple:
    """DINO two-stage anchors (ARS-DETR `gen_encoder_output_proposals`): one box per token at its cell
    centre with side 0.05·2^l, in inverse-sigmoid space. mask (B, S) True at padding -> (anchors
    (B, S, 4), a large value where the token is padding or its anchor leaves (0.01, 0.99); ok (B, S, 1))."""
    B = mask.shape[0]
    anchors, start = [], 0
    for l, (h, w) in enumerate(shapes):
        m = mask[:, start:start + h * w].view(B, h, w)
        valid_h, valid_w = (~m[:, :, 0]).sum(1), (~m[:, 0, :]).sum(1)
        ys, xs = torch.meshgrid(torch.arange(h, device=mask.device, dtype=torch.float32),
                                torch.arange(w, device=mask.device, dtype=torch.float32), indexing="ij")
        grid = (torch.stack([xs, ys], -1)[None] + 0.5) / torch.stack([valid_w, valid_h], -1).view(B, 1, 1, 2)
        wh = torch.full_like(grid, 0.05 * 2.0 ** l)
        anchors.append(torch.cat([grid, wh], -1).view(B, -1, 4))
        start += h * w
    anchors = torch.cat(anchors, 1)  # (B, S, 4)
    ok = ((anchors > 0.01) & (anchors < 0.99)).all(-1, keepdim=True) & ~mask[..., None]
    return torch.log(anchors / (1 - anchors)).masked_fill(~ok, 10000.0), ok


@torch.no_grad()
def postprocess_detections(outputs: dict, sizes: list, scales: list, k: int, with_angle: bool) -> list:
    """Top-k over all (query, class) pairs by sigmoid score, no NMS (ARS-DETR's test_cfg).

    Args:
        sizes: per image the unpadded (h, w) the boxes are normalised by; scales: per image the
            (sy, sx) resize factor to undo (boxes are returned in original pixels), or None.
    Returns:
        per image dict(boxes (K, 5) le90 pixels, scores (K,), labels (K,)).
    """
    logits = outputs["pred_logits"].float()
    B, Q, C = logits.shape
    scores, idx = logits.sigmoid().flatten(1).topk(min(k, Q * C), dim=1)  # (B, k)
    query, labels = idx // C, idx % C
    results = []
    for b in range(B):
        h, w = sizes[b]
        sy, sx = scales[b] if scales is not None else (1.0, 1.0)
        box = outputs["pred_boxes"][b, query[b]].float() * torch.tensor([w, h, w, h], device=logits.device)
        if with_angle:
            theta = ro.csl_decode(outputs["pred_angle_logits"][b, query[b]].float())
            obb = torch.cat([box, theta[:, None]], 1)
            # undo an anisotropic resize through the polygon, exact for any scale pair
            polys = ro.obb2poly(obb.double()).view(-1, 4, 2) / torch.tensor([sx, sy], dtype=torch.float64,
                                                                             device=obb.device)
            obb = ro.poly2obb(polys.view(-1, 8)).float() if (sx, sy) != (1.0, 1.0) else ro.regularize_obb(obb)
        else:
            xyxy = ro.hbb_cxcywh_to_xyxy(box) / torch.tensor([sx, sy, sx, sy], device=box.device)
            obb = ro.hbb2obb(xyxy)
        results.append(dict(boxes=obb, scores=scores[b], labels=labels[b]))
    return results


# ---------------------------------------------------------------------------------------------
# The DETR head set: encoder, query selection, decoder, prediction branches, criterion
# ---------------------------------------------------------------------------------------------

class DETRHead(nn.Module):
    """Everything of ARS-DETR after the neck, for one label space (one modality in BabelRS).

    `forward` reads as the method: encode -> select queries (two-stage) -> add denoising queries
    -> decode with box refinement and angle re-prediction. The three steps are public so that the
    MutDet pre-training model can run the decoder a second time on an enhanced memory.
    """

    def __init__(self, num_classes: int, dim: int = 256, heads: int = 8, levels: int = 4, points: int = 4,
                 enc_layers: int = 6, dec_layers: int = 6, ffn: int = 1024, dropout: float = 0.1,
                 num_queries: int = 300, num_dn_queries: int = 100, box_type: Literal["obb", "hbb"] = "obb",
                 dn_label_noise: float = 0.5, dn_box_noise: float = 0.4, dn_angle_noise: float = 0.02,
                 rotate_deform_attn: bool = True, match_costs: tuple = (2.0, 2.0, 5.0, 2.0),
                 match_l1: Literal["cxcywh", "official"] = "cxcywh"):
        super().__init__()
        if box_type not in ("obb", "hbb"):
            raise ValueError(f"box_type must be 'obb' or 'hbb', got {box_type!r}")
        self.num_classes, self.dim, self.levels = num_classes, dim, levels
        self.num_queries, self.num_dn_queries, self.box_type = num_queries, num_dn_queries, box_type
        self.with_angle = box_type == "obb"
        self.dn_noise = (dn_label_noise, dn_box_noise, dn_angle_noise)
        self.rotate_deform_attn = rotate_deform_attn and self.with_angle
        self.level_embed = nn.Parameter(torch.empty(levels, dim).normal_())
        self.encoder = nn.ModuleList(EncoderLayer(dim, heads, levels, points, ffn, dropout) for _ in range(enc_layers))
        self.enc_output = nn.Linear(dim, dim)
        self.enc_output_norm = nn.LayerNorm(dim)
        self.query_embed = nn.Embedding(num_queries, dim)  # DINO mixed query selection: learnt content
        self.label_embedding = nn.Embedding(num_classes, dim)  # content of denoising queries
        self.decoder = nn.ModuleList(DecoderLayer(dim, heads, levels, points, ffn, dropout) for _ in range(dec_layers))
        self.ref_point_head = MLP(2 * dim, dim, dim, 2)
        self.decoder_norm = nn.LayerNorm(dim)
        # one branch set per decoder layer plus one (index dec_layers) for the encoder proposals, deep
        # copies of one module each, so that all start equal (ARS-DETR `_get_clones`)
        n = dec_layers + 1
        self.cls_branches = _clones(nn.Linear(dim, num_classes), n)
        self.reg_branches = _clones(MLP(dim, dim, 4, 3), n)  # num_reg_fcs = 2
        self.angle_branches = _clones(nn.Linear(dim, A), n) if self.with_angle else None
        self.criterion = SetCriterion(num_classes, with_angle=self.with_angle,
                                      matcher=HungarianMatcher(*match_costs, l1_format=match_l1))
        self.reset_parameters()

    def reset_parameters(self):
        """The official initialisation (ARS-DETR `init_weights` of the transformer and the head):
        - every matrix of the transformer (encoder, decoder, `enc_output`, `ref_point_head`) Xavier;
        - then the encoder's deformable attention re-initialised as Deformable DETR (offsets on a
          grid, attention weights 0: mmcv's `MultiScaleDeformableAttention.init_weights`); the
          decoder's rotated cross-attention is not an instance of that class, so its
          `sampling_offsets` and `attention_weights` *weights* keep the Xavier values, their biases
          the module's own grid / zero init;
        - level embeddings and query content N(0, 1); the DN `label_embedding` keeps
          `nn.Embedding`'s N(0, 1);
        - class, box and angle branches keep PyTorch's Linear init (equal copies), then the class
          bias gets the focal prior p = 0.01 and the last box layer zeros.
        """
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()  # offsets grid, zero attention weights, Xavier value / output
        transformer = [self.encoder, self.decoder, self.enc_output, self.ref_point_head]
        for part in transformer:
            for name, p in part.named_parameters():
                if p.dim() > 1 and not (part is self.encoder and ("sampling_offsets" in name or "attention_weights" in name)):
                    nn.init.xavier_uniform_(p)
        nn.init.normal_(self.level_embed)
        nn.init.normal_(self.query_embed.weight)
        nn.init.normal_(self.label_embedding.weight)
        prior = -math.log((1 - 0.01) / 0.01)  # focal-loss prior: every class starts at p = 0.01
        for lin in self.cls_branches:
            nn.init.constant_(lin.bias, prior)
        for mlp in self.reg_branches:
            nn.init.zeros_(mlp[-1].weight)
            nn.init.zeros_(mlp[-1].bias)

    # -- inputs --------------------------------------------------------------------------------

    def prepare_targets(self, boxes: list, labels: list, sizes: list) -> list:
        """`normalised_targets` in this head's box type, on its device."""
        return normalised_targets(boxes, labels, sizes, self.with_angle, self.level_embed.device)

    # -- encoder and two-stage query selection (the official transformer's first half) ------

    def encode(self, feats: list, masks: list) -> dict:
        """feats: L maps (B, D, H_l, W_l); masks: L (B, H_l, W_l), True at padding -> the memory and
        what the decoder needs to read it."""
        shapes = [tuple(f.shape[-2:]) for f in feats]
        x = torch.cat([f.flatten(2).transpose(1, 2) for f in feats], 1)  # (B, S, D)
        mask = torch.cat([m.flatten(1) for m in masks], 1)  # (B, S)
        pos = torch.cat([sine_position_encoding(m, self.dim // 2).flatten(2).transpose(1, 2) + self.level_embed[l]
                         for l, m in enumerate(masks)], 1)  # (B, S, D)
        reference, valid = encoder_reference_points(masks)
        for layer in self.encoder:
            x = layer(x, pos, mask, reference, shapes)
        return dict(memory=x, mask=mask, shapes=shapes, valid_ratios=valid)

    def proposals(self, memory: torch.Tensor, mask: torch.Tensor, shapes: list):
        """The memory of the encoder proposals (`enc_output` + LN, zeroed where the anchor is invalid)
        and their anchors (`two_stage_anchors`): (B, S, D), (B, S, 4)."""
        anchors, ok = two_stage_anchors(mask, shapes)
        return self.enc_output_norm(self.enc_output(memory.masked_fill(~ok, 0.0))), anchors

    def select_queries(self, memory, mask, shapes, tokens=None, scores=None):
        """Encoder proposals and the top-k of them as decoder references (DINO two-stage).

        Each token predicts a class, a box (refining its anchor) and an angle with the branches at
        index `dec_layers`; the top-`num_queries` tokens by class-0 logit (the encoder is trained
        class-agnostic) give the reference boxes and angles, detached. MutDet's enhanced branch
        passes its own per-token features `tokens` (B, S, D) in place of `enc_output(memory)`, and
        `scores` as a function of the class-0 logits (B, S) -> (B, S) for the ranking.
        Returns dict(enc_outputs=dict(pred_logits, pred_boxes, pred_angle_logits), reference (B, K, 4)
        in inverse-sigmoid space, angle (B, K) or None, topk (B, K)).
        """
        out_memory, anchors = self.proposals(memory, mask, shapes)
        if tokens is not None:
            out_memory = tokens
        k = len(self.decoder)
        logits = self.cls_branches[k](out_memory)  # (B, S, C)
        coords = self.reg_branches[k](out_memory) + anchors  # (B, S, 4) unactivated
        angle_logits = self.angle_branches[k](out_memory) if self.with_angle else None  # (B, S, A)
        rank = logits[..., 0] if scores is None else scores(logits[..., 0])
        topk = rank.topk(min(self.num_queries, rank.shape[1]), dim=1).indices  # (B, K)
        reference = coords.gather(1, topk[..., None].expand(-1, -1, 4)).detach()
        angle = None
        if self.with_angle:
            angle = ro.csl_decode(angle_logits.gather(1, topk[..., None].expand(-1, -1, A)).detach())
        enc = dict(pred_logits=logits, pred_boxes=coords.sigmoid(), tokens=out_memory)
        if self.with_angle:
            enc["pred_angle_logits"] = angle_logits
        return dict(enc_outputs=enc, reference=reference, angle=angle, topk=topk)

    # -- decoder with box refinement and angle re-prediction (its second half) --------------

    def decode(self, content, reference, angle, memory, mask, shapes, valid_ratios, attn_mask=None):
        """Decoder with look-forward-twice box refinement and per-layer angle re-prediction.

        Args:
            content: (B, Q, D) query content; reference: (B, Q, 4) boxes in inverse-sigmoid space;
            angle: (B, Q) reference angles or None; memory: (B, S, D); attn_mask (Q, Q) or None.
        Returns:
            list over layers of dict(pred_logits (B, Q, C), pred_boxes (B, Q, 4), pred_angle_logits
            (B, Q, A), hidden (B, Q, D)).
        """
        ref = reference.sigmoid()  # (B, Q, 4) detached input reference of the current layer
        pred_ref = ref  # the same box with its gradient path, for this layer's predictions
        angle = angle if angle is not None else torch.zeros_like(ref[..., 0])
        x, layers = content, []
        for l, layer in enumerate(self.decoder):
            ref_in = ref[:, :, None] * torch.cat([valid_ratios, valid_ratios], -1)[:, None]  # (B, Q, L, 4)
            theta = angle
            if self.rotate_deform_attn:
                # Describe the box with its angle in [-π/4, π/4): swap w and h where |θ| > π/4, so the
                # sampling grid is turned by at most 45° (ARS-DETR `rotate_deform_attn`).
                swap = (theta.abs() > math.pi / 4)[:, :, None, None]
                ref_in = torch.where(swap, ref_in[..., [0, 1, 3, 2]], ref_in)
                theta = torch.remainder(theta + math.pi / 4, math.pi / 2) - math.pi / 4
            pos = self.ref_point_head(sine_embed_boxes(ref_in[:, :, 0], self.dim // 2))  # (B, Q, D)
            x = layer(x, pos, memory, mask, ref_in, shapes, theta if self.with_angle else None, attn_mask)
            hidden = self.decoder_norm(x)
            # This layer's boxes refine its input reference *with* that reference's gradient path, so
            # layer l+1's box loss also trains layer l's box branch ("look forward twice", DINO Sec. 3.5).
            pred = dict(pred_logits=self.cls_branches[l](hidden),
                        pred_boxes=(self.reg_branches[l](hidden) + inverse_sigmoid(pred_ref)).sigmoid(), hidden=hidden)
            if self.with_angle:
                pred["pred_angle_logits"] = self.angle_branches[l](hidden)
                angle = ro.csl_decode(self.angle_branches[l](x)).detach()  # next layer's reference angle
            layers.append(pred)
            pred_ref = (self.reg_branches[l](x) + inverse_sigmoid(ref, eps=1e-3)).sigmoid()  # (B, Q, 4)
            ref = pred_ref.detach()
        return layers

    # -- the whole head, with contrastive denoising (the official head and CdnQueryGenerator)

    def forward(self, feats: list, masks: list, targets: list = None) -> dict:
        """
        Args:
            feats: L neck maps (B, D, H_l, W_l); masks: L (B, H_l, W_l) True at padding;
            targets: `prepare_targets` output for training (adds denoising queries) or None.
        Returns:
            dict(pred_logits (B, Q, C), pred_boxes (B, Q, 4) normalised cxcywh, pred_angle_logits
            (B, Q, A) [obb], hidden (B, Q, D), aux_outputs [one dict per earlier layer],
            enc_outputs dict, and with targets dn_outputs [per layer], dn_meta).
        """
        enc = self.encode(feats, masks)
        sel = self.select_queries(enc["memory"], enc["mask"], enc["shapes"])
        return self.decode_queries(enc, sel, targets)

    def denoising_queries(self, targets: list):
        """This batch's contrastive denoising queries (`make_denoising_queries` with the head's noise
        scales), or None when the head has none. MutDet draws them once and feeds the same set to
        both of its decoding passes."""
        if targets is None or self.num_dn_queries <= 0:
            return None
        return make_denoising_queries(targets, self.label_embedding, self.num_classes, self.num_dn_queries,
                                      *self.dn_noise, with_angle=self.with_angle)

    def decode_queries(self, enc: dict, sel: dict, targets: list = None, memory: torch.Tensor = None,
                       dn: tuple = None) -> dict:
        """Decode the selected queries (plus denoising queries when `targets` are given: `dn`, a
        `denoising_queries` result, or freshly drawn ones) against `memory` (default the encoder's)
        and arrange the outputs as `forward` documents."""
        B, K = enc["memory"].shape[0], sel["reference"].shape[1]  # K < num_queries on images of fewer tokens
        content = self.query_embed.weight[None, :K].expand(B, -1, -1)  # (B, K, D)
        reference, angle, attn_mask, meta = sel["reference"], sel["angle"], None, None
        if dn is None:
            dn = self.denoising_queries(targets)
        if dn is not None:
            dn_content, dn_ref, dn_angle, blocked, meta = dn
            n_dn, K = dn_content.shape[1], content.shape[1]
            content = torch.cat([dn_content, content], 1)  # (B, n_dn + K, D)
            reference = torch.cat([dn_ref, reference], 1)
            if self.with_angle:
                angle = torch.cat([dn_angle, angle], 1)
            attn_mask = denoising_attention_mask(blocked, K)
        layers = self.decode(content, reference, angle, enc["memory"] if memory is None else memory,
                             enc["mask"], enc["shapes"], enc["valid_ratios"], attn_mask)
        n_dn = 2 * meta["groups"] * meta["pad"] if meta is not None else 0
        split = [{k: v[:, n_dn:] for k, v in o.items()} for o in layers]
        out = dict(split[-1], aux_outputs=split[:-1], enc_outputs=sel["enc_outputs"])
        if meta is not None:
            out["dn_outputs"] = [{k: v[:, :n_dn] for k, v in o.items()} for o in layers]
            out["dn_meta"] = meta
        return out

    # -- inference -----------------------------------------------------------------------------

    def postprocess(self, outputs: dict, sizes: list, scales: list = None, max_per_image: int = None) -> list:
        """`postprocess_detections` with this head's box type, at most `num_queries` a image by default."""
        return postprocess_detections(outputs, sizes, scales, max_per_image or self.num_queries, self.with_angle)


# ---------------------------------------------------------------------------------------------
# The detector: shared backbone + neck, one DETR head set per modality
# ---------------------------------------------------------------------------------------------

class RotatedDETR(nn.Module):
    """Backbone -> neck -> one `DETRHead` per modality (BabelRS Sec. 3.3: "a shared backbone is
    combined with modality-specific detection heads", loss_total = Σ_n w_n·Loss_n). With one
    modality this is plain ARS-DETR.

    The backbone is any module returning a list of maps with an `out_channels` list (ResNet C3-C5
    here; the BabelRS ViT's simple feature pyramid in babelrs.py).
    """

    def __init__(self, backbone: nn.Module, heads: dict, dim: int = 256, num_levels: int = 4,
                 gn_groups: int = 32, loss_weights: dict = None):
        super().__init__()
        self.backbone = backbone
        self.neck = ChannelMapper(backbone.out_channels, dim, num_levels, gn_groups)
        self.heads = nn.ModuleDict(heads)
        self.loss_weights = {m: float((loss_weights or {}).get(m, 1.0)) for m in heads}

    def forward(self, images: torch.Tensor, masks: torch.Tensor, modalities: list, targets: list = None) -> dict:
        """
        Args:
            images: (B, 3, H, W) normalised, padded; masks: (B, H, W) True at padding;
            modalities: per image the head to use; targets: per image dict(boxes (M, 5) le90 pixels,
                labels (M,), size (h, w) unpadded) for training, or None.
        Returns:
            dict(outputs={modality: head outputs + "index" (images of that modality)},
                 losses={"<modality>.<term>": weighted loss} when targets are given).
        """
        feats = self.neck(self.backbone(images))  # L x (B, D, H_l, W_l)
        level_masks = [F.interpolate(masks[None].float(), size=f.shape[-2:])[0].bool() for f in feats]
        outputs, losses = {}, {}
        for modality, head in self.heads.items():
            index = [i for i, m in enumerate(modalities) if m == modality]
            if not index:
                continue
            sel = torch.tensor(index, device=images.device)
            sub_feats = [f.index_select(0, sel) for f in feats]
            sub_masks = [m.index_select(0, sel) for m in level_masks]
            tgt = None
            if targets is not None:
                tgt = head.prepare_targets([targets[i]["boxes"] for i in index], [targets[i]["labels"] for i in index],
                                           [targets[i]["size"] for i in index])
            out = head(sub_feats, sub_masks, tgt)
            out["index"] = index
            outputs[modality] = out
            if tgt is not None:
                for name, value in head.criterion(out, tgt).items():
                    losses[f"{modality}.{name}"] = self.loss_weights[modality] * value
        unknown = set(modalities) - set(self.heads)
        if unknown:
            raise ValueError(f"no head for modalities {sorted(unknown)}; heads: {sorted(self.heads)}")
        return dict(outputs=outputs, losses=losses)

    @torch.no_grad()
    def predict(self, images, masks, modalities, sizes, scales=None) -> list:
        """Per image dict(boxes (K, 5) le90 in original pixels, scores, labels)."""
        outputs = self(images, masks, modalities)["outputs"]
        results = [None] * len(modalities)
        for modality, out in outputs.items():
            index = out["index"]
            dets = self.heads[modality].postprocess(out, [sizes[i] for i in index],
                                                    None if scales is None else [scales[i] for i in index])
            for i, d in zip(index, dets):
                results[i] = d
        return results


def build_detector(sources: list, backbone: str = "resnet50", resnet: str = "", frozen_bn: bool = True,
                   dim: int = 256, heads: int = 8, levels: int = 4, points: int = 4, enc_layers: int = 6,
                   dec_layers: int = 6, ffn: int = 1024, dropout: float = 0.1, num_queries: int = 300,
                   num_dn_queries: int = 100, gn_groups: int = 32, loss_weights: dict = None,
                   match_costs: tuple = (2.0, 2.0, 5.0, 2.0), match_l1: str = "cxcywh",
                   backbone_module: nn.Module = None) -> RotatedDETR:
    """ARS-DETR with one head set per source modality.

    Args:
        sources: list of dict(modality, classes, box_type) (one head per distinct modality).
        match_costs: the matcher's (class, L1, GIoU, angle) weights; match_l1: its L1 box format
            (`HungarianMatcher`).
        backbone: "resnet50" (the papers') or "resnet18" (the tiny preset); `resnet` a local weight
            file. `backbone_module` replaces it (BabelRS's ViT pyramid).
    """
    if backbone_module is None:
        backbone_module = ResNetBackbone(backbone, resnet, frozen_bn)
    head_sets = {}
    for s in sources:
        if s["modality"] in head_sets:
            raise ValueError(f"two sources of modality {s['modality']!r}; one head set per modality")
        head_sets[s["modality"]] = DETRHead(len(s["classes"]), dim, heads, levels, points, enc_layers, dec_layers,
                                            ffn, dropout, num_queries, num_dn_queries, s["box_type"],
                                            match_costs=tuple(match_costs), match_l1=match_l1)
    return RotatedDETR(backbone_module, head_sets, dim, levels, gn_groups, loss_weights)
