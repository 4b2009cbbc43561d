"""MutDet: mutually optimising pre-training for remote sensing object detection.

Huang et al., "MutDet: Mutually Optimizing Pre-training for Remote Sensing Object Detection",
ECCV 2024, arXiv 2407.09920; official code github.com/floatingstarZ/MutDet (MMRotate 0.x), itself
built on DETReg (Bar et al., arXiv 2106.04550) and ARS-DETR (detection.py).

Paper / official code -> this file
    Fig. 2 "Mutual Enhancement", 3 enhancement layers (SAM's two-way transformer)   TwoWayBlock, MutualEnhancement
    contrastive alignment loss, symmetric InfoNCE, τ = 0.2                         contrastive_alignment_loss
    auxiliary siamese head: the same decoder on the un-enhanced memory              MutDetPretrainer.forward
    L_ca on the enhanced decoder, its DN queries and encoder proposals, and on the siamese decoder and
    its DN queries, all against the enhanced object embeddings O_enh              MutDetPretrainer._alignment
    SAM automatic masks at the official generator defaults (32x32 points, ...)     generate_masks
    SAM mask -> largest contour -> cv2.minAreaRect -> le90 box                     mask_to_obb, min_area_rect
    object embeddings: rotated RoIAlign (x1.5, 224 px) -> frozen ResNet-50 layer4, pooled   object_embeddings
    PCA to 256-d + L2 normalisation, k-means (K = 256) pseudo-classes             fit_pca, kmeans_cosine
    DETReg's L1 embedding loss (the baseline row)                                  MutDetPretrainer(embed_loss="l1")
    the sam cache read back for pre-training (boxes, pseudo-classes, embeddings)   PseudoLabels
    fine-tuning from the pre-trained detector (load_from, strict=False)            pretrained_detector

Differences from the official code
    - Boxes and embeddings are filtered together everywhere (the official code drops small boxes
      but not their embeddings, so the two fall out of step).
    - `colour_components` (`--masks components`) is a SAM stand-in for the tiny sweeps, not in the paper.
    - `random_proposals` and `selective_search` (`--proposals random | selective`) are the sources the
      authors suggest where SAM fails (their issue 3), not in the paper; selective search is one
      strategy of Uijlings et al. with rotated (minimum-area) boxes.
    - `mask_to_obb` takes the component with the longest boundary (cv2's "contour with the most
      points" of CHAIN_APPROX_NONE) and its exact minimum-area rectangle over the boundary pixels;
      holes count (cv2 `RETR_EXTERNAL` takes the outer contour), corners are neither clipped to the
      image nor rounded to 0.1 px as the official text files.
    - The enhancement module runs per image, as the official loop, on the image's own objects.
    - The DN alignment takes each object's first positive copy once (`_first_positives`).
    - `embed_loss="l1"` with enhancement compares with the un-normalised O_enh (official: normalised).
    - The DETReg row (`enhance=False, embed_loss="l1", dn_align=False`, one pseudo-class) trains on
      this project's targets: ImageNet layer4 + PCA-256 + L2 embeddings of up to 1000 SAM boxes, not
      DETReg's SwAV features of the top-30 selective-search boxes.
    Kept as the official code although it looks unintended: the enhanced branch ranks proposals by
    similarity × the *raw* class-0 logit (`enhanced_scores`), negative at the start of training.

Shape letters: B images, S memory tokens, N objects of an image, Q queries, D model width.

May import: detection, datasets, rotated_ops (DESIGN.md).
"""
import json
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import datasets
import detection
import rotated_ops as ro

TAU = 0.2  # temperature of the contrastive alignment loss (DetReg_dn_ars_detr_headv7.py)


# ---------------------------------------------------------------------------------------------
# Mutual enhancement (Fig. 2): object embeddings and image tokens attend to each other
# ---------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Plain multi-head attention with separate q, k, v and output projections, no dropout."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, q, k, v):  # (Nq, D), (Nk, D), (Nk, D) -> (Nq, D)
        def split(x):
            return x.view(len(x), self.heads, -1).transpose(0, 1)  # (H, N, D/H)
        out = F.scaled_dot_product_attention(split(self.q_proj(q)), split(self.k_proj(k)), split(self.v_proj(v)))
        return self.out_proj(out.transpose(0, 1).reshape(len(q), -1))


class TwoWayBlock(nn.Module):
    """One enhancement layer (post-norm residuals):
        O'     = LN1(O + SelfAttn(O))
        O''    = LN2(O' + CrossAttn(q=O', k=v=F))            objects read the image
        O_next = LN3(O'' + MLP(O''))
        F_next = LN4(F + CrossAttn(q=F, k=v=O_next))          the image reads the objects
    The image tokens get no self-attention and no MLP (official `TwoWayAttentionBlock` use)."""

    def __init__(self, dim: int = 256, heads: int = 8, mlp: int = 2048):
        super().__init__()
        self.self_attn = Attention(dim, heads)
        self.token_to_image = Attention(dim, heads)
        self.image_to_token = Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.ReLU(), nn.Linear(mlp, dim))
        self.norm1, self.norm2, self.norm3, self.norm4 = (nn.LayerNorm(dim) for _ in range(4))

    def forward(self, objects, image):  # (N, D), (S, D)
        objects = self.norm1(objects + self.self_attn(objects, objects, objects))
        objects = self.norm2(objects + self.token_to_image(objects, image, image))
        objects = self.norm3(objects + self.mlp(objects))
        image = self.norm4(image + self.image_to_token(image, objects, objects))
        return objects, image


class MutualEnhancement(nn.Module):
    """3 two-way layers between the object embeddings O (fed raw, no input projection) and the
    projected encoder memory F: returns (O_enh, F_enh)."""

    def __init__(self, dim: int = 256, heads: int = 8, mlp: int = 2048, depth: int = 3):
        super().__init__()
        self.layers = nn.ModuleList(TwoWayBlock(dim, heads, mlp) for _ in range(depth))

    def forward(self, objects, image):
        for layer in self.layers:
            objects, image = layer(objects, image)
        return objects, image


# ---------------------------------------------------------------------------------------------
# Contrastive alignment loss
# ---------------------------------------------------------------------------------------------

def contrastive_alignment_loss(pred: torch.Tensor, target: torch.Tensor, tau: float = TAU) -> torch.Tensor:
    """Symmetric InfoNCE between M predicted embeddings and their M object embeddings, row i of each
    a positive pair, all other rows negatives:
        L_ca = 2τ·CE(q kᵀ / τ, I) + 2τ·CE(k qᵀ / τ, I),  q = z / |z|, k = o / |o|
    (the official scale 2τ with mean cross-entropies; the paper's leading factor is not legible)."""
    if len(pred) == 0:
        return pred.sum() * 0.0
    q, k = F.normalize(pred.float(), dim=-1), F.normalize(target.float(), dim=-1)
    labels = torch.arange(len(q), device=q.device)
    return 2 * tau * F.cross_entropy(q @ k.T / tau, labels) + 2 * tau * F.cross_entropy(k @ q.T / tau, labels)


# ---------------------------------------------------------------------------------------------
# The pre-training model
# ---------------------------------------------------------------------------------------------

class MutDetPretrainer(nn.Module):
    """ARS-DETR (one head set, pseudo-classes as labels) + mutual enhancement + contrastive
    alignment + the auxiliary siamese head, returning a dict of named losses.

    Two decoding passes share every weight of the head set:
      - enhanced: the memory is projected (`patch_enc_output` + LN, padding and invalid tokens
        zeroed first), enhanced with the image's object embeddings, and decoded; encoder proposals
        come from the shared encoder branches on F_enh, ranked by max_j cos(Ẑ_enc, O_enh_j) times the
        raw class-0 logit; losses prefixed `p_`;
      - siamese (auxiliary): plain ARS-DETR on the un-enhanced memory, as at fine-tuning.
    Every L_ca targets O_enh, so the alignment gradient reaches the enhancement module: the "mutual"
    optimisation. DETReg's row: `enhance=False, embed_loss="l1", dn_align=False` (its L1 embedding
    loss on the last decoder layer's matched queries of the plain decoder only, DETReg
    `deformable_detr.py:195-196, 413-414`; the DN alignment term is MutDet's addition,
    `MutDet_DOTA_Pretrain.py:33-35`; with 1 pseudo-class, class-agnostic).
    Both passes decode the same denoising queries with the same attention mask (drawn once).
    """

    def __init__(self, detector: detection.RotatedDETR, embed_dim: int, enhance: bool = True, align: bool = True,
                 siamese: bool = True, depth: int = 3, heads: int = 8, mlp: int = 2048,
                 embed_loss: Literal["infonce", "l1"] = "infonce", freeze_backbone: bool = False,
                 dn_align: bool = True):
        super().__init__()
        if len(detector.heads) != 1:
            raise ValueError("MutDet pre-trains one head set")
        self.detector = detector
        dim = self.head.dim
        if embed_dim != dim:
            raise ValueError(f"object embeddings ({embed_dim}-d) enter the enhancement module raw: they must be "
                             f"{dim}-d like the model")
        if embed_loss not in ("infonce", "l1"):
            raise ValueError(f"embed_loss must be infonce or l1, got {embed_loss!r}")
        self.enhance, self.align, self.siamese, self.embed_loss = enhance, align, siamese, embed_loss
        self.dn_align = dn_align
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:  # MutDet: frozen_stages=4 and `frozen_parameters=['backbone']`; the neck trains
            detector.backbone.requires_grad_(False)
        if not (enhance or siamese):
            raise ValueError("at least one of the enhanced and siamese branches must run")
        self.patch_enc_output, self.patch_enc_output_norm = nn.Linear(dim, dim), nn.LayerNorm(dim)
        self.enhancement = MutualEnhancement(dim, heads, mlp, depth)
        # Ẑ_enc head: 1024 hidden units at any width, as the official `patch_enc_decode`
        self.patch_enc_decode = nn.Sequential(nn.Linear(dim, 1024), nn.ReLU(), nn.Linear(1024, dim))
        self.feature_embed = detection.MLP(dim, dim, dim, 2)  # query hidden state -> predicted embedding Ẑ
        # the official transformer's init_weights: Xavier on every matrix of the modules it adds
        # (`template_matching.py:102-112, 130-141`); `feature_embed` sits in the head: Linear default
        for part in (self.patch_enc_output, self.enhancement, self.patch_enc_decode):
            for p in part.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)

    @property
    def head(self) -> detection.DETRHead:
        return next(iter(self.detector.heads.values()))

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_backbone:  # a frozen backbone also keeps its BatchNorm statistics (norm_eval)
            self.detector.backbone.eval()
        return self

    def forward(self, images, masks, targets: list) -> dict:
        """
        Args:
            images (B, 3, H, W), masks (B, H, W); targets per image dict(boxes (N, 5) le90 pixels,
            labels (N,) pseudo-classes, size (h, w), embeds (N, D) object embeddings).
        Returns:
            dict of named losses (detection terms of both branches, `*loss_embed` alignment terms).
        """
        det = self.detector
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            feats = det.backbone(images)
        feats = det.neck(feats)
        level_masks = [F.interpolate(masks[None].float(), size=f.shape[-2:])[0].bool() for f in feats]
        tgt = self.head.prepare_targets([t["boxes"] for t in targets], [t["labels"] for t in targets],
                                        [t["size"] for t in targets])
        embeds = [t["embeds"].to(images.device).float() for t in targets]
        enc = self.head.encode(feats, level_masks)
        dn = self.head.denoising_queries(tgt)  # one draw for both passes (official `headv7.py:105-108`)
        losses = {}
        objects_enh = embeds
        if self.enhance:
            out, objects_enh, z_enc = self.enhanced_pass(enc, embeds, tgt, dn)
            matches = {}
            for k, v in self.head.criterion(out, tgt, matches).items():
                losses[f"p_{k}"] = v
            if self.align:
                losses["p_loss_embed"] = self._alignment(out["hidden"], matches["last"], objects_enh)
                if self.dn_align:
                    losses["p_dn_loss_embed"] = self._alignment(out["dn_outputs"][-1]["hidden"],
                                                                _first_positives(out["dn_meta"]), objects_enh)
                losses["p_enc_loss_embed"] = self._alignment(z_enc, matches["enc"], objects_enh, project=False)
        if self.siamese:
            sel = self.head.select_queries(enc["memory"], enc["mask"], enc["shapes"])
            out = self.head.decode_queries(enc, sel, tgt, dn=dn)
            matches = {}
            losses.update(self.head.criterion(out, tgt, matches))
            if self.align:
                losses["loss_embed"] = self._alignment(out["hidden"], matches["last"], objects_enh)
                if self.dn_align:
                    losses["dn_loss_embed"] = self._alignment(out["dn_outputs"][-1]["hidden"],
                                                              _first_positives(out["dn_meta"]), objects_enh)
        return losses

    def enhanced_pass(self, enc: dict, embeds: list, tgt: list = None, dn: tuple = None) -> tuple:
        """The enhanced branch up to its head outputs: (outputs as `DETRHead.forward`'s, enhanced object
        embeddings O_enh per image (N, D), Ẑ_enc (B, S, D)). eval.py --attention draws from it."""
        _, anchors = self.head.proposals(enc["memory"], enc["mask"], enc["shapes"])
        valid = (anchors.abs() < 10000).all(-1, keepdim=True)  # (B, S, 1) tokens with a proposal
        patch = self.patch_enc_output_norm(self.patch_enc_output(enc["memory"].masked_fill(~valid, 0.0)))
        pairs = [self.enhancement(o, f) for o, f in zip(embeds, patch)]  # per image, as the official loop
        objects_enh = [o for o, _ in pairs]
        image_enh = torch.stack([f for _, f in pairs])  # (B, S, D)
        z_enc = F.normalize(self.patch_enc_decode(image_enh), dim=-1)  # Ẑ_enc, (B, S, D)
        sel = self.head.select_queries(enc["memory"], enc["mask"], enc["shapes"], tokens=image_enh,
                                       scores=enhanced_scores(z_enc, objects_enh))
        return self.head.decode_queries(enc, sel, tgt, memory=image_enh, dn=dn), objects_enh, z_enc

    def _alignment(self, hidden, indices, objects, project=True):
        """L_ca over the matched (query, object) pairs of the whole batch."""
        rows = [h[q] for h, (q, _) in zip(hidden, indices)]
        pred = torch.cat(rows) if rows else hidden.new_zeros(0, hidden.shape[-1])
        if project:
            pred = self.feature_embed(pred)
        target = torch.cat([o[c.to(o.device)] for o, (_, c) in zip(objects, indices)])
        if self.embed_loss == "l1":  # DETReg: L1 between predicted and target embeddings, mean
            return F.l1_loss(pred, target) if len(pred) else pred.sum() * 0.0
        return contrastive_alignment_loss(pred, target)


def build_pretrainer(cfg, classes: list, embed_dim: int, resnet: str = "", modality: str = "rgb") -> MutDetPretrainer:
    """The pre-training model of a MutDet config (`train.MutDetConfig`, or a run's config.json read as
    attributes): its ARS-DETR (one head set of `classes`, named by the cache's `modality`) inside the
    pre-trainer with the config's enhancement, alignment and siamese switches."""
    detector = detection.build_detector([dict(modality=modality, classes=list(classes), box_type="obb")], cfg.backbone,
                                        resnet, cfg.frozen_bn, cfg.dim, cfg.heads, cfg.levels, cfg.points,
                                        cfg.enc_layers, cfg.dec_layers, cfg.ffn, cfg.dropout, cfg.num_queries,
                                        cfg.num_dn_queries, cfg.gn_groups, match_costs=cfg.match_costs,
                                        match_l1=cfg.match_l1)
    return MutDetPretrainer(detector, embed_dim, cfg.enhance, cfg.align, cfg.siamese, cfg.enhance_depth,
                            cfg.enhance_heads, cfg.enhance_mlp, cfg.embed_loss, cfg.freeze_backbone, cfg.dn_align)


def enhanced_scores(z_enc: torch.Tensor, objects: list):
    """The ranking of the enhanced branch's encoder proposals, as a function of their class-0 logits:
        score_s = max_j cos(Ẑ_enc,s, O_enh,j) × logit_s,0
    with the raw logit, as the official code (`template_matching.py:452`). The logit starts near
    -4.6 (the focal prior), and while it is negative a higher similarity *lowers* the score, so
    early in training the top-k favours tokens unlike every object; we keep it for fidelity.
    z_enc: (B, S, D) normalised; objects: per image (N, D) -> function (B, S) -> (B, S)."""
    def scores(cls0):
        sim = torch.stack([(z @ F.normalize(o, dim=-1).T).amax(-1) if len(o) else torch.zeros_like(z[:, 0])
                           for z, o in zip(z_enc, objects)])  # (B, S)
        return sim * cls0
    return scores


def _first_positives(meta: dict) -> list:
    """The positive denoising copies of the first group, one per object (the official code takes the
    first Σ #GT positive slots, which with several groups can repeat an object; we take each once)."""
    out = []
    for slots, objects in meta["positives"]:
        n = len(objects) // max(meta["groups"], 1)
        out.append((slots[:n], objects[:n]))
    return out


# ---------------------------------------------------------------------------------------------
# After SAM: masks to le90 boxes, PCA and k-means pseudo-classes
# ---------------------------------------------------------------------------------------------

def convex_hull(points: np.ndarray) -> np.ndarray:
    """Andrew's monotone chain: (N, 2) -> hull vertices (H, 2) counter-clockwise, collinear dropped."""
    pts = np.unique(points.astype(np.float64), axis=0)
    if len(pts) < 3:
        return pts

    def turn(o, a, b):  # z of (a - o) x (b - o): > 0 for a left turn
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    def half(ps):
        out = []
        for p in ps:
            while len(out) >= 2 and turn(out[-2], out[-1], p) <= 0:
                out.pop()
            out.append(p)
        return out
    lower, upper = half(pts), half(pts[::-1])
    return np.array(lower[:-1] + upper[:-1])


def min_area_rect(points: np.ndarray) -> torch.Tensor:
    """The minimum-area rectangle of a point set (as cv2.minAreaRect) as a le90 box (5,): one side of
    the optimal rectangle lies on a hull edge, so every hull edge direction is tried."""
    hull = convex_hull(points)
    if len(hull) < 3:  # a point or a segment: a degenerate rectangle along it
        hull = np.concatenate([hull, hull[:1] + 1e-12]) if len(hull) else np.zeros((3, 2))
    edges = np.roll(hull, -1, axis=0) - hull
    angles = np.arctan2(edges[:, 1], edges[:, 0])  # (H,)
    c, s = np.cos(angles), np.sin(angles)
    u = hull @ np.stack([c, s])  # (V, H) coordinates along each edge direction
    v = hull @ np.stack([-s, c])
    area = (u.max(0) - u.min(0)) * (v.max(0) - v.min(0))
    k = int(np.argmin(area))
    cu, cv = (u[:, k].max() + u[:, k].min()) / 2, (v[:, k].max() + v[:, k].min()) / 2
    cx, cy = cu * c[k] - cv * s[k], cu * s[k] + cv * c[k]
    box = torch.tensor([cx, cy, u[:, k].max() - u[:, k].min(), v[:, k].max() - v[:, k].min(), angles[k]],
                       dtype=torch.float64)
    return ro.regularize_obb(box)


def mask_to_obb(mask: np.ndarray) -> torch.Tensor:
    """A binary mask (H, W) -> le90 box (5,) of its main part, as the official script does with
    OpenCV: the external contour with the most points (8-connected component with the longest
    boundary) -> minimum-area rectangle of its boundary pixel centres. An empty mask gives zeros."""
    from scipy import ndimage
    mask = np.asarray(mask, bool)
    labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
    if n == 0:
        return torch.zeros(5, dtype=torch.float64)
    # boundary pixels: those with a 4-neighbour outside the mask (the points of an 8-connected contour)
    boundary = mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(2, 1))
    counts = np.bincount(labels[boundary], minlength=n + 1)
    best = int(np.argmax(counts[1:])) + 1
    ys, xs = np.nonzero(boundary & (labels == best))
    return min_area_rect(np.stack([xs, ys], 1))


def fit_pca(x: torch.Tensor, dim: int):
    """PCA by SVD of the centred features: (N, C) -> (A (dim, C), b (dim,)) with z = x @ Aᵀ + b, the
    official `pca_feats = feats @ A.T + b` form (b = -mean @ Aᵀ)."""
    mean = x.mean(0)
    _, _, vt = torch.linalg.svd(x - mean, full_matrices=False)
    A = vt[:dim]
    return A, -mean @ A.T


def kmeans_cosine(x: torch.Tensor, k: int, iters: int = 50, seed: int = 0) -> torch.Tensor:
    """Spherical k-means (cosine similarity) of L2-normalised rows: (N, C) -> centres (k, C), unit
    norm; assignment is argmax of x @ centresᵀ, as the official labelling step. k-means++ seeding."""
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(x.double(), dim=-1)
    centres = [x[torch.randint(len(x), (1,), generator=g)].squeeze(0)]
    for _ in range(1, k):  # k-means++ on the cosine distance 1 - cos
        d = (1 - x @ torch.stack(centres).T).amin(1).clamp(min=0)
        p = d / d.sum() if d.sum() > 0 else torch.full_like(d, 1 / len(d))
        centres.append(x[torch.multinomial(p, 1, generator=g)].squeeze(0))
    centres = torch.stack(centres)
    for _ in range(iters):
        assign = (x @ centres.T).argmax(1)
        new = torch.zeros_like(centres).index_add_(0, assign, x)
        empty = new.norm(dim=1) == 0
        new[empty] = centres[empty]  # an empty cluster keeps its centre
        new = F.normalize(new, dim=-1)
        if torch.allclose(new, centres):
            break
        centres = new
    return centres.float()


# ---------------------------------------------------------------------------------------------
# SAM automatic mask generation (segment-anything's generator, single crop, with transformers' SAM)
# ---------------------------------------------------------------------------------------------

SAM_MEAN, SAM_STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


def build_point_grid(n: int) -> torch.Tensor:
    """n x n points at the cell centres of the unit square, (n², 2) as (x, y) (SAM `build_point_grid`)."""
    side = torch.linspace(1 / (2 * n), 1 - 1 / (2 * n), n, dtype=torch.float64)
    ys, xs = torch.meshgrid(side, side, indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], 1)


def stability_score(logits: torch.Tensor, offset: float, threshold: float = 0.0) -> torch.Tensor:
    """IoU of the masks thresholded at threshold ± offset: (..., H, W) -> (...)."""
    inter = (logits > threshold + offset).flatten(-2).sum(-1).float()
    union = (logits > threshold - offset).flatten(-2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter))


@torch.no_grad()
def generate_masks(sam, image: torch.Tensor, points_per_side: int = 32, points_per_batch: int = 64,
                   pred_iou_thresh: float = 0.88, stability_score_thresh: float = 0.95,
                   stability_score_offset: float = 1.0, box_nms_thresh: float = 0.7) -> dict:
    """Masks of everything in an image, as segment-anything's `SamAutomaticMaskGenerator` with its
    defaults (MutDet runs it unchanged): crop_n_layers = 0, so one crop, the whole image.

    Args:
        sam: a `transformers.SamModel`; image: (3, H, W) uint8 RGB.
        points_per_side: the prompt grid is points_per_side² single foreground points.
        points_per_batch: points decoded together.
        pred_iou_thresh: keep masks whose predicted IoU is above this (0..1).
        stability_score_thresh, stability_score_offset: keep masks whose IoU between the
            thresholds ±offset on the mask logits is at least this.
        box_nms_thresh: IoU of the masks' horizontal boxes above which the lower-scored is dropped.
    Returns:
        dict(masks (K, H, W) bool, iou (K,), stability (K,), boxes (K, 4) xyxy).
    """
    from torchvision.ops import batched_nms
    device = next(sam.parameters()).device
    size = sam.config.vision_config.image_size
    H, W = image.shape[-2:]
    # 1. resize the longer side to the model's input size, normalise, pad bottom-right
    scale = size / max(H, W)
    h, w = int(round(H * scale)), int(round(W * scale))
    x = F.interpolate(image[None].float(), size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    x = (x - x.new_tensor(SAM_MEAN).view(1, 3, 1, 1)) / x.new_tensor(SAM_STD).view(1, 3, 1, 1)
    x = F.pad(x, (0, size - w, 0, size - h)).to(device)
    embeddings = sam.get_image_embeddings(x)
    # 2. a grid of single-point prompts, in the resized frame
    points = (build_point_grid(points_per_side) * torch.tensor([W, H]) * scale).float().to(device)
    masks, ious, stabs = [], [], []
    for start in range(0, len(points), points_per_batch):
        p = points[start:start + points_per_batch]
        out = sam(image_embeddings=embeddings, input_points=p[None, :, None], multimask_output=True,
                  input_labels=torch.ones(1, len(p), 1, dtype=torch.long, device=device))
        logits = out.pred_masks[0].flatten(0, 1)  # (P·3, h_low, w_low), three masks a point
        iou = out.iou_scores[0].flatten()  # (P·3,)
        # 3. keep confident masks by predicted IoU; filtering before upsampling gives the same masks
        #    as segment-anything (which upsamples all) at a fraction of the cost
        keep = iou > pred_iou_thresh
        logits, iou = logits[keep], iou[keep]
        if not len(iou):
            continue
        # 4. low-resolution logits -> padded input size -> crop the padding -> original size
        logits = F.interpolate(logits[None], size=(size, size), mode="bilinear", align_corners=False)[..., :h, :w]
        logits = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)[0]
        # 5. stability under a threshold shifted by ±offset
        stab = stability_score(logits, stability_score_offset)
        keep = stab >= stability_score_thresh
        masks.append((logits[keep] > 0).cpu())
        ious.append(iou[keep].cpu())
        stabs.append(stab[keep].cpu())
    if not masks:  # no mask passed the predicted-IoU threshold
        return dict(masks=torch.zeros(0, H, W, dtype=torch.bool), iou=torch.zeros(0), stability=torch.zeros(0),
                    boxes=torch.zeros(0, 4))
    masks, ious, stabs = torch.cat(masks), torch.cat(ious), torch.cat(stabs)
    # 5. horizontal boxes of the masks, and box NMS with the predicted IoU as score
    rows, cols = masks.any(2), masks.any(1)  # (K, H), (K, W): which rows / columns a mask touches
    boxes = torch.stack([cols.float().argmax(1), rows.float().argmax(1),
                         W - 1 - cols.flip(1).float().argmax(1), H - 1 - rows.flip(1).float().argmax(1)], 1).float()
    nonempty = rows.any(1)
    masks, ious, stabs, boxes = masks[nonempty], ious[nonempty], stabs[nonempty], boxes[nonempty]
    keep = batched_nms(boxes, ious, torch.zeros(len(boxes), dtype=torch.long), box_nms_thresh)
    return dict(masks=masks[keep], iou=ious[keep], stability=stabs[keep], boxes=boxes[keep])


def colour_components(image: torch.Tensor, threshold: float = 45.0, min_area: int = 16) -> torch.Tensor:
    """A stand-in for SAM where no trained SAM is at hand (`--masks components`): the 8-connected
    regions of pixels whose colour lies more than `threshold` from the image's median colour, each at
    least `min_area` px. On SynthSOI (objects of flat colours on a noisy, uniform ground) these are
    the objects, as a trained SAM would find them; a random SAM's masks are noise.

    Args:
        image: (3, H, W) uint8.
    Returns:
        (K, H, W) bool masks, largest first.
    """
    from scipy import ndimage
    x = image.float()
    ground = x.flatten(1).median(1).values  # (3,)
    foreground = ((x - ground[:, None, None]).norm(dim=0) > threshold).numpy()
    labels, n = ndimage.label(foreground, structure=np.ones((3, 3)))
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    keep = [i + 1 for i in np.argsort(-areas, kind="stable") if areas[i] >= min_area]
    labels = torch.from_numpy(labels)
    return torch.stack([labels == i for i in keep]) if keep else torch.zeros(0, *image.shape[-2:], dtype=torch.bool)


def build_sam(path: str = "", image_size: int = 256):
    """SAM from a local `transformers` folder (SAM ViT-H in the paper), or a tiny random one."""
    from transformers import SamConfig, SamModel
    if path:
        return SamModel.from_pretrained(path, local_files_only=True).eval()
    cfg = SamConfig(vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_dim=64,
                                       output_channels=32, image_size=image_size, patch_size=16, window_size=4,
                                       global_attn_indexes=[1], num_pos_feats=16),
                    prompt_encoder_config=dict(hidden_size=32, image_size=image_size, patch_size=16),
                    mask_decoder_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_dim=64,
                                             iou_head_hidden_dim=32))
    return SamModel(cfg).eval()


def proposals_from_masks(masks: torch.Tensor, max_boxes: int = 1000, min_side: float = 2.0) -> tuple:
    """SAM masks -> le90 boxes, largest masks first (official order), sides under `min_side` px
    dropped, at most `max_boxes`. Returns (boxes (K, 5), kept mask indices (K,)) so that anything
    computed per mask (embeddings) is filtered together with its box; the official code drops
    boxes but not their embeddings, which then fall out of step (MutDet notes §2.4)."""
    order = torch.argsort(masks.flatten(1).sum(1), descending=True, stable=True)
    boxes, kept = [], []
    for i in order.tolist():
        b = mask_to_obb(masks[i].numpy())
        if b[2] >= min_side - 1e-6 and b[3] >= min_side - 1e-6:  # tolerance: the rectangle's sides are in float
            boxes.append(b)
            kept.append(i)
        if len(kept) == max_boxes:
            break
    if not boxes:
        return torch.zeros(0, 5, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    return torch.stack(boxes), torch.tensor(kept)


@torch.no_grad()
def object_embeddings(image: torch.Tensor, boxes: torch.Tensor, trunk: nn.Module, crop: int = 224,
                      context: float = 1.5, chunk: int = 64) -> torch.Tensor:
    """Embeddings of objects as MutDet extracts them: a rotated RoIAlign crop of each box, enlarged
    `context` times in w and h, straight from the normalised image (crop x crop, sampling ratio 2,
    aspect ratio not kept), through a frozen trunk, average-pooled.

    Args:
        image: (3, H, W) normalised; boxes: (K, 5) le90 pixels; trunk: image -> (N, C, h, w) maps
            (ResNet-50 up to layer4 in the paper: 2048-d).
    Returns:
        (K, C).
    """
    rois = torch.cat([torch.zeros(len(boxes), 1, dtype=boxes.dtype), boxes], 1).clone()
    rois[:, 3:5] *= context
    out = []
    for start in range(0, max(len(rois), 1), chunk):  # no box: one empty batch gives (0, C)
        crops = ro.roi_align_rotated(image[None].to(boxes.dtype), rois[start:start + chunk], (crop, crop),
                                     spatial_scale=1.0, sampling_ratio=2)  # (k, 3, crop, crop)
        out.append(trunk(crops.float()).mean((2, 3)))  # (k, C)
    return torch.cat(out)


def resnet_trunk(depth: str = "resnet50", weights: str = "") -> nn.Module:
    """torchvision ResNet up to layer4 (ImageNet weights from a local file in the paper), frozen."""
    backbone = detection.ResNetBackbone(depth, weights, frozen_bn=True, frozen_stages=4)
    trunk = nn.Sequential(backbone.stem, backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4).eval()
    for p in trunk.parameters():
        p.requires_grad_(False)
    return trunk


def pseudo_label_cache(run: Path, samples: list, clusters: int, pca_dim: int, fit_samples: int, seed: int) -> list:
    """Phase 2 of the sam stage: the raw features of every image (run/raw/<image>.safetensors) ->
    PCA to `pca_dim` and L2 normalisation -> spherical k-means -> one pseudo-class per box, written as
    run/cache/<image>.safetensors (boxes, labels, embeds), run/pca.safetensors and manifest.json.
    samples: [(modality, datasets.Sample)]. Returns the manifest's image list."""
    from safetensors.torch import load_file
    raws = {smp.name: load_file(str(run / "raw" / f"{smp.name}.safetensors")) for _, smp in samples}
    feats = torch.cat([r["feats"] for r in raws.values()]).double()
    if len(feats) < max(clusters, 2):
        raise datasets.DatasetError(f"{run}: {len(feats)} proposals in all, fewer than --clusters {clusters}")
    g = torch.Generator().manual_seed(seed)
    sample = feats[torch.randperm(len(feats), generator=g)[:fit_samples]]
    A, b = fit_pca(sample, min(pca_dim, sample.shape[1], len(sample)))
    if A.shape[0] < pca_dim:
        raise datasets.DatasetError(f"{run}: PCA to {pca_dim}-d needs at least that many features and proposals")
    centres = kmeans_cosine(F.normalize(sample @ A.T + b, dim=-1), clusters, seed=seed)
    datasets.save_tensors_atomic(run / "pca.safetensors", dict(pca_A=A.float(), pca_b=b.float(), ctrs=centres))
    images = []
    for modality, smp in samples:
        r = raws[smp.name]
        z = F.normalize(r["feats"].double() @ A.T + b, dim=-1).float()  # (K, pca_dim)
        labels = (z @ centres.T).argmax(1) if len(z) else torch.zeros(0, dtype=torch.long)
        datasets.save_tensors_atomic(run / "cache" / f"{smp.name}.safetensors", dict(boxes=r["boxes"], labels=labels, embeds=z))
        images.append(dict(name=smp.name, image=str(Path(smp.image).resolve()), modality=modality, boxes=len(z)))
    manifest = dict(classes=[f"cluster_{i + 1}" for i in range(clusters)], embed_dim=pca_dim, images=images)
    datasets.atomic_write_text(run / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    return images


# ---------------------------------------------------------------------------------------------
# Proposals without SAM (--proposals random | selective): MutDet's authors answered that these also
# serve where SAM fails (floatingstarZ/MutDet issue 3); DETReg pre-trains on selective search.
# ---------------------------------------------------------------------------------------------

def proposal_statistics(run) -> dict:
    """What `random_proposals` draws from: the boxes a finished sam run kept per image (counts) and
    their sides as fractions of the image's longer side (sides (K, 2) w >= h)."""
    from PIL import Image
    from safetensors.torch import load_file
    run = Path(run)
    if not (run / "manifest.json").exists():
        raise datasets.DatasetError(f"{run}: not a finished sam run (no manifest.json) for --proposals random")
    counts, sides = [], []
    for item in json.loads((run / "manifest.json").read_text())["images"]:
        boxes = load_file(str(run / "cache" / f"{item['name']}.safetensors"))["boxes"].double()
        with Image.open(item["image"]) as im:
            longer = max(im.size)
        counts.append(len(boxes))
        sides.append(boxes[:, 2:4] / longer)
    sides = torch.cat(sides) if sides else torch.zeros(0, 2, dtype=torch.float64)
    if not len(sides):
        raise datasets.DatasetError(f"{run}: the sam run kept no boxes to draw sizes from")
    return dict(counts=torch.tensor(counts), sides=sides)


def random_proposals(stats: dict, height: int, width: int, g: torch.Generator) -> torch.Tensor:
    """Random rotated boxes with the count and size distribution of a sam run (`proposal_statistics`):
    a count drawn from its images', that many (w, h) drawn from its boxes (scaled to this image's
    longer side), centres uniform over the image, angles uniform in [-π/2, π/2). -> (K, 5) le90."""
    k = int(stats["counts"][torch.randint(len(stats["counts"]), (1,), generator=g)])
    wh = stats["sides"][torch.randint(len(stats["sides"]), (k,), generator=g)] * max(height, width)
    centres = torch.rand(k, 2, generator=g, dtype=torch.float64) * torch.tensor([width, height], dtype=torch.float64)
    theta = (torch.rand(k, 1, generator=g, dtype=torch.float64) - 0.5) * np.pi
    return ro.regularize_obb(torch.cat([centres, wh, theta], 1))


def felzenszwalb(image: np.ndarray, k: float = 100.0, sigma: float = 0.8, min_size: int = 50) -> np.ndarray:
    """Graph-based segmentation (Felzenszwalb & Huttenlocher, IJCV 2004) on the colour image, as
    selective search starts from it: the 8-neighbour grid graph of the Gaussian-smoothed image with
    edge weights w = ||I(p) - I(q)||, edges in increasing weight, and components C1, C2 merged when
        w <= min(Int(C1) + k / |C1|, Int(C2) + k / |C2|)        (Eq. 4: MInt, τ(C) = k / |C|)
    with Int(C) the largest weight inside C; then components under `min_size` px join a neighbour
    along the remaining edges, in the same order.

    Args:
        image: (H, W, 3) uint8 or float.
    Returns:
        (H, W) int64 labels 0..n-1.
    """
    from scipy import ndimage
    H, W = image.shape[:2]
    x = np.stack([ndimage.gaussian_filter(image[..., c].astype(np.float64), sigma) for c in range(image.shape[2])], -1)
    idx = np.arange(H * W).reshape(H, W)
    pairs = [(idx[:, :-1], idx[:, 1:]), (idx[:-1, :], idx[1:, :]), (idx[:-1, :-1], idx[1:, 1:]), (idx[:-1, 1:], idx[1:, :-1])]
    a = np.concatenate([p.ravel() for p, _ in pairs])
    b = np.concatenate([q.ravel() for _, q in pairs])
    flat = x.reshape(-1, x.shape[-1])
    w = np.linalg.norm(flat[a] - flat[b], axis=1)
    order = np.argsort(w, kind="stable")
    a, b, w = a[order].tolist(), b[order].tolist(), w[order].tolist()
    parent, size, internal = list(range(H * W)), [1] * (H * W), [0.0] * (H * W)

    def find(i):
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:  # path compression
            parent[i], i = root, parent[i]
        return root
    for p, q, wt in zip(a, b, w):
        rp, rq = find(p), find(q)
        if rp != rq and wt <= min(internal[rp] + k / size[rp], internal[rq] + k / size[rq]):
            if size[rp] < size[rq]:
                rp, rq = rq, rp
            parent[rq], size[rp], internal[rp] = rp, size[rp] + size[rq], wt  # edges come sorted: wt is the max
    for p, q in zip(a, b):
        rp, rq = find(p), find(q)
        if rp != rq and (size[rp] < min_size or size[rq] < min_size):
            if size[rp] < size[rq]:
                rp, rq = rq, rp
            parent[rq], size[rp] = rp, size[rp] + size[rq]
    roots = np.array([find(i) for i in range(H * W)])
    return np.unique(roots, return_inverse=True)[1].reshape(H, W).astype(np.int64)


def _region_features(image: np.ndarray, labels: np.ndarray, n: int) -> tuple:
    """Per initial region: colour histograms (25 bins a channel) and texture histograms (Gaussian
    derivatives, σ = 1, in 8 orientations a channel, 10 bins each), each L1-normalised (Uijlings §3.2)."""
    from scipy import ndimage
    img = image.astype(np.float64)
    flat = labels.ravel()
    colour = [np.bincount(flat * 25 + np.minimum(img[..., c].ravel() / 256 * 25, 24).astype(np.int64), minlength=n * 25)
              .reshape(n, 25) for c in range(3)]
    texture = []
    for c in range(3):
        dy = ndimage.gaussian_filter(img[..., c], 1.0, order=(1, 0))
        dx = ndimage.gaussian_filter(img[..., c], 1.0, order=(0, 1))
        for t in np.arange(8) * np.pi / 4:
            r = np.maximum(np.cos(t) * dx + np.sin(t) * dy, 0)
            bins = np.minimum(r / max(r.max(), 1e-12) * 10, 9).astype(np.int64).ravel()
            texture.append(np.bincount(flat * 10 + bins, minlength=n * 10).reshape(n, 10))
    colour, texture = np.concatenate(colour, 1).astype(np.float64), np.concatenate(texture, 1).astype(np.float64)
    return colour / colour.sum(1, keepdims=True), texture / texture.sum(1, keepdims=True)


def selective_search(image: np.ndarray, k: float = 100.0, sigma: float = 0.8, min_size: int = 50,
                     max_boxes: int = 1000, seed: int = 0) -> torch.Tensor:
    """Selective search (Uijlings et al., IJCV 2013), one strategy (RGB, all four similarities) in
    pure NumPy: Felzenszwalb regions, then the most similar pair of neighbouring regions merged
    until one is left, with
        s(r_i, r_j) = s_colour + s_texture + s_size + s_fill                  (§3.2)
        s_colour, s_texture = Σ_k min(c_i^k, c_j^k);  s_size = 1 - (|r_i| + |r_j|) / |im|;
        s_fill = 1 - (|BB_ij| - |r_i| - |r_j|) / |im|
    Every region of the hierarchy is a proposal, ranked as in §3.3: the region made last is 1, the
    one before 2, ..., each times a uniform random number, ascending. As SAM masks become boxes
    here (`mask_to_obb`), a region's box is the minimum-area rectangle of its pixel centres, so the
    proposals are rotated (DETReg's, from OpenCV, are horizontal).

    Args:
        image: (H, W, 3) uint8.
    Returns:
        (K, 5) le90 boxes, K <= max_boxes, duplicates and sides under 2 px removed.
    """
    labels = felzenszwalb(image, k, sigma, min_size)
    H, W = labels.shape
    n = int(labels.max()) + 1
    colour, texture = _region_features(image, labels, n)
    ys, xs = np.mgrid[:H, :W]
    flat = labels.ravel()
    size = np.bincount(flat, minlength=n).astype(np.float64)
    bbox = np.stack([np.full(n, W), np.full(n, H), np.full(n, -1), np.full(n, -1)], 1).astype(np.float64)
    np.minimum.at(bbox[:, 0], flat, xs.ravel()), np.minimum.at(bbox[:, 1], flat, ys.ravel())
    np.maximum.at(bbox[:, 2], flat, xs.ravel()), np.maximum.at(bbox[:, 3], flat, ys.ravel())
    order = np.argsort(flat, kind="stable")
    starts = np.searchsorted(flat[order], np.arange(n + 1))
    pts = np.stack([xs.ravel(), ys.ravel()], 1)[order]
    hulls = [convex_hull(pts[starts[i]:starts[i + 1]]) for i in range(n)]
    # neighbouring regions: labels that differ across any of the 8-neighbour steps
    pairs = np.concatenate([np.stack([labels[:, :-1].ravel(), labels[:, 1:].ravel()], 1),
                            np.stack([labels[:-1].ravel(), labels[1:].ravel()], 1),
                            np.stack([labels[:-1, :-1].ravel(), labels[1:, 1:].ravel()], 1),
                            np.stack([labels[:-1, 1:].ravel(), labels[1:, :-1].ravel()], 1)])
    pairs = np.unique(np.sort(pairs[pairs[:, 0] != pairs[:, 1]], 1), axis=0)
    regions = {i: dict(size=size[i], bbox=bbox[i], colour=colour[i], texture=texture[i], hull=hulls[i]) for i in range(n)}
    total = float(H * W)

    def similarity(i, j):
        ri, rj = regions[i], regions[j]
        bb = np.concatenate([np.minimum(ri["bbox"][:2], rj["bbox"][:2]), np.maximum(ri["bbox"][2:], rj["bbox"][2:])])
        bb_area = (bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1)
        return (np.minimum(ri["colour"], rj["colour"]).sum() + np.minimum(ri["texture"], rj["texture"]).sum()
                + 1 - (ri["size"] + rj["size"]) / total + 1 - (bb_area - ri["size"] - rj["size"]) / total)
    sims = {(int(i), int(j)): similarity(int(i), int(j)) for i, j in pairs}
    made = list(range(n))  # regions in the order they were made
    while sims:
        i, j = max(sims, key=sims.get)
        ri, rj, t = regions[i], regions[j], len(regions)
        s = ri["size"] + rj["size"]
        regions[t] = dict(size=s, bbox=np.concatenate([np.minimum(ri["bbox"][:2], rj["bbox"][:2]),
                                                       np.maximum(ri["bbox"][2:], rj["bbox"][2:])]),
                          colour=(ri["size"] * ri["colour"] + rj["size"] * rj["colour"]) / s,
                          texture=(ri["size"] * ri["texture"] + rj["size"] * rj["texture"]) / s,
                          hull=convex_hull(np.concatenate([ri["hull"], rj["hull"]])))
        made.append(t)
        neighbours = {b if a in (i, j) else a for a, b in sims if a in (i, j) or b in (i, j)} - {i, j}
        sims = {p: v for p, v in sims.items() if i not in p and j not in p}
        sims.update({(m, t): similarity(m, t) for m in neighbours})
    rng = np.random.default_rng(seed)
    rank = np.arange(len(made), 0, -1) * rng.random(len(made))  # the last region made is 1 (§3.3)
    boxes, seen = [], set()
    for r in np.argsort(rank, kind="stable"):
        box = min_area_rect(regions[made[r]]["hull"])
        key = tuple(np.round(box.numpy(), 3))
        if key not in seen and min(box[2], box[3]) >= datasets.MIN_SIDE - 1e-6:  # as SAM's boxes (proposals_from_masks)
            seen.add(key)
            boxes.append(box)
        if len(boxes) == max_boxes:
            break
    return torch.stack(boxes) if boxes else torch.zeros(0, 5, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# The pseudo-label cache as a training set, and the pre-trained detector for fine-tuning
# ---------------------------------------------------------------------------------------------

class PseudoLabels(torch.utils.data.Dataset):
    """A `sam` run folder (manifest.json + cache/<image>.safetensors) as a detection split: each item
    is the image with its SAM boxes (le90, pixels of the stored image), pseudo-classes and object
    embeddings. The transforms keep the embeddings with their boxes (datasets.PER_OBJECT).

    `class_agnostic`: every box is class 0 of 1 (DETReg's objectness row, `--pseudo-classes 1`)."""

    def __init__(self, root, class_agnostic: bool = False):
        self.root = Path(root)
        manifest = self.root / "manifest.json"
        if not manifest.exists():
            raise datasets.DatasetError(f"{self.root}: not a sam cache (no manifest.json); make one with "
                                        f"`python train.py --stage sam --out {self.root}`")
        try:
            meta = json.loads(manifest.read_text())
        except json.JSONDecodeError as e:
            raise datasets.DatasetError(f"{manifest}:{e.lineno}: not valid JSON ({e.msg})") from None
        except (OSError, UnicodeDecodeError) as e:
            raise datasets.DatasetError(f"{manifest}: cannot read as UTF-8 text ({e.__class__.__name__})") from None
        missing = {"classes", "embed_dim", "images"} - set(meta) if isinstance(meta, dict) else {"classes"}
        if missing:
            raise datasets.DatasetError(f"{manifest}: not a sam manifest (no {', '.join(sorted(missing))})")
        record = {"name": str, "image": str, "modality": str, "boxes": int}
        if (not isinstance(meta["classes"], list) or not meta["classes"] or type(meta["embed_dim"]) is not int
                or meta["embed_dim"] < 1 or not isinstance(meta["images"], list)
                or not all(isinstance(r, dict) and all(type(r.get(k)) is t for k, t in record.items())
                           and r["modality"] in ("rgb", "sar", "ir") for r in meta["images"])):
            raise datasets.DatasetError(f"{manifest}: not a sam manifest: classes (a list), embed_dim (a number) and "
                                        "images ({name, image, modality, boxes}) expected")
        self.clusters, self.embed_dim = meta["classes"], meta["embed_dim"]
        self.records = [r for r in meta["images"] if r["boxes"] > 0]  # DETReg, too, skips images without proposals
        self.classes = ["object"] if class_agnostic else self.clusters
        self.class_agnostic = class_agnostic
        if not self.records:
            raise datasets.DatasetError(f"{manifest}: the cache holds no image with a proposal")
        for r in self.records:
            if not Path(r["image"]).is_file():
                raise datasets.DatasetError(f"{manifest}: image {r['image']} (of {r['name']}) not found; the cache "
                                            "names its images by absolute path: rerun the sam stage where they are")
            if not (self.root / "cache" / f"{r['name']}.safetensors").exists():
                raise datasets.DatasetError(f"{self.root / 'cache' / (r['name'] + '.safetensors')}: missing "
                                            f"(listed in {manifest}); rerun the sam stage with --out {self.root}")
        self.modality = self.records[0]["modality"]
        self.box_type, self.source, self.transform = "obb", 0, None

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        from safetensors.torch import load_file
        r = self.records[i]
        path = self.root / "cache" / f"{r['name']}.safetensors"
        try:
            c = load_file(str(path))
            ok = (c["boxes"].ndim == 2 and c["boxes"].shape[1] == 5 and len(c["labels"]) == len(c["boxes"])
                  == len(c["embeds"]) and c["embeds"].shape[-1] == self.embed_dim
                  and bool(torch.isfinite(c["boxes"]).all()) and bool(torch.isfinite(c["embeds"]).all())
                  and bool(((c["labels"] >= 0) & (c["labels"] < len(self.clusters))).all()))
        except Exception as e:  # noqa: BLE001 -- safetensors raises its own error types on a damaged file
            raise datasets.DatasetError(f"{path}: cannot read the cached proposals ({e.__class__.__name__})") from None
        if not ok:
            raise datasets.DatasetError(f"{path}: cached proposals do not fit {self.root / 'manifest.json'} (shapes, "
                                        "non-finite boxes or embeddings, or labels outside its classes); rerun the sam stage")
        image = torch.from_numpy(datasets.load_image(r["image"])).permute(2, 0, 1).contiguous()  # (3, H, W) uint8
        labels = torch.zeros_like(c["labels"]) if self.class_agnostic else c["labels"].long()
        item = dict(image=image, boxes=c["boxes"].float(), labels=labels, embeds=c["embeds"].float(),
                    difficult=torch.zeros(len(labels), dtype=torch.bool), name=r["name"], modality=r["modality"],
                    source=0, index=i, orig_size=tuple(image.shape[-2:]))
        return self.transform(item) if self.transform is not None else item


CLASS_DEPENDENT = (".cls_branches.", ".label_embedding.")  # sized by the pseudo-classes


def pretrained_detector(state: dict, modalities: list) -> tuple:
    """The weights of a MutDet (or DETReg-row) pre-training checkpoint as fine-tuning loads them:
    the `detector.` prefix stripped; the enhancement module, `patch_enc_*` and `feature_embed`
    dropped (pre-training only); the class branches and the denoising label embedding dropped, so
    they start afresh as the official fine-tuning's re-initialised 256-way head (README: "parameter
    mismatch" warnings), also when the class counts happen to agree; the one pre-trained head set
    copied to every head set (modality) of the fine-tuning model. Returns (state, dropped keys)."""
    out, dropped = {}, []
    for key, value in state.items():
        if not key.startswith("detector.") or any(c in key for c in CLASS_DEPENDENT):
            dropped.append(key)
            continue
        key = key[len("detector."):]
        if key.startswith("heads."):
            rest = key.split(".", 2)[2]
            out.update({f"heads.{m}.{rest}": value for m in modalities})
        else:
            out[key] = value
    return out, dropped


def load_official(model, path: str, state: dict) -> None:
    """An mmrotate checkpoint (`state_dict` with mmrotate / mmcv names) into our detector through
    `detection.mmrotate_to_ours`. A fine-tuned ARS-DETR must match tensor for tensor (any missing,
    unexpected or mismatched tensor is an error naming it). A MutDet / DETReg-row pre-training
    checkpoint loads as the official `load_from` does: its pre-training modules and class branches
    are dropped, and what the fine-tuning model has beyond it (deeper layers) starts fresh; both
    are listed by name."""
    file_state = state
    ours, unused = detection.mmrotate_to_ours(state)
    levels = next(iter(model.heads.values())).levels
    if "H.level_embed" in ours and len(ours["H.level_embed"]) > levels:
        # the official transformer is built with num_feature_levels=5 (dn_ars_rotated_transformer.py:88, no
        # config overrides it) but its forward reads level_embeds[lvl] of the neck's 4 levels only (:290)
        unused.append(f"bbox_head.transformer.level_embeds rows {levels}..{len(ours['H.level_embed']) - 1}")
        ours["H.level_embed"] = ours["H.level_embed"][:levels]
    pretraining = any(k.startswith(("enhancement.", "patch_enc", "feature_embed.")) for k in ours)
    modalities = list(model.heads)
    if pretraining:  # our pre-trainer's names, then the fine-tuning load of a mutdet run
        wrapped = {("detector." + k.replace("H.", "heads.pre.", 1) if k.startswith(("backbone.", "neck.", "H.")) else k): v
                   for k, v in ours.items()}
        state, dropped = pretrained_detector(wrapped, modalities)
    else:
        state, dropped = {}, []
        for k, v in ours.items():
            state.update({f"heads.{m}.{k[2:]}": v for m in modalities} if k.startswith("H.") else {k: v})
    own = model.state_dict()
    # our name -> the file's, so that an error names the tensor as the user's file does
    origin = {next(iter(detection.mmrotate_to_ours({k: v})[0]), None): k for k, v in file_state.items()}

    def named(k):
        o = origin.get("H." + k.split(".", 2)[2] if k.startswith("heads.") else k.removeprefix("detector."))
        return f"{k} ({o} in the file)" if o else k
    bad = [f"unexpected {named(k)}" for k in state if k not in own]
    bad += [f"shape {named(k)}: {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} here"
            for k in state if k in own and own[k].shape != state[k].shape]
    missing = [k for k in own if k not in state]
    if not pretraining:
        bad += [f"missing {k}" for k in missing]
    if bad:
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise ValueError(f"--init {path}: an mmrotate checkpoint that does not fit this model: "
                         + "; ".join(bad[:5]) + more)
    model.load_state_dict(state, strict=False)
    kind = "MutDet / DETReg-row pre-training" if pretraining else "ARS-DETR"
    print(f"--init {path}: an mmrotate {kind} checkpoint; loaded {len(state)} tensors, dropped {len(unused)} unused "
          f"by the official forward and {len(dropped)} of pre-training / class branches; {len(missing)} start fresh")
    for name, keys in (("dropped (unused officially)", unused), ("dropped", dropped), ("start fresh", missing)):
        for k in keys:
            print(f"  {name}: {k}")
