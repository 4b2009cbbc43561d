import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rotated_ops  # noqa: E402


def shapely_polys(boxes):
    import shapely
    corners = rotated_ops.obb_corners(torch.as_tensor(boxes, dtype=torch.float64))
    return shapely.polygons(corners.reshape(-1, 4, 2).numpy())


def shapely_iou(b1, b2, aligned=False, mode="iou"):
    """Reference IoU from exact shapely polygons of the same corners."""
    import shapely
    p1, p2 = shapely_polys(b1), shapely_polys(b2)
    if not aligned:
        p1, p2 = p1[:, None], p2[None]
    inter = shapely.area(shapely.intersection(p1, p2))
    a1, a2 = shapely.area(p1), shapely.area(p2)
    denom = a1 + 0 * a2 if mode == "iof" else a1 + a2 - inter
    return np.where(denom > 0, inter / np.where(denom > 0, denom, 1), 0.0)


def _clip_left(poly, a, b):
    """Sutherland-Hodgman step: keep the part of `poly` left of a->b, in exact rationals."""
    def side(p):
        return (b[0] - a[0]) * (p[1] - a[1]) - (b[1] - a[1]) * (p[0] - a[0])
    out = []
    for i in range(len(poly)):
        p, q = poly[i], poly[(i + 1) % len(poly)]
        sp, sq = side(p), side(q)
        if sp >= 0:
            out.append(p)
        if (sp >= 0) != (sq >= 0):
            t = sp / (sp - sq)
            out.append((p[0] + t * (q[0] - p[0]), p[1] + t * (q[1] - p[1])))
    return out


def _area(poly):
    return sum(poly[i][0] * poly[(i + 1) % len(poly)][1] - poly[(i + 1) % len(poly)][0] * poly[i][1]
               for i in range(len(poly))) / 2


def exact_iou(box1, box2):
    """IoU of two boxes' float corners in exact rational arithmetic (no rounding at all).

    Used where shapely itself is not robust (GEOS returns the full area for some boxes that only
    share an edge)."""
    polys = []
    for box in (box1, box2):
        corners = rotated_ops.obb_corners(torch.as_tensor(box, dtype=torch.float64)[None])[0].tolist()
        poly = [(Fraction(x), Fraction(y)) for x, y in corners]
        polys.append(poly if _area(poly) >= 0 else poly[::-1])
    P, Q = polys
    R = P
    for i in range(4):
        if len(R) < 3:
            break
        R = _clip_left(R, Q[i], Q[(i + 1) % 4])
    inter = _area(R) if len(R) >= 3 else Fraction(0)
    union = _area(P) + _area(Q) - inter
    return float(inter / union) if union > 0 else 0.0


def random_boxes(n, canvas=64.0, seed=0, min_side=1.0, max_side=120.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    c = torch.rand(n, 2, generator=g, dtype=torch.float64) * canvas
    wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * (max_side - min_side) + min_side
    t = (torch.rand(n, 1, generator=g, dtype=torch.float64) - 0.5) * 2 * np.pi
    return torch.cat([c, wh, t], 1).to(dtype)


@pytest.fixture(autouse=True)
def no_standin_builds(monkeypatch):
    """Tests run from random init: a tiny preset's "fractal" weights would build a stand-in for minutes.
    A test that needs one passes its own weights; one that forgets fails here instead of stalling."""
    import train

    def refuse(value, model):
        if value == "fractal":
            raise AssertionError(f"a test asked for the {model} stand-in; pass an empty weight flag (random init)")
        return value
    refuse.real = train.standin  # for the test of standin itself
    monkeypatch.setattr(train, "standin", refuse)


@pytest.fixture(scope="session")
def tiny_pilot_csv(tmp_path_factory):
    """A finished learning-curve pilot in the committed CSV's format: doubling 144 babelrs steps moves
    the metric by 0.5 against a seed SD of 1 (so 144), the mutdet row still rising at 1600."""
    import tables
    lines = ["row,steps,seed,primary,second"]
    for kind, lengths in tables.PILOT_LENGTHS.items():
        for i, L in enumerate(lengths):
            lines += [f"{kind},{L},{s},{(10 + s + 0.5 * min(i, 1)) if kind == 'babelrs' else 10 * i + s},0"
                      for s in range(3)]
    path = tmp_path_factory.mktemp("pilot") / "tiny-pilot.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(autouse=True)
def tiny_pilot_done(request, monkeypatch):
    """The tiny tables of protocol v3 read the pilot's lengths from its committed CSV, which a fresh
    checkout may not have yet: the tests that build tiny sweeps read the one above (144 and 1600 steps)."""
    if "tables" in sys.modules:
        monkeypatch.setattr(sys.modules["tables"], "TINY_V3_PILOT", str(request.getfixturevalue("tiny_pilot_csv")))


@pytest.fixture
def tmp_root(tmp_path):
    return tmp_path


def pytest_addoption(parser):
    parser.addoption("--fuzz-cases", type=int, default=120, help="mutants a reader in tests/test_fuzz.py")
    parser.addoption("--fuzz-seed", type=int, default=0, help="another campaign of tests/test_fuzz.py")


@pytest.fixture
def fuzz_cases(request):
    return request.config.getoption("--fuzz-cases")


@pytest.fixture
def fuzz_seed(request):
    return 1000 * request.config.getoption("--fuzz-seed")


@pytest.fixture(scope="session")
def synthsoi(tmp_path_factory):
    """SynthSOI at its default size (48 + 16 images a modality, every class in train and test), made
    once for the tests that only read it."""
    import datasets
    return datasets.make_synthetic(tmp_path_factory.mktemp("synthsoi"))
