"""Pure tensor functions on oriented boxes: conversions, exact IoU, NMS, rotated RoIAlign, AR-CSL.

The angle convention, stated once for the whole project (mmrotate's "le90"):

    An oriented box is (cx, cy, w, h, θ) in pixels with θ in radians, w >= h and θ ∈ [-π/2, π/2).
    The image y axis points down and positive θ turns clockwise on screen: the w-side of the box
    points along (cos θ, sin θ) and the h-side along (-sin θ, cos θ). This is mmcv's
    `box_iou_rotated(..., clockwise=True)` and `RoIAlignRotated(clockwise=True)`, so numbers and
    checkpoints compare directly with mmrotate-based code (ARS-DETR, MutDet, SM3Det / BabelRS).

A polygon is (x1, y1, ..., x4, y4) as in DOTA files; `obb2poly` lists the corners in the order
top-left, top-right, bottom-right, bottom-left of the unrotated box (clockwise on screen), which is
torchvision's XYXYXYXY order. A horizontal box is (x1, y1, x2, y2).

Every function is stateless, leaves its inputs untouched, works on any device, in float32 and
float64 (half precision is computed in float32), and is differentiable where that makes sense.

Shape letters: N, M boxes; P box pairs; K regions of interest; B images; C channels.

May import: torch and numpy only (the bottom of the import graph, DESIGN.md).
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

ANGLE_BINS = 180  # ARS-DETR: one bin per degree over the le90 range of 180°
# Corners of the unit box in its own frame, in obb2poly order: (-,-), (+,-), (+,+), (-,+).
_CORNER_SIGNS = ((-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0))


def _check_boxes(boxes: torch.Tensor, name: str = "boxes") -> None:
    if boxes.shape[-1] != 5:
        raise ValueError(f"{name} must have 5 columns (cx, cy, w, h, θ), got shape {tuple(boxes.shape)}")


def _working_dtype(t: torch.Tensor) -> torch.dtype:
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


# ---------------------------------------------------------------------------------------------
# Conversions
# ---------------------------------------------------------------------------------------------

def norm_angle(theta: torch.Tensor) -> torch.Tensor:
    """Wrap angles (radians) into the le90 range [-π/2, π/2)."""
    wrapped = torch.remainder(theta + math.pi / 2, math.pi) - math.pi / 2
    return torch.where(wrapped >= math.pi / 2, wrapped - math.pi, wrapped)  # remainder may round up to π


def regularize_obb(boxes: torch.Tensor) -> torch.Tensor:
    """Bring any (cx, cy, w, h, θ) to le90: swap w/h (and turn by π/2) where w < h, wrap θ."""
    _check_boxes(boxes)
    cx, cy, w, h, t = boxes.unbind(-1)
    swap = w < h
    w, h = torch.where(swap, h, w), torch.where(swap, w, h)
    t = norm_angle(torch.where(swap, t + math.pi / 2, t))
    return torch.stack([cx, cy, w, h, t], dim=-1)


def _box_axes(boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit vectors of the w-side and h-side: (..., 2) each."""
    cos, sin = boxes[..., 4].cos(), boxes[..., 4].sin()
    return torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)


def obb_corners(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 5) -> (..., 4, 2) corners in obb2poly order."""
    _check_boxes(boxes)
    u, v = _box_axes(boxes)
    signs = boxes.new_tensor(_CORNER_SIGNS)  # (4, 2)
    half_w = boxes[..., 2:3, None] / 2  # (..., 1, 1)
    half_h = boxes[..., 3:4, None] / 2
    return (boxes[..., None, :2]
            + signs[:, :1] * half_w * u[..., None, :]
            + signs[:, 1:] * half_h * v[..., None, :])  # (..., 4, 2)


def obb2poly(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 5) oriented boxes -> (..., 8) polygons (x1, y1, ..., x4, y4)."""
    return obb_corners(boxes).flatten(-2)


def obb2hbb(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 5) oriented boxes -> (..., 4) enclosing horizontal boxes (x1, y1, x2, y2)."""
    _check_boxes(boxes)
    cx, cy, w, h, t = boxes.unbind(-1)
    cos, sin = t.cos().abs(), t.sin().abs()
    half_x = (w * cos + h * sin) / 2
    half_y = (w * sin + h * cos) / 2
    return torch.stack([cx - half_x, cy - half_y, cx + half_x, cy + half_y], dim=-1)


def hbb2obb(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) horizontal boxes (x1, y1, x2, y2) -> (..., 5) le90 oriented boxes."""
    if boxes.shape[-1] != 4:
        raise ValueError(f"horizontal boxes must have 4 columns (x1, y1, x2, y2), got {tuple(boxes.shape)}")
    x1, y1, x2, y2 = boxes.unbind(-1)
    obb = torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1, torch.zeros_like(x1)], dim=-1)
    return regularize_obb(obb)


def hbb_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1)


def hbb_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def poly2obb(polys: torch.Tensor) -> torch.Tensor:
    """(..., 8) quadrilaterals -> (..., 5) le90 minimum-area enclosing rectangles.

    Like `cv2.minAreaRect` (which mmrotate's `poly2obb_np_le90` calls): the minimum-area rectangle
    has a side along an edge of the convex hull, and the hull edges of four points are among the six
    point pairs, so we try all six directions (diagonals only give larger rectangles) and keep the
    smallest. Works for any vertex order, non-convex and degenerate quadrilaterals.
    """
    if polys.shape[-1] != 8:
        raise ValueError(f"polygons must have 8 columns (x1, y1, ..., x4, y4), got {tuple(polys.shape)}")
    dtype = _working_dtype(polys)
    pts = polys.to(dtype).reshape(*polys.shape[:-1], 4, 2)  # (..., 4, 2)
    i, j = torch.tensor([0, 0, 0, 1, 1, 2]), torch.tensor([1, 2, 3, 2, 3, 3])
    d = pts[..., j, :] - pts[..., i, :]  # (..., 6, 2) candidate directions
    length = d.norm(dim=-1, keepdim=True)  # (..., 6, 1)
    u = d / length.clamp_min(torch.finfo(dtype).tiny)
    v = torch.stack([-u[..., 1], u[..., 0]], dim=-1)
    proj_u = torch.einsum("...kc,...dc->...dk", pts, u)  # (..., 6, 4)
    proj_v = torch.einsum("...kc,...dc->...dk", pts, v)
    w = proj_u.amax(-1) - proj_u.amin(-1)  # (..., 6)
    h = proj_v.amax(-1) - proj_v.amin(-1)
    area = torch.where(length[..., 0] > 0, w * h, torch.full_like(w, math.inf))
    best = area.argmin(-1, keepdim=True)  # (..., 1)

    def pick(x):  # (..., 6[, 2]) -> the entry of the best direction
        idx = best if x.dim() == best.dim() else best[..., None].expand(*best.shape, x.shape[-1])
        return x.gather(-2 if x.dim() > best.dim() else -1, idx).squeeze(-2 if x.dim() > best.dim() else -1)

    ub, vb = pick(u), pick(v)  # (..., 2)
    mid_u = (proj_u.amax(-1) + proj_u.amin(-1)) / 2
    mid_v = (proj_v.amax(-1) + proj_v.amin(-1)) / 2
    center = pick(mid_u)[..., None] * ub + pick(mid_v)[..., None] * vb  # (..., 2)
    theta = torch.atan2(ub[..., 1], ub[..., 0])
    obb = torch.cat([center, pick(w)[..., None], pick(h)[..., None], theta[..., None]], dim=-1)
    return regularize_obb(obb).to(polys.dtype)


# ---------------------------------------------------------------------------------------------
# Exact intersection of two rectangles
# ---------------------------------------------------------------------------------------------

def _slab_clip(p, dp, h, tol, same_side_lo, same_side_hi):
    """Liang-Barsky clip of edges p + t·dp (t ∈ [0, 1]), (4, P), to the slab -h <= p <= h, h: (P,).

    Returns the parameters where each edge meets p = -h and p = +h, the entering and leaving
    parameter, whether the edge is empty, whether it is parallel to the slab (then its parameters
    mean nothing), and whether it lies on the line p = -h / p = +h (within `tol`; such an edge is
    kept only if the two boxes lie on the same side of that line).
    """
    near_lo, near_hi = (p + h).abs() <= tol, (p - h).abs() <= tol  # corner i on a line
    on_lo = near_lo & near_lo.roll(-1, 0)  # both ends of edge i
    on_hi = near_hi & near_hi.roll(-1, 0)
    flat = (dp.abs() <= 1e-3 * tol) | on_lo | on_hi  # parallel to the slab
    safe = torch.where(flat, 1.0, dp)
    t_lo, t_hi = (-h - p) / safe, (h - p) / safe
    enter = torch.minimum(t_lo, t_hi).masked_fill(flat, -math.inf)  # t_lo < t_hi where dp > 0
    leave = torch.maximum(t_lo, t_hi).masked_fill(flat, math.inf)
    empty = ((on_lo & ~same_side_lo) | (on_hi & ~same_side_hi)
             | (flat & ~on_lo & ~on_hi & ((p < -h) | (p > h))))
    return t_lo, t_hi, enter, leave, empty, flat, on_lo, on_hi


def _edge_extent(cross, skip_below, skip_above, gone, h):
    """Length of a side of box 2 inside box 1: the interval [-h, h] (h: (P,)) cut at `cross` (4, P)
    by box 1's lines, from below or from above (the `skip_*` masks leave out the lines that do
    not cut that way, parallel ones included). `gone`: a line that empties the side (parallel to it
    with the side outside, or a collinear edge of box 1, which already counts that segment)."""
    lo = torch.maximum(-h, cross.masked_fill(skip_below, -math.inf).amax(0))
    hi = torch.minimum(h, cross.masked_fill(skip_above, math.inf).amin(0))
    return (hi - lo).clamp_min(0).masked_fill(gone.any(0), 0)


def _intersection_area(b1: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """Exact area of the intersection of aligned pairs of rectangles, (5, P) x (5, P) -> (P,).

    Work in the frame of box 2, where it is the axis-aligned [-a, a] x [-b, b]. The boundary of the
    intersection is made of the parts of each box's edges that lie inside the other box, so by
    Green's theorem its area is Σ ½ cross(start, end) over those parts: ½ (t1 - t0) cross(A, D) for
    the part t ∈ [t0, t1] of an edge A + t·D of box 1 (a Liang-Barsky clip to box 2's two slabs),
    and ½ b (x1 - x0) or ½ a (y1 - y0) for the part of a side of box 2 inside box 1 (an interval cut
    by box 1's four lines). No vertex list, no sorting. Three details make it exact and stable:
    - box 1 is expressed relative to box 2's centre, so float32 keeps its digits far from the image
      origin (boxes at 1e4 px);
    - where an edge of box 1 crosses a side line of box 2, both read their clip off the same
      crossing parameter, so rounding in ill-conditioned near-parallel crossings cancels;
    - edges on a common line (shared or overlapping edges, identical boxes) count once: box 1's edge
      is kept when both boxes lie on the same side of the line, both are dropped when they lie on
      opposite sides (touching boxes). "On the line" uses a tolerance relative to the boxes' size,
      so normalised [0, 1] coordinates behave as pixels do.
    The layout is corner-major, pairs last: the boxes come as (5, P) columns and every intermediate
    is (4, P) or (P,), so each elementwise loop runs along contiguous pairs (vectorised) and the
    reductions over the 4 corners add rows (the layout alone: the same values, 1.7x faster than
    pairs first).
    """
    cx1, cy1, w1, h1, t1 = b1.unbind(0)  # (P,) each
    cx2, cy2, w2, h2, t2 = b2.unbind(0)
    a, b = w2 / 2, h2 / 2  # half sizes of box 2
    cos1, sin1, cos2, sin2 = t1.cos(), t1.sin(), t2.cos(), t2.sin()
    along_w = b1.new_tensor(_CORNER_SIGNS)[:, 0, None] * (w1 / 2)  # (4, P) corner offsets along u1, v1
    along_h = b1.new_tensor(_CORNER_SIGNS)[:, 1, None] * (h1 / 2)
    rx = (cx1 - cx2) + along_w * cos1 + along_h * -sin1  # (4, P) box 1's corners about box 2's centre
    ry = (cy1 - cy2) + along_w * sin1 + along_h * cos1
    x = rx * cos2 + ry * sin2  # (4, P) box 1's corners in box 2's frame, counter-clockwise
    y = rx * -sin2 + ry * cos2
    dx, dy = x.roll(-1, 0) - x, y.roll(-1, 0) - y  # (4, P) box 1's edges, corner i to i + 1
    scale = torch.maximum(torch.maximum(x.abs(), y.abs()).amax(0), torch.maximum(a, b))
    tol = 64 * torch.finfo(b1.dtype).eps * scale  # (P,)

    # box 1's edges clipped to box 2 (interior on the left of each edge)
    dx_pos, dx_neg, dy_pos, dy_neg = dx > 0, dx < 0, dy > 0, dy < 0
    tx_lo, tx_hi, enter_x, leave_x, empty_x, flat_x, on_left, on_right = _slab_clip(x, dx, a, tol, dy_neg, dy_pos)
    ty_lo, ty_hi, enter_y, leave_y, empty_y, flat_y, on_bottom, on_top = _slab_clip(y, dy, b, tol, dx_pos, dx_neg)
    t0 = torch.maximum(enter_x, enter_y).clamp_min(0)
    t1 = torch.minimum(leave_x, leave_y).clamp_max(1)
    span = (t1 - t0).clamp_min(0).masked_fill(empty_x | empty_y, 0)  # (4, P)
    area1 = 0.5 * (span * (x * dy - y * dx)).sum(0)

    # box 2's sides clipped to box 1: where box 1's line i crosses each side line (the same t as
    # above). A point lies inside line i where cross(D_i, point - A_i) >= 0, so on a horizontal
    # side the line bounds x from below when dy < 0; on a vertical side, y from below when dx > 0.
    # A parallel line empties the side where the side lies outside it (cross < 0).
    skip_below_h, skip_above_h = flat_y | ~dy_neg, flat_y | ~dy_pos  # (4, P), shared by both sides
    skip_below_v, skip_above_v = flat_x | ~dx_pos, flat_x | ~dx_neg
    bottom = _edge_extent(x + ty_lo * dx, skip_below_h, skip_above_h, on_bottom | flat_y & (dx * (-b - y) < 0), a)
    top = _edge_extent(x + ty_hi * dx, skip_below_h, skip_above_h, on_top | flat_y & (dx * (b - y) < 0), a)
    right = _edge_extent(y + tx_hi * dy, skip_below_v, skip_above_v, on_right | flat_x & (dy * (x - a) < 0), b)
    left = _edge_extent(y + tx_lo * dy, skip_below_v, skip_above_v, on_left | flat_x & (dy * (x + a) < 0), b)
    area2 = 0.5 * (b * (bottom + top) + a * (right + left))
    return (area1 + area2).clamp_min(0)


def _pair_iou(b1: torch.Tensor, b2: torch.Tensor, mode: str) -> torch.Tensor:
    """IoU / IoF of aligned pairs given as columns, (5, P) x (5, P) -> (P,)."""
    inter = _intersection_area(b1, b2)
    area1 = b1[2] * b1[3]
    area2 = b2[2] * b2[3]
    inter = torch.minimum(inter, torch.minimum(area1, area2))
    denom = area1 if mode == "iof" else area1 + area2 - inter
    return torch.where(denom > 0, inter / torch.where(denom > 0, denom, 1.0), 0.0)


def _hbb_meet(h1: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
    """Whether enclosing horizontal boxes (..., 4) overlap (touching counts): only then can boxes meet."""
    return (h1[..., 0] <= h2[..., 2]) & (h2[..., 0] <= h1[..., 2]) & (h1[..., 1] <= h2[..., 3]) & (h2[..., 1] <= h1[..., 3])


def _candidate_pairs(b1: torch.Tensor, b2: torch.Tensor, block: int):
    """Index pairs (i, j) whose enclosing horizontal boxes overlap (only they can intersect)."""
    h1, h2 = obb2hbb(b1.detach()), obb2hbb(b2.detach())
    rows, cols = [], []
    step = max(1, block // max(1, len(b2)))
    for s in range(0, len(b1), step):
        i, j = _hbb_meet(h1[s:s + step, None], h2[None]).nonzero(as_tuple=True)  # (n, M) mask
        rows.append(i + s)
        cols.append(j)
    return torch.cat(rows), torch.cat(cols)


def _iou_of_pairs(b1: torch.Tensor, b2: torch.Tensor, i: torch.Tensor, j: torch.Tensor, mode: str,
                  chunk_size: int) -> torch.Tensor:
    """IoU of the pairs (b1[i[k]], b2[j[k]]): (N, 5), (M, 5), (P,) indices -> (P,), in chunks, each
    gathered straight into the columns (5, chunk) that `_intersection_area` works on."""
    c1, c2 = b1.t().contiguous(), b2.t().contiguous()  # (5, N), (5, M)
    if len(i) == 0:
        return b1.new_zeros(0)
    return torch.cat([_pair_iou(c1.index_select(1, i[s:s + chunk_size]), c2.index_select(1, j[s:s + chunk_size]), mode)
                      for s in range(0, len(i), chunk_size)])


def box_iou_rotated(boxes1: torch.Tensor, boxes2: torch.Tensor, aligned: bool = False,
                    mode: str = "iou", chunk_size: int = 1 << 16) -> torch.Tensor:
    """Exact IoU (or IoF) of oriented boxes.

    Args:
        boxes1: (N, 5) boxes (cx, cy, w, h, θ), θ in radians, w, h >= 0 (any angle range).
        boxes2: (M, 5) boxes; with `aligned`, M == N.
        aligned: compare boxes1[i] with boxes2[i] only.
        mode: "iou" = |A∩B| / |A∪B|; "iof" = |A∩B| / |A| with A from boxes1.
        chunk_size: box pairs computed at once; bounds memory (about 1 kB per pair in float64).
    Returns:
        (N, M) or, when aligned, (N,) in the dtype of the inputs (half precision is computed in
        float32). Pairs whose enclosing horizontal boxes do not meet are 0 without computation.
        Degenerate pairs (zero union) are 0. Differentiable, with finite gradients for identical boxes.
    """
    if mode not in ("iou", "iof"):
        raise ValueError(f"mode must be 'iou' or 'iof', got {mode!r}")
    _check_boxes(boxes1, "boxes1")
    _check_boxes(boxes2, "boxes2")
    out_dtype = torch.promote_types(boxes1.dtype, boxes2.dtype)
    dtype = _working_dtype(torch.empty(0, dtype=out_dtype))
    b1, b2 = boxes1.to(dtype), boxes2.to(dtype)
    if aligned:
        if len(b1) != len(b2):
            raise ValueError(f"aligned IoU needs as many boxes1 as boxes2, got {len(b1)} and {len(b2)}")
        meet = _hbb_meet(obb2hbb(b1.detach()), obb2hbb(b2.detach())).nonzero(as_tuple=True)[0]
        out = b1.new_zeros(len(b1)).index_put((meet,), _iou_of_pairs(b1, b2, meet, meet, mode, chunk_size))
        return out.to(out_dtype)
    n, m = len(b1), len(b2)
    if n == 0 or m == 0:
        return b1.new_zeros(n, m).to(out_dtype)
    ii, jj = _candidate_pairs(b1, b2, block=chunk_size * 16)
    out = b1.new_zeros(n, m).index_put((ii, jj), _iou_of_pairs(b1, b2, ii, jj, mode, chunk_size))
    return out.to(out_dtype)


# ---------------------------------------------------------------------------------------------
# Non-maximum suppression
# ---------------------------------------------------------------------------------------------

def nms_rotated(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy rotated NMS.

    A box is suppressed by a higher-scoring kept box when their IoU is strictly greater than
    `iou_threshold` (`>`, as the DOTA devkit's merge script and mmcv's CUDA kernel; mmcv's CPU kernel
    uses `>=`). Tied scores keep their input order (stable sort), so results are deterministic.

    Args:
        boxes: (N, 5) oriented boxes. scores: (N,). iou_threshold: in [0, 1].
    Returns:
        keep: (K,) int64 indices into `boxes`, by decreasing score.
    """
    _check_boxes(boxes)
    if scores.shape != boxes.shape[:1]:
        raise ValueError(f"scores must have shape ({len(boxes)},), got {tuple(scores.shape)}")
    if len(boxes) == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = torch.sort(scores.detach(), descending=True, stable=True).indices
    b = boxes.detach()[order]
    b = b.to(_working_dtype(b))
    ii, jj = _candidate_pairs(b, b, block=1 << 22)
    later = jj > ii  # only a higher-ranked box suppresses a lower-ranked one
    ii, jj = ii[later], jj[later]
    hit = _iou_of_pairs(b, b, ii, jj, "iou", 1 << 16) > iou_threshold
    ii, jj = ii[hit].cpu().numpy(), jj[hit].cpu().numpy()
    # neighbours of each rank, as a CSR list (ii is sorted because pairs come out row by row)
    starts = np.searchsorted(ii, np.arange(len(b) + 1))
    removed = np.zeros(len(b), dtype=bool)
    keep = []
    for r in range(len(b)):
        if removed[r]:
            continue
        keep.append(r)
        removed[jj[starts[r]:starts[r + 1]]] = True
    return order[torch.as_tensor(keep, dtype=torch.long, device=order.device)]


def batched_nms_rotated(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor,
                        iou_threshold: float) -> torch.Tensor:
    """Rotated NMS within each category of `idxs` (N,); same threshold rule as `nms_rotated`.

    Returns (K,) indices by decreasing score (ties in input order).
    """
    if idxs.shape != scores.shape:
        raise ValueError(f"idxs must have the shape of scores {tuple(scores.shape)}, got {tuple(idxs.shape)}")
    keep = [torch.nonzero(idxs == c).squeeze(1)[nms_rotated(boxes[idxs == c], scores[idxs == c], iou_threshold)]
            for c in torch.unique(idxs)]
    if not keep:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    keep = torch.cat(keep)
    keep = keep.sort().values  # input order first, so the stable sort below breaks ties by it
    return keep[torch.sort(scores[keep], descending=True, stable=True).indices]


# ---------------------------------------------------------------------------------------------
# Rotated RoIAlign
# ---------------------------------------------------------------------------------------------

def roi_align_rotated(features: torch.Tensor, rois: torch.Tensor, output_size,
                      spatial_scale: float = 1.0, sampling_ratio: int = 2,
                      max_points: int = 1 << 22) -> torch.Tensor:
    """Rotated RoIAlign with mmcv's `RoIAlignRotated(aligned=True, clockwise=True)` semantics.

    Each output bin averages sampling_ratio x sampling_ratio bilinear samples placed at the centres
    of a regular sub-grid of the bin. A pixel's centre is at integer coordinates after the half-pixel
    shift (aligned=True); samples more than one pixel outside the map read 0, samples within one
    pixel of the border read the border (mmcv's bilinear_interpolate).

    Args:
        features: (B, C, H, W) feature maps.
        rois: (K, 6) rows [batch_idx, cx, cy, w, h, θ] in input-image pixels, θ as in this module.
        output_size: int or (oh, ow).
        spatial_scale: feature-map size / image size (1/stride).
        sampling_ratio: samples per bin side, >= 1 (mmcv's adaptive 0 is not supported).
        max_points: sampling points computed at once (bounds memory).
    Returns:
        (K, C, oh, ow).
    """
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    if features.dim() != 4:
        raise ValueError(f"features must be (B, C, H, W), got {tuple(features.shape)}")
    if rois.dim() != 2 or rois.shape[1] != 6:
        raise ValueError(f"rois must be (K, 6) [batch_idx, cx, cy, w, h, θ], got {tuple(rois.shape)}")
    if sampling_ratio < 1:
        raise ValueError(f"sampling_ratio must be >= 1, got {sampling_ratio}")
    B, C, H, W = features.shape
    K, sr = len(rois), sampling_ratio
    out = features.new_zeros(K, C, oh, ow)
    if K == 0:
        return out
    rois = rois.to(features.dtype)
    cx = rois[:, 1] * spatial_scale - 0.5  # aligned=True: pixel centres at integer coordinates
    cy = rois[:, 2] * spatial_scale - 0.5
    w, h = rois[:, 3] * spatial_scale, rois[:, 4] * spatial_scale
    cos, sin = rois[:, 5].cos(), rois[:, 5].sin()
    # sample positions in the RoI frame, (oh*sr) x (ow*sr) per RoI, from -extent/2 to +extent/2
    frac_y = (torch.arange(oh * sr, device=features.device, dtype=features.dtype) + 0.5) / (oh * sr) - 0.5
    frac_x = (torch.arange(ow * sr, device=features.device, dtype=features.dtype) + 0.5) / (ow * sr) - 0.5
    yy = h[:, None, None] * frac_y[None, :, None]  # (K, oh*sr, 1)
    xx = w[:, None, None] * frac_x[None, None, :]  # (K, 1, ow*sr)
    x = cx[:, None, None] + xx * cos[:, None, None] - yy * sin[:, None, None]  # (K, oh*sr, ow*sr)
    y = cy[:, None, None] + xx * sin[:, None, None] + yy * cos[:, None, None]
    valid = (y >= -1) & (y <= H) & (x >= -1) & (x <= W)
    grid = torch.stack([(2 * x + 1) / W - 1, (2 * y + 1) / H - 1], dim=-1)  # grid_sample's [-1, 1]
    batch = rois[:, 0].long()
    per_chunk = max(1, max_points // (oh * sr * ow * sr))
    for b in torch.unique(batch).tolist():
        idx = torch.nonzero(batch == b).squeeze(1)
        for s in range(0, len(idx), per_chunk):
            k = idx[s:s + per_chunk]
            g = grid[k].reshape(1, len(k) * oh * sr, ow * sr, 2)
            v = F.grid_sample(features[b:b + 1], g, mode="bilinear", padding_mode="border",
                              align_corners=False)  # (1, C, k*oh*sr, ow*sr)
            v = v.reshape(C, len(k), oh * sr, ow * sr).transpose(0, 1) * valid[k][:, None]
            out[k] = v.reshape(len(k), C, oh, sr, ow, sr).mean(dim=(3, 5))
    return out


# ---------------------------------------------------------------------------------------------
# ARS-DETR angle coder: 180-bin circular smooth label with aspect-ratio-aware smoothing (AR-CSL)
# ---------------------------------------------------------------------------------------------

def ar_csl_window(aspect_ratio: torch.Tensor) -> torch.Tensor:
    """AR-CSL smoothing values for bin offsets δ = -90°, ..., 89°: (N,) ratios -> (N, 180).

    ARS-DETR smooths the one-hot angle label with the IoU between the ground-truth box and the same
    box turned by δ, then min-max normalises each row (`window='aspect_ratio', normalize=True`), so
    the label of an elongated box is sharp and that of a square-ish box is wide. The IoU has a
    closed form (the official `aspect_ratio_smooth`, here without its per-row loop): for a box of
    sides r >= 1 and 1 turned by φ = |δ|,
        φ beyond the critical angle φ_c = π - 2·atan(r): the overlap is the rhombus of the two
            short-side strips, IoU = 1 / (2r·sin φ - 1);
        φ <= φ_c (in whole degrees, as the official index): the turned box cuts four corner
            triangles, IoU = (4r·tan φ - a² - b²) / (4r·tan φ + a² + b²) with
            a = (1 - r·tan(φ/2))·tan φ, b = (r·sin φ - 2·sin²(φ/2)) / cos φ.
    It is exact for every ratio, squares included (at δ = -90° the second branch gives 1);
    `ar_csl_window_exact` evaluates the same IoUs with `box_iou_rotated`, and the tests hold the
    two together. The coder's `radius=6` is not used by this window in the official code either.
    """
    dt = _working_dtype(aspect_ratio)
    r = aspect_ratio.to(dt).clamp_min(1.0)[:, None]  # (N, 1) w / h >= 1 under le90
    degrees = torch.arange(-ANGLE_BINS // 2, ANGLE_BINS // 2, device=r.device, dtype=dt)
    phi = (degrees.abs() * (math.pi / 180)).clamp_min(1e-6)[None]  # (1, 180); δ = 0 is set to 1 below
    rhombus = 1 / (2 * r * phi.sin() - 1)  # (N, 180)
    a = (1 - r * (phi / 2).tan()) * phi.tan()
    b = (r * phi.sin() - 2 * (phi / 2).sin() ** 2) / phi.cos()
    t = 4 * r * phi.tan()
    corners = (t - a * a - b * b) / (t + a * a + b * b)
    critical = torch.floor(torch.rad2deg(math.pi - 2 * torch.atan(r)))  # (N, 1) whole degrees
    iou = torch.where(degrees.abs()[None] <= critical, corners, rhombus)
    iou = torch.where(degrees[None] == 0, torch.ones_like(iou), iou)
    low = iou.amin(-1, keepdim=True)
    return (iou - low) / (1 - low).clamp_min(torch.finfo(dt).eps)


def ar_csl_window_exact(aspect_ratio: torch.Tensor) -> torch.Tensor:
    """`ar_csl_window` by exact polygon IoU (`box_iou_rotated`): the reference it is tested against."""
    r = aspect_ratio.to(_working_dtype(aspect_ratio)).clamp_min(1.0)
    deltas = torch.arange(-ANGLE_BINS // 2, ANGLE_BINS // 2, device=r.device, dtype=r.dtype) * (math.pi / 180)
    n = len(r)
    base = torch.stack([torch.zeros_like(r), torch.zeros_like(r), r, torch.ones_like(r), torch.zeros_like(r)], -1)
    turned = base[:, None].repeat(1, ANGLE_BINS, 1)  # (N, 180, 5)
    turned[..., 4] = deltas
    iou = box_iou_rotated(base[:, None].expand(-1, ANGLE_BINS, -1).reshape(-1, 5),
                          turned.reshape(-1, 5), aligned=True).reshape(n, ANGLE_BINS)
    low = iou.amin(-1, keepdim=True)
    return (iou - low) / (1 - low).clamp_min(torch.finfo(r.dtype).eps)


def angle_to_bin(theta: torch.Tensor) -> torch.Tensor:
    """le90 angle (radians) -> bin index in [0, 180): floor(degrees + 90), as the official coder."""
    return (torch.rad2deg(norm_angle(theta)) + ANGLE_BINS // 2).floor().long().clamp(0, ANGLE_BINS - 1)


def csl_encode(theta: torch.Tensor, aspect_ratio: torch.Tensor) -> torch.Tensor:
    """AR-CSL soft targets: (N,) angles, (N,) aspect ratios max(w, h) / min(w, h) -> (N, 180)."""
    window = ar_csl_window(aspect_ratio)  # (N, 180) value at offset δ = k - 90
    offsets = torch.arange(-ANGLE_BINS // 2, ANGLE_BINS // 2, device=theta.device)
    cols = (angle_to_bin(theta)[:, None] + offsets[None]) % ANGLE_BINS  # (N, 180)
    return window.new_zeros(len(theta), ANGLE_BINS).scatter(1, cols, window)


def csl_decode(logits: torch.Tensor) -> torch.Tensor:
    """(..., 180) angle logits -> (...) le90 angles in radians at the centre of the best bin."""
    k = logits.argmax(-1).to(torch.float32 if logits.dtype not in (torch.float32, torch.float64) else logits.dtype)
    return torch.deg2rad((k + 0.5) - ANGLE_BINS // 2)
