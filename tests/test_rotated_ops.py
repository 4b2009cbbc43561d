import math

import numpy as np
import pytest
import shapely
import torch

import rotated_ops as ro
from conftest import exact_iou, random_boxes, shapely_iou, shapely_polys

PI = math.pi


# ---------------------------------------------------------------- conversions and conventions

def test_obb2poly_is_clockwise_on_screen_and_le90():
    # θ > 0 turns clockwise on screen (y down): the w-side's right end goes down
    box = torch.tensor([[10.0, 20.0, 4.0, 2.0, PI / 2 - 1e-9]])
    poly = ro.obb2poly(box)[0].view(4, 2)
    assert torch.allclose(poly, torch.tensor([[11.0, 18.0], [11.0, 22.0], [9.0, 22.0], [9.0, 18.0]]), atol=1e-6)
    box0 = torch.tensor([[0.0, 0.0, 4.0, 2.0, 0.0]])
    assert ro.obb2poly(box0)[0].tolist() == [-2.0, -1.0, 2.0, -1.0, 2.0, 1.0, -2.0, 1.0]


def test_norm_angle_and_regularize():
    t = torch.linspace(-10, 10, 1001, dtype=torch.float64)
    n = ro.norm_angle(t)
    assert (n >= -PI / 2).all() and (n < PI / 2).all()
    assert torch.allclose(torch.cos(2 * (n - t)), torch.ones_like(t), atol=1e-9)  # same line mod π
    b = torch.tensor([[0.0, 0.0, 2.0, 5.0, 0.3]], dtype=torch.float64)
    r = ro.regularize_obb(b)
    assert r[0, 2] == 5 and r[0, 3] == 2 and abs(r[0, 4].item() - (0.3 + PI / 2 - PI)) < 1e-12
    # the same rectangle either way
    assert shapely.area(shapely.intersection(shapely_polys(b), shapely_polys(r)))[0] == pytest.approx(10.0)


def test_poly2obb_roundtrip_random_boxes():
    b = ro.regularize_obb(random_boxes(500, seed=1))
    b = b[(b[:, 2] - b[:, 3]) > 1e-3]  # squares have two equivalent angles
    back = ro.poly2obb(ro.obb2poly(b))
    assert torch.allclose(back[:, :4], b[:, :4], atol=1e-8)
    assert torch.allclose(torch.cos(2 * (back[:, 4] - b[:, 4])), torch.ones(len(b), dtype=b.dtype), atol=1e-12)
    assert (back[:, 2] >= back[:, 3]).all() and (back[:, 4] >= -PI / 2).all() and (back[:, 4] < PI / 2).all()


def test_poly2obb_minimum_area_rectangle_of_any_quadrilateral():
    g = torch.Generator().manual_seed(3)
    quads = torch.rand(300, 8, generator=g, dtype=torch.float64) * 100
    obb = ro.poly2obb(quads)
    ref = shapely.minimum_rotated_rectangle(shapely.multipoints(quads.view(-1, 4, 2).numpy()))
    assert np.allclose((obb[:, 2] * obb[:, 3]).numpy(), shapely.area(ref), rtol=1e-9, atol=1e-9)
    grown = shapely.buffer(shapely_polys(obb), 1e-7)  # the rectangle contains the quad's corners
    assert shapely.contains(grown[:, None], shapely.points(quads.view(-1, 4, 2).numpy())).all()
    # vertex order does not matter
    perm = quads.view(-1, 4, 2)[:, [2, 0, 3, 1]].reshape(-1, 8)
    perm_obb = ro.poly2obb(perm)  # (ties between equal-area rectangles may pick another one)
    assert np.allclose((perm_obb[:, 2] * perm_obb[:, 3]).numpy(), shapely.area(ref), rtol=1e-9)


def test_obb2hbb_and_hbb2obb():
    b = random_boxes(200, seed=2)
    hbb = ro.obb2hbb(b)
    ref = shapely.bounds(shapely_polys(b))
    assert np.allclose(hbb.numpy(), ref, atol=1e-9)
    o = ro.hbb2obb(torch.tensor([[0.0, 0.0, 2.0, 4.0], [0.0, 0.0, 6.0, 2.0]]))
    assert torch.allclose(o, torch.tensor([[1.0, 2.0, 4.0, 2.0, -PI / 2], [3.0, 1.0, 6.0, 2.0, 0.0]]))
    assert torch.allclose(ro.obb2hbb(o), torch.tensor([[0.0, 0.0, 2.0, 4.0], [0.0, 0.0, 6.0, 2.0]]), atol=1e-6)


# ---------------------------------------------------------------- rotated IoU

@pytest.mark.parametrize("canvas", [64.0, 1024.0])
def test_iou_matches_shapely_random(canvas):
    b1, b2 = random_boxes(250, canvas, seed=4), random_boxes(230, canvas, seed=5)
    ref = shapely_iou(b1, b2)
    assert np.abs(ro.box_iou_rotated(b1, b2).numpy() - ref).max() < 1e-9
    out32 = ro.box_iou_rotated(b1.float(), b2.float())
    assert out32.dtype == torch.float32
    ref32 = shapely_iou(b1.float().double(), b2.float().double())
    assert np.abs(out32.double().numpy() - ref32).max() < 1e-5
    iof = ro.box_iou_rotated(b1, b2, mode="iof").numpy()
    assert np.abs(iof - shapely_iou(b1, b2, mode="iof")).max() < 1e-9


def test_iou_aligned_and_chunking():
    b1, b2 = random_boxes(200, seed=6), random_boxes(200, seed=7)
    full = ro.box_iou_rotated(b1, b2)
    assert torch.allclose(ro.box_iou_rotated(b1, b2, aligned=True), full.diagonal(), atol=0)
    assert torch.allclose(ro.box_iou_rotated(b1, b2, chunk_size=997), full, atol=1e-15)
    assert ro.box_iou_rotated(b1[:0], b2).shape == (0, 200)
    assert ro.box_iou_rotated(b1.half()[:5], b2.half()[:5]).dtype == torch.float16


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_iou_corner_cases(dtype, tol):
    cases = [
        ((0, 0, 4, 2, 0.3), (0, 0, 4, 2, 0.3), 1.0),                      # identical
        ((5, 5, 3, 3, PI / 4), (5, 5, 3, 3, PI / 4), 1.0),                # identical 45° square
        ((0, 0, 4, 2, 0.3), (0, 0, 4, 2, 0.3 + PI), 1.0),                 # θ + π
        ((0, 0, 4, 2, 0.3), (0, 0, 2, 4, 0.3 + PI / 2), 1.0),             # w <-> h, θ + π/2
        ((0, 0, 2, 2, 0), (2, 0, 2, 2, 0), 0.0),                          # shared edge only
        ((0, 0, 2, 2, 0), (2, 1, 2, 2, 0), 0.0),                          # partly shared edge
        ((0, 0, 2, 2, 0), (2, 2, 2, 2, 0), 0.0),                          # shared corner
        ((0, 0, 2, 2, 0), (1, 0, 2, 2, 0), 1 / 3),                        # collinear edges, half overlap
        ((0, 0, 10, 10, 0), (0, 0, 2, 2, 0.5), 0.04),                     # nested
        ((0, 0, 4, 2, 0), (0, 0, 4, 2, PI / 2), 4 / 12),                  # 90° apart
        ((0, 0, 2, 2, 0), (0, 0, 0, 2, 0.2), 0.0),                        # zero-width box
        ((0, 0, 0, 0, 0), (0, 0, 0, 0, 0), 0.0),                          # two points
    ]
    b1 = torch.tensor([c[0] for c in cases], dtype=dtype)
    b2 = torch.tensor([c[1] for c in cases], dtype=dtype)
    want = torch.tensor([c[2] for c in cases], dtype=torch.float64)
    got = ro.box_iou_rotated(b1, b2, aligned=True).double()
    assert (got - want).abs().max() < tol, (got, want)
    got_sym = ro.box_iou_rotated(b2, b1, aligned=True).double()
    assert (got_sym - want).abs().max() < tol


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_iou_scale_cases_against_shapely(dtype, tol):
    b1, b2 = random_boxes(400, seed=8), random_boxes(400, seed=9)
    for scale, offset in [(1 / 1024, 0.0), (1.0, 1e4), (1e-5, 0.0)]:  # normalised, far, tiny
        x1, x2 = b1.clone(), b2.clone()
        x1[:, :4] *= scale
        x2[:, :4] *= scale
        x1[:, :2] += offset
        x2[:, :2] += offset
        x1, x2 = x1.to(dtype), x2.to(dtype)
        ref = shapely_iou(x1.double(), x2.double(), aligned=True)
        got = ro.box_iou_rotated(x1, x2, aligned=True).double().numpy()
        assert np.abs(got - ref).max() < tol, (scale, offset)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_iou_near_parallel(dtype, tol):
    b1 = random_boxes(400, seed=10)
    for turn in (1e-4, 1e-7):
        b2 = b1.clone()
        b2[:, 4] += turn
        b2[:, :2] += torch.linspace(-8, 8, 400, dtype=torch.float64)[:, None]
        x1, x2 = b1.to(dtype), b2.to(dtype)
        ref = shapely_iou(x1.double(), x2.double(), aligned=True)
        got = ro.box_iou_rotated(x1, x2, aligned=True).double().numpy()
        # float32 cannot resolve a 1e-7 turn of an angle of order 1: allow its rounding of the input
        limit = tol if (dtype == torch.float64 or turn > 1e-6) else 1e-4
        assert np.abs(got - ref).max() < limit


def test_iou_shared_edges_exact_rational_reference():
    # boxes moved by whole and half sides along their own axes and turned by multiples of 90°:
    # every edge is shared, collinear or touching. shapely (GEOS) is not robust here.
    b1 = random_boxes(60, seed=11)
    g = torch.Generator().manual_seed(12)
    shifts = torch.randint(-2, 3, (60, 2), generator=g).double() / 2
    u = torch.stack([b1[:, 4].cos(), b1[:, 4].sin()], 1)
    v = torch.stack([-b1[:, 4].sin(), b1[:, 4].cos()], 1)
    b2 = b1.clone()
    b2[:, :2] = b1[:, :2] + shifts[:, :1] * b1[:, 2:3] * u + shifts[:, 1:] * b1[:, 3:4] * v
    turns = torch.randint(0, 4, (60,), generator=g).double()
    b2[:, 4] += turns * PI
    got = ro.box_iou_rotated(b1, b2, aligned=True)
    want = torch.tensor([exact_iou(b1[i], b2[i]) for i in range(60)], dtype=torch.float64)
    assert (got - want).abs().max() < 1e-9
    assert set(np.round(want.numpy(), 6)) >= {0.0, 1.0, round(1 / 3, 6)}  # the family covers these


def test_iou_gradients_finite_and_correct():
    b1 = random_boxes(12, canvas=20, seed=13, min_side=5, max_side=30).requires_grad_()
    b2 = random_boxes(12, canvas=20, seed=14, min_side=5, max_side=30).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, y: ro.box_iou_rotated(x, y, aligned=True), (b1, b2))
    same = torch.tensor([[3.0, 4.0, 5.0, 2.0, 0.4]], dtype=torch.float64, requires_grad=True)
    iou = ro.box_iou_rotated(same, same.detach().clone(), aligned=True)
    iou.sum().backward()
    assert iou.item() == pytest.approx(1.0) and torch.isfinite(same.grad).all()


# ---------------------------------------------------------------- NMS

def _greedy_nms_reference(boxes, scores, thr):
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    iou = shapely_iou(boxes, boxes)
    keep = []
    for i in order:
        if all(iou[i, k] <= thr for k in keep):
            keep.append(i)
    return keep


def test_nms_matches_greedy_reference():
    b = random_boxes(300, canvas=300, seed=15, min_side=5, max_side=60)
    g = torch.Generator().manual_seed(16)
    scores = torch.randint(0, 20, (300,), generator=g).double()  # many ties
    for thr in (0.1, 0.5):
        keep = ro.nms_rotated(b, scores, thr)
        assert keep.tolist() == _greedy_nms_reference(b, scores.tolist(), thr)


def test_nms_threshold_is_strict_and_ties_are_stable():
    boxes = torch.tensor([[0.0, 0, 2, 2, 0], [1.0, 0, 2, 2, 0], [0.0, 0, 2, 2, 0]], dtype=torch.float64)
    scores = torch.tensor([0.9, 0.8, 0.9], dtype=torch.float64)
    # IoU(0,1) = 1/3 exactly: kept at threshold 1/3 (suppression needs IoU > thr)
    assert ro.nms_rotated(boxes[:2], scores[:2], 1 / 3).tolist() == [0, 1]
    assert ro.nms_rotated(boxes[:2], scores[:2], 0.3).tolist() == [0]
    assert ro.nms_rotated(boxes, scores, 0.5).tolist() == [0, 1]  # 2 ties with 0 and comes later


def test_batched_nms_equals_per_class():
    b = random_boxes(200, canvas=200, seed=17, min_side=5, max_side=60)
    g = torch.Generator().manual_seed(18)
    scores = torch.rand(200, generator=g, dtype=torch.float64)
    idxs = torch.randint(0, 4, (200,), generator=g)
    keep = ro.batched_nms_rotated(b, scores, idxs, 0.3)
    expected = []
    for c in range(4):
        ids = torch.nonzero(idxs == c).squeeze(1)
        expected += ids[ro.nms_rotated(b[ids], scores[ids], 0.3)].tolist()
    assert sorted(keep.tolist()) == sorted(expected)
    assert (scores[keep][:-1] >= scores[keep][1:]).all()


# ---------------------------------------------------------------- rotated RoIAlign

def _bilinear_mmcv(img, y, x):
    H, W = img.shape[-2:]
    if y < -1.0 or y > H or x < -1.0 or x > W:
        return torch.zeros(img.shape[0], dtype=img.dtype)
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= H - 1:
        y_high = y_low = H - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= W - 1:
        x_high = x_low = W - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1 - ly, 1 - lx
    return (hy * hx * img[:, y_low, x_low] + hy * lx * img[:, y_low, x_high]
            + ly * hx * img[:, y_high, x_low] + ly * lx * img[:, y_high, x_high])


def _roi_align_loop(feat, rois, oh, ow, scale, sr):
    """A plain transcription of mmcv's RoIAlignRotated (aligned=True, clockwise=True)."""
    out = torch.zeros(len(rois), feat.shape[1], oh, ow, dtype=feat.dtype)
    for k, (bi, cx, cy, w, h, t) in enumerate(rois.tolist()):
        cx, cy, w, h = cx * scale - 0.5, cy * scale - 0.5, w * scale, h * scale
        theta = -t  # clockwise=True reverses the angle inside mmcv's kernel
        c, s = math.cos(theta), math.sin(theta)
        for ph in range(oh):
            for pw in range(ow):
                acc = 0
                for iy in range(sr):
                    yy = -h / 2 + ph * h / oh + (iy + 0.5) * h / oh / sr
                    for ix in range(sr):
                        xx = -w / 2 + pw * w / ow + (ix + 0.5) * w / ow / sr
                        y = yy * c - xx * s + cy
                        x = yy * s + xx * c + cx
                        acc = acc + _bilinear_mmcv(feat[int(bi)], y, x)
                out[k, :, ph, pw] = acc / (sr * sr)
    return out


def test_roi_align_rotated_matches_plain_loop():
    g = torch.Generator().manual_seed(19)
    feat = torch.rand(2, 3, 13, 17, generator=g, dtype=torch.float64)
    rois = torch.tensor([[0, 20.0, 12.0, 18.0, 9.0, 0.4], [1, 5.0, 30.0, 40.0, 10.0, -1.2],
                         [1, 0.0, 0.0, 12.0, 12.0, 0.0], [0, 33.0, 25.0, 7.0, 3.0, 1.5]], dtype=torch.float64)
    for sr in (1, 2):
        got = ro.roi_align_rotated(feat, rois, (3, 4), spatial_scale=0.5, sampling_ratio=sr, max_points=50)
        want = _roi_align_loop(feat, rois, 3, 4, 0.5, sr)
        assert torch.allclose(got, want, atol=1e-12)


def test_roi_align_rotated_reads_the_rotated_patch():
    # an image whose value is its x coordinate: a box turned by 90° reads x along its h axis
    img = torch.arange(32, dtype=torch.float64).repeat(32, 1)[None, None]
    roi = torch.tensor([[0, 16.5, 16.5, 8.0, 4.0, PI / 2]], dtype=torch.float64)
    out = ro.roi_align_rotated(img, roi, (2, 4), sampling_ratio=1)[0, 0]
    assert torch.allclose(out[:, 0], out[:, 3])  # along w (now vertical): x is constant
    assert out[1, 0] < out[0, 0]  # h axis points to -x after a clockwise turn by 90°


# ---------------------------------------------------------------- AR-CSL angle coder

def _official_ar_csl(r):
    """The closed form in ARS-DETR's coder for aspect ratio r, offsets -90..89 (normalised)."""
    ang = np.abs(np.arange(-90, 90)) * PI / 180
    ang[90] = 1e-6
    ind = int(2 * (PI / 2 - math.atan(r)) / PI * 180)
    iou1 = 4 / (8 * r * np.sin(ang) - 4)
    x = (1 - r * np.tan(ang / 2)) * np.tan(ang)
    y = (-2 * np.sin(ang / 2) ** 2 + r * np.sin(ang)) / np.cos(ang)
    iou2 = (4 * r * np.tan(ang) - x * x - y * y) / (4 * r * np.tan(ang) + x * x + y * y)
    iou1[90 - ind: 90 + ind + 1] = iou2[90 - ind: 90 + ind + 1]
    return (iou1 - iou1.min()) / (1 - iou1.min())


@pytest.mark.parametrize("r", [1.5, 2.0, 4.0, 8.0])
def test_ar_csl_window_matches_official_closed_form(r):
    ours = ro.ar_csl_window(torch.tensor([r], dtype=torch.float64))[0].numpy()
    ref = _official_ar_csl(r)
    assert np.abs(ours[1:] - ref[1:]).max() < 1e-5  # offset -90° is degenerate in the closed form
    assert ours[90] == pytest.approx(1.0) and ours.min() == pytest.approx(0.0)


def test_csl_encode_decode():
    theta = torch.tensor([-PI / 2, -0.7, 0.0, 0.3, PI / 2 - 1e-6], dtype=torch.float64)
    ratio = torch.tensor([1.0, 2.0, 3.0, 8.0, 1.2], dtype=torch.float64)
    target = ro.csl_encode(theta, ratio)
    assert target.shape == (5, 180)
    assert (target.argmax(-1) == ro.angle_to_bin(theta)).all()
    assert (ro.csl_decode(target) - theta).abs().max() <= math.radians(0.5) + 1e-9
    assert target[0].sum() > target[3].sum()  # square-ish boxes get a wider label
    assert target[0, 0] == pytest.approx(1.0) and target[0, 90] == pytest.approx(1.0)  # a square at ±90°
