"""Data on disk and in batches: DOTA txt, DIOR-R xml, COCO json, instruction jsonl, DOTA-style image
splitting and merging, transforms on oriented boxes, the SynthSOI generator, a multi-source sampler
and a step's batches, FractalDB-style images; and what every command line and run folder shares:
the argument parser and dataclass flags, atomic writes and folder locks, a run's provenance.

Formats (the official layouts of the data sets both papers use):
- DOTA txt (DOTA-v1.0, SOI-Det's DOTA and DroneVehicle parts): one object a line,
  `x1 y1 x2 y2 x3 y3 x4 y4 category [difficult]`, after optional `imagesource:` / `gsd:` header
  lines; a split folder holds `images/` and `labelTxt/` (or mmrotate's `annfiles/`).
- DIOR-R VOC xml: `<object><name/><difficult/><robndbox>` with `x_left_top ... y_left_bottom`.
- HRSC2016 xml (`<HRSC_Object>` with `mbox_cx ... mbox_ang`, le90) and FAIR1M xml (`<possibleresult>`,
  `<points>`); `CLASS_SETS` holds the official class lists (DOTA-v1.0 / v1.5 / v2.0, DIOR-R, HRSC2016
  1 and 31 classes, FAIR1M).
- COCO json with horizontal `[x, y, w, h]` boxes (SARDet-50K).
- Instruction jsonl (InternVL / LLaVA): `{"image": ..., "conversations": [{"from": "human", ...},
  {"from": "gpt", ...}]}`, one per line.

Boxes follow rotated_ops: (cx, cy, w, h, θ) le90, θ in radians, clockwise on screen. Bad input
raises `DatasetError` with a one-line message naming the file (and line); `train.py` turns it into
a clean exit. Objects with a side under `MIN_SIDE` px are dropped and counted, as mmrotate does.

May import: rotated_ops (DESIGN.md); every other file of the project may import this one.
"""
import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import random
import re
import shutil
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args, get_origin

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

import rotated_ops as ro

MIN_SIDE = 2.0  # px; mmrotate's poly2obb_np_le90 drops smaller boxes
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
IMAGENET_MEAN = (123.675, 116.28, 103.53)  # RGB, 0-255, as both papers' configs
IMAGENET_STD = (58.395, 57.12, 57.375)


class DatasetError(Exception):
    """Bad input data; the message is one line naming the file (and line)."""


class ArgumentParser(argparse.ArgumentParser):
    """The command lines' parser (train.py, eval.py, tables.py, bench.py): no abbreviations
    (`--max-step` is an error, not `--max-steps`), and an error is one line naming the wrong flag and
    the closest right one, instead of the usage block."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        import difflib
        unknown = re.match(r"unrecognized arguments: (.*)", message)
        if unknown:
            flags = [s for a in self._actions for s in a.option_strings]
            words = [w for w in unknown.group(1).split() if w.startswith("-")] or unknown.group(1).split()
            hints = []
            for w in words:
                close = difflib.get_close_matches(w.split("=")[0], flags, n=1, cutoff=0.6)
                hints.append(w + (f" (did you mean {close[0]}?)" if close else ""))
            message = f"unknown flag{'s' if len(hints) > 1 else ''} " + ", ".join(hints)
        self.exit(2, f"{self.prog}: error: {message}; --help lists every flag\n")


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


@functools.lru_cache(maxsize=None)  # the source is read once a class: a command line is parsed many times over
def field_docs(cls) -> dict:
    """{field name: the comment written beside it in the dataclass (with its `#   ` continuation
    lines)}: what the field does and the paper's value, shown by `--help`."""
    import inspect
    import io
    import tokenize
    docs, current, line_of_field = {}, None, -1
    tokens = list(tokenize.generate_tokens(io.StringIO(inspect.getsource(cls)).readline))
    for i, tok in enumerate(tokens):
        if tok.type == tokenize.NAME and tok.start[1] == 4 and i + 1 < len(tokens) and tokens[i + 1].string == ":":
            current, line_of_field = tok.string, tok.start[0]
        elif tok.type == tokenize.COMMENT and current is not None:
            text = tok.string.lstrip("#").strip()
            if tok.start[0] == line_of_field:
                docs[current] = text
            elif tok.string.startswith("#  ") and current in docs:  # a `#   ` continuation line under it
                docs[current] += " " + text
            else:
                current = None
    return docs


def add_config_flags(parser: argparse.ArgumentParser, cls, presets: dict) -> None:
    """One flag per dataclass field (`--max_steps` and `--max-steps`), typed from the annotation;
    flags not given keep the preset's value (default SUPPRESS). The help is the field's comment
    (what it does, the paper's value) and every preset's value."""
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        values = ", ".join(f"{name} {getattr(p, f.name)!r}" for name, p in presets.items())
        help_text = (docs.get(f.name, "") + f" [presets: {values}]").strip().replace("%", "%%")
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
        if get_origin(f.type) is Literal:
            kw.update(choices=list(get_args(f.type)))
        elif f.type is bool:  # --enhance, --enhance false, --no-enhance
            kw.update(type=_parse_bool, metavar="true|false", nargs="?", const=True)
            parser.add_argument(*[f"--no-{n[2:]}" for n in names], dest=f.name, action="store_false",
                                default=argparse.SUPPRESS, help=f"same as --{f.name} false")
        elif get_origin(f.type) is list:
            kw.update(nargs="*", type=get_args(f.type)[0])
        else:
            kw.update(type=f.type)
        parser.add_argument(*names, **kw)


def _fail(path, msg, line=None):
    where = f"{path}:{line}" if line is not None else f"{path}"
    raise DatasetError(f"{where}: {msg}")


def atomic_write_text(path, text: str) -> None:
    """Write a text file through a temporary name in the same folder, then rename. The file gets the
    mode any new file gets under the user's umask (mkstemp's own 0600 would hide it from others)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def folder_lock(folder, wait: bool = True):
    """Hold an exclusive lock on `folder` (a hidden `.<name>.lock` file beside it, so the folder itself
    is not created before its inputs are checked) while the block runs. `wait`: queue behind another
    holder (a data set or cache built once), else refuse in one line (a run folder in use)."""
    import fcntl
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder.parent / f".{folder.name}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise DatasetError(f"{folder}: in use by another process (a run or build of the same folder); wait "
                               "for it or stop it") from None
        yield folder
    finally:
        os.close(fd)


def save_tensors_atomic(path, tensors: dict) -> None:
    """A safetensors file written in full under a temporary name, then renamed into place."""
    from safetensors.torch import save_file
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Provenance: what a run's numbers depend on beyond its config (train.py's config.json)
# ---------------------------------------------------------------------------------------------

def machine() -> dict:
    """What a run's numbers depend on beyond its config: torch, threads (the order of float sums),
    deterministic kernels, the CPU or GPU."""
    import platform
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return dict(torch=torch.__version__, python=platform.python_version(), threads=torch.get_num_threads(),
                deterministic=torch.are_deterministic_algorithms_enabled(), cpu=cpu,
                gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else "")


def code_version() -> str:
    """The git commit of this code (with "+dirty" when files differ from it), or "" outside a checkout."""
    import subprocess
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if head.returncode == 0 else ""


def weight_hashes(weights: dict) -> dict:
    """{field: {path: sha256}} of the weight files a run loaded (`start_weights`; a folder: its
    .safetensors files), so that a run's numbers can be traced to the exact files."""
    import hashlib
    out = {}
    for field_name, value in weights.items():
        p = Path(value) if value else None
        if p is None or not p.exists():
            continue
        files = sorted(p.glob("*.safetensors")) if p.is_dir() else [p]
        hashes = {}
        for f in files:
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
            hashes[str(f)] = h.hexdigest()
        out[field_name] = hashes
    return out


# ---------------------------------------------------------------------------------------------
# Annotation readers and writers
# ---------------------------------------------------------------------------------------------

MAX_COORD = 1e6  # px: beyond any image of these data sets (DOTA's largest side is about 20,000)


def _check_coords(path, values, line=None) -> None:
    """A box's numbers are finite and within MAX_COORD of the image origin (larger ones overflow
    float32 into inf and are corruption, not geometry)."""
    if not all(math.isfinite(v) and abs(v) <= MAX_COORD for v in values):
        _fail(path, f"coordinate not finite or beyond {MAX_COORD:g} px: {[round(v, 2) for v in values]}", line)


def read_dota_txt(path) -> dict:
    """Read a DOTA annotation file.

    Returns dict(polys float32 (N, 8), labels list[str], difficult bool (N,)). Header lines
    (`imagesource:`, `gsd:`) and blank lines are skipped; a line with 9 tokens is not difficult,
    with 10 the last token is the difficulty (any non-zero counts as difficult, as DOTA's 2 for
    truncated objects in split patches). Anything else raises DatasetError naming the line.
    """
    polys, labels, difficult = [], [], []
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        _fail(path, f"cannot read annotation file ({e.__class__.__name__})")
    for n, line in enumerate(lines, start=1):
        tokens = line.split()
        if not tokens or line.lstrip().startswith(("imagesource:", "gsd:")):
            continue
        if len(tokens) not in (9, 10):
            _fail(path, f"expected 'x1 y1 ... x4 y4 category [difficult]' (9 or 10 tokens), got {len(tokens)}", n)
        try:
            coords = [float(t) for t in tokens[:8]]
            diff = int(tokens[9]) if len(tokens) == 10 else 0
        except ValueError:
            _fail(path, f"non-numeric coordinate or difficulty in {line.strip()!r}", n)
        _check_coords(path, coords, n)
        polys.append(coords)
        labels.append(tokens[8])
        difficult.append(diff != 0)
    return dict(polys=np.asarray(polys, dtype=np.float32).reshape(-1, 8), labels=labels,
                difficult=np.asarray(difficult, dtype=bool))


def write_dota_txt(path, polys, labels, difficult=None) -> None:
    """Write a DOTA annotation file (no header), atomically."""
    polys = np.asarray(polys, dtype=np.float64).reshape(-1, 8)
    difficult = np.zeros(len(polys), bool) if difficult is None else np.asarray(difficult)
    if not (len(polys) == len(labels) == len(difficult)):
        raise ValueError("polys, labels and difficult must have the same length")
    lines = [" ".join(f"{v:.2f}" for v in p) + f" {name} {int(d)}" for p, name, d in zip(polys, labels, difficult)]
    atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))


_DIOR_CORNERS = ("x_left_top", "y_left_top", "x_right_top", "y_right_top",
                 "x_right_bottom", "y_right_bottom", "x_left_bottom", "y_left_bottom")


def read_dior_xml(path) -> dict:
    """Read a DIOR-R VOC xml file (`<robndbox>` corners); same dict as `read_dota_txt`."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        _fail(path, f"cannot parse xml ({e})")
    polys, labels, difficult = [], [], []
    for k, obj in enumerate(root.iter("object"), start=1):
        name = obj.findtext("name")
        box = obj.find("robndbox")
        if name is None or box is None:
            _fail(path, f"object {k} has no <name> or no <robndbox>")
        try:
            polys.append([float(box.findtext(tag)) for tag in _DIOR_CORNERS])
        except (TypeError, ValueError):
            _fail(path, f"object {k}: <robndbox> needs numeric {', '.join(_DIOR_CORNERS)}")
        _check_coords(path, polys[-1], f"object {k}")
        labels.append(name.strip())
        difficult.append((obj.findtext("difficult") or "0").strip() not in ("0", ""))
    return dict(polys=np.asarray(polys, dtype=np.float32).reshape(-1, 8), labels=labels,
                difficult=np.asarray(difficult, dtype=bool))


# Category lists of the data sets the readers know, in their official order (the order of the class
# heads of a released checkpoint). `--data rgb:PATH:NAME` trains on PATH with the set NAME.
DOTA_V1_CLASSES = ("plane", "baseball-diamond", "bridge", "ground-track-field", "small-vehicle", "large-vehicle", "ship",
                   "tennis-court", "basketball-court", "storage-tank", "soccer-ball-field", "roundabout", "harbor",
                   "swimming-pool", "helicopter")  # the DOTA server's Task1 class names
HRSC_CLASS_IDS = ("01", "02", "03", "04", "05", "06", "07", "08", "09", "10", "11", "12", "13", "14", "15", "16", "17",
                  "18", "19", "20", "22", "24", "25", "26", "27", "28", "29", "30", "31", "32", "33")  # Class_ID 1000000xx
HRSC_CLASSES = ("ship", "aircraft carrier", "warcraft", "merchant ship", "Nimitz", "Enterprise", "Arleigh Burke",
                "WhidbeyIsland", "Perry", "Sanantonio", "Ticonderoga", "Kitty Hawk", "Kuznetsov", "Abukuma", "Austen",
                "Tarawa", "Blue Ridge", "Container", "OXo|--)", "Car carrier([]==[])", "Hovercraft", "yacht",
                "CntShip(_|.--.--|_]=", "Cruise", "submarine", "lute", "Medical", "Car carrier(======|", "Ford-class",
                "Midway-class", "Invincible-class")  # the 31 names of mmrotate's HRSCDataset, as the community uses them
CLASS_SETS = {
    "dota-v1.0": DOTA_V1_CLASSES,
    "dota-v1.5": DOTA_V1_CLASSES + ("container-crane",),
    "dota-v2.0": DOTA_V1_CLASSES + ("container-crane", "airport", "helipad"),
    "dior-r": ("airplane", "airport", "baseballfield", "basketballcourt", "bridge", "chimney", "dam",
               "Expressway-Service-area", "Expressway-toll-station", "golffield", "groundtrackfield", "harbor",
               "overpass", "ship", "stadium", "storagetank", "tenniscourt", "trainstation", "vehicle", "windmill"),
    "hrsc2016": ("ship",),  # HRSC2016's usual task: every object is a ship (mmrotate classwise=False)
    "hrsc2016-31": HRSC_CLASSES,  # the 31-class task (classwise=True); objects of other Class_IDs are left out
    "fair1m": ("Boeing737", "Boeing747", "Boeing777", "Boeing787", "C919", "A220", "A321", "A330", "A350", "ARJ21",
               "other-airplane", "Passenger Ship", "Motorboat", "Fishing Boat", "Tugboat", "Engineering Ship",
               "Liquid Cargo Ship", "Dry Cargo Ship", "Warship", "other-ship", "Small Car", "Bus", "Cargo Truck",
               "Dump Truck", "Van", "Trailer", "Tractor", "Excavator", "Truck Tractor", "other-vehicle",
               "Basketball Court", "Tennis Court", "Football Field", "Baseball Field", "Intersection", "Roundabout",
               "Bridge"),  # FAIR1M-1.0 / 2.0's 37 fine-grained categories
}


def _xml_root(path):
    try:
        return ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        _fail(path, f"cannot parse xml ({e})")


def _number(path, obj, tag, where):
    try:
        return float(obj.findtext(tag))
    except (TypeError, ValueError):
        _fail(path, f"{where}: <{tag}> missing or not a number")


def read_hrsc_xml(path, classwise: bool = False) -> dict:
    """Read an HRSC2016 annotation (`<HRSC_Image>` with `<HRSC_Objects>`); same dict as `read_dota_txt`.

    Each object's rotated box `mbox_cx, mbox_cy, mbox_w, mbox_h, mbox_ang` (pixels, radians) is read in
    le90, our convention, and turned into its polygon, as mmrotate's HRSCDataset does. `classwise`
    names objects by their `Class_ID` (1000000xx) in the 31-class set and leaves out the other IDs;
    otherwise every object is a "ship". As there, no object is difficult.
    """
    root = _xml_root(path)
    if root.tag != "HRSC_Image":
        _fail(path, f"not an HRSC2016 annotation (root <{root.tag}>, expected <HRSC_Image>)")
    names = {"1" + "0" * 6 + i: c for i, c in zip(HRSC_CLASS_IDS, HRSC_CLASSES)}
    boxes, labels = [], []
    for k, obj in enumerate(root.iter("HRSC_Object"), start=1):
        if classwise:
            name = names.get((obj.findtext("Class_ID") or "").strip())
            if name is None:
                continue
        else:
            name = "ship"
        boxes.append([_number(path, obj, tag, f"object {k}") for tag in ("mbox_cx", "mbox_cy", "mbox_w", "mbox_h", "mbox_ang")])
        _check_coords(path, boxes[-1], f"object {k}")
        labels.append(name)
    polys = ro.obb2poly(torch.tensor(boxes, dtype=torch.float64).reshape(-1, 5)).numpy()
    return dict(polys=polys.astype(np.float32).reshape(-1, 8), labels=labels, difficult=np.zeros(len(labels), bool))


def read_fair1m_xml(path) -> dict:
    """Read a FAIR1M annotation (`<objects><object><possibleresult><name>` and `<points>` of "x,y"
    corners, the first repeated at the end); same dict as `read_dota_txt`. FAIR1M marks nothing difficult."""
    root = _xml_root(path)
    objects = root.find("objects")
    if objects is None:
        _fail(path, "not a FAIR1M annotation (no <objects>)")
    polys, labels = [], []
    for k, obj in enumerate(objects.iter("object"), start=1):
        name = obj.findtext("possibleresult/name")
        points = [p.text for p in obj.findall("points/point")]
        if name is None or len(points) < 4:
            _fail(path, f"object {k} has no <possibleresult><name> or fewer than 4 <point>s")
        try:
            xy = [float(v) for p in points[:4] for v in p.split(",")]
        except (AttributeError, ValueError):
            xy = []
        if len(xy) != 8:
            _fail(path, f"object {k}: a <point> is not 'x,y' ({points[:4]})")
        _check_coords(path, xy, f"object {k}")
        polys.append(xy)
        labels.append(name.strip())
    return dict(polys=np.asarray(polys, dtype=np.float32).reshape(-1, 8), labels=labels,
                difficult=np.zeros(len(labels), bool))


def read_coco_json(path) -> dict:
    """Read COCO detection json (horizontal boxes, as SARDet-50K).

    Returns dict(categories list[str] in id order, images {file_name: dict(id, width, height,
    boxes float32 (N, 4) xyxy, labels list[str], iscrowd bool (N,))}).
    """
    try:
        data = json.loads(Path(path).read_text())
        cats = {c["id"]: c["name"] for c in data["categories"]}
        images = {im["id"]: dict(id=im["id"], file_name=im["file_name"], width=im.get("width"),
                                 height=im.get("height"), boxes=[], labels=[], iscrowd=[])
                  for im in data["images"]}
        if not all(isinstance(n, str) and n for n in cats.values()):
            _fail(path, "a category name is not text")
        if not all(isinstance(im["file_name"], str) and im["file_name"] for im in images.values()):
            _fail(path, "an image's file_name is not a path")
        for k, ann in enumerate(data.get("annotations", [])):
            if ann["image_id"] not in images:
                _fail(path, f"annotation {k} refers to image id {ann['image_id']} that is not in 'images'")
            x, y, w, h = (float(v) for v in ann["bbox"])
            _check_coords(path, [x, y, w, h], f"annotation {k}")
            im = images[ann["image_id"]]
            im["boxes"].append([x, y, x + w, y + h])
            im["labels"].append(cats[ann["category_id"]])
            im["iscrowd"].append(bool(ann.get("iscrowd", 0)))
    except DatasetError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:
        _fail(path, f"not a COCO detection json ({e.__class__.__name__}: {e})")
    out = {}
    for im in images.values():
        out[im["file_name"]] = dict(id=im["id"], width=im["width"], height=im["height"],
                                    boxes=np.asarray(im["boxes"], np.float32).reshape(-1, 4),
                                    labels=im["labels"], iscrowd=np.asarray(im["iscrowd"], bool))
    return dict(categories=[cats[k] for k in sorted(cats)], images=out)


def read_instruction_jsonl(path) -> list:
    """Read InternVL/LLaVA instruction jsonl: a list of {"image", "conversations"} dicts."""
    samples = []
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        _fail(path, f"cannot read as UTF-8 text ({e.__class__.__name__})")
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            sample = json.loads(line)
        except json.JSONDecodeError as e:
            _fail(path, f"invalid json ({e.msg})", n)
        conv = sample.get("conversations") if isinstance(sample, dict) else None
        if (not isinstance(conv, list) or len(conv) < 2
                or any(not isinstance(t, dict) or t.get("from") not in ("human", "gpt", "system")
                       or not isinstance(t.get("value"), str) for t in conv)):
            _fail(path, "expected 'conversations': a list of {'from': 'human'|'gpt', 'value': text} turns", n)
        if not isinstance(sample.get("image"), str) or not sample["image"]:
            _fail(path, "expected 'image': the path of the sample's image (CSIA's samples all have one)", n)
        samples.append(sample)
    return samples


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------

def load_image(path) -> np.ndarray:
    """Read an image as (H, W, 3) uint8 RGB whatever the file holds (RGBA, palette, grey, 16-bit,
    float, CMYK). High-bit-depth images are scaled by their own maximum (SAR and thermal data often
    use only part of the 16-bit range). An EXIF orientation is applied, as the official pipelines'
    cv2.imread(IMREAD_COLOR) does. A truncated or corrupt file is a one-line DatasetError."""
    from PIL import ImageOps
    try:
        with Image.open(path) as opened:
            opened.load()
            im = ImageOps.exif_transpose(opened)
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                a = np.asarray(im, dtype=np.float64)
                a = np.clip(a, 0, None) * (255.0 / max(a.max(), 1e-12))
                a = np.round(a).astype(np.uint8)
                return np.repeat(a[..., None], 3, axis=2)
            return np.array(im.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        _fail(path, f"cannot read image ({e.__class__.__name__}: {e})")


def _find_image(folder: Path, stem: str):
    for ext in IMAGE_EXTS:
        for cand in (folder / f"{stem}{ext}", folder / f"{stem}{ext.upper()}"):
            if cand.exists():
                return cand
    return None


# ---------------------------------------------------------------------------------------------
# Detection data sets
# ---------------------------------------------------------------------------------------------

@dataclass
class Sample:
    image: Path
    boxes: np.ndarray  # (N, 5) le90 oriented boxes (horizontal ones have θ = 0 or -π/2)
    labels: np.ndarray  # (N,) int64 indices into the data set's classes
    difficult: np.ndarray  # (N,) bool
    name: str = ""


@dataclass
class DetectionDataset(torch.utils.data.Dataset):
    """A split of a detection data set, in memory as paths + boxes; images are read on access.

    `box_type` is "obb" (DOTA, DIOR-R, DroneVehicle) or "hbb" (COCO json: boxes are stored as
    le90 boxes of the horizontal rectangles). `dropped_small` counts objects with a side under
    MIN_SIDE px that were dropped while loading.
    """
    samples: list
    classes: list
    box_type: str = "obb"
    modality: str = "rgb"
    root: str = ""
    transform: object = None
    dropped_small: int = 0
    source: int = 0  # index of this data set among several (for the multi-source sampler)
    unlabelled_images: int = 0  # images without a label file: not used (mmrotate lists label files)
    outside_boxes: int = 0  # boxes reaching past their image by more than a pixel: kept, as mmrotate

    def report(self) -> str:
        """What loading found and did, in one line (empty when there is nothing to say): printed once
        a data set by the stages that train on it."""
        said = [f"{n} {what}" for n, what in ((self.dropped_small, f"objects under {MIN_SIDE:g} px dropped"),
                                             (self.outside_boxes, "boxes reaching past their image kept"),
                                             (self.unlabelled_images, "images without a label file not used")) if n]
        return f"{self.root}: " + "; ".join(said) + " (as mmrotate)" if said else ""

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        s = self.samples[i]
        image = torch.from_numpy(load_image(s.image)).permute(2, 0, 1).contiguous()  # (3, H, W) uint8
        item = dict(image=image, boxes=torch.from_numpy(s.boxes).float(), labels=torch.from_numpy(s.labels),
                    difficult=torch.from_numpy(s.difficult), name=s.name, modality=self.modality,
                    source=self.source, index=i, orig_size=tuple(image.shape[-2:]))
        return self.transform(item) if self.transform is not None else item


def _polys_to_sample(path, polys, labels, difficult, classes, image, name):
    """Convert polygons to le90 boxes, drop tiny ones, map labels to indices."""
    boxes = ro.poly2obb(torch.from_numpy(polys.astype(np.float64))).numpy().astype(np.float32)
    keep = (boxes[:, 2] >= MIN_SIDE) & (boxes[:, 3] >= MIN_SIDE)
    unknown = sorted({l for l in labels if l not in classes})
    if unknown:
        _fail(path, f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {unknown}; known: {classes}")
    ids = np.asarray([classes.index(l) for l in labels], dtype=np.int64)
    return Sample(image, boxes[keep], ids[keep], difficult[keep], name), int((~keep).sum())


def detect_format(split_dir) -> str:
    """'dota', 'dior', 'hrsc', 'fair1m' or 'coco' from what a split folder (or data set root) holds."""
    d = Path(split_dir)
    if list(d.glob("*.json")) or list((d / "annotations").glob("*.json")):
        return "coco"
    if (d / "labelTxt").is_dir() or (d / "annfiles").is_dir():
        return "dota"
    if (d / "labelXml").is_dir():
        return "fair1m"
    if list(d.glob("Annotations*")) or list(d.glob("**/*.xml"))[:1]:
        first = next(iter(_label_files(d, "dior")), None)
        if first is not None:
            with open(first, "rb") as f:
                head = f.read(512)
            if b"<HRSC_Image" in head:
                return "hrsc"
        return "dior"
    raise DatasetError(f"{d}: no labelTxt/ or annfiles/ (DOTA), labelXml/ (FAIR1M), *.json (COCO) or Annotations/ xml "
                       "(DIOR-R, HRSC2016) found")


def _label_files(split_dir: Path, fmt: str):
    if fmt == "dota":
        folder = split_dir / "labelTxt" if (split_dir / "labelTxt").is_dir() else split_dir / "annfiles"
        return sorted(folder.glob("*.txt"))
    if fmt == "fair1m":
        return sorted((split_dir / "labelXml").glob("*.xml"))
    xml_dir = split_dir / "Annotations" / "Oriented Bounding Boxes"
    return sorted((xml_dir if xml_dir.is_dir() else split_dir / "Annotations").glob("*.xml"))


def _image_folder(split_dir: Path):
    for name in ("images", "png_images", "JPEGImages", "JPEGImages-trainval", "JPEGImages-test", "AllImages"):
        if (split_dir / name).is_dir():
            return split_dir / name
    return split_dir


def load_detection_split(split_dir, modality="rgb", classes=None, need_images: bool = True) -> DetectionDataset:
    """Load one split folder of DOTA txt, DIOR-R xml or COCO json annotations.

    Args:
        split_dir: folder with `images/` + `labelTxt/` (or `annfiles/`), or `JPEGImages*/` +
            `Annotations/`, or images + one COCO `*.json` (also under `annotations/`); with
            `need_images=False` also the label folder itself (`labelTxt/`, `Annotations/`).
        modality: "rgb", "sar" or "ir".
        classes: category names in label order; default: the sorted names found (COCO: its
            category order).
        need_images: False for scoring, which needs the annotations only (samples then have
            `image=None` where the image is missing).
    """
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise DatasetError(f"{split_dir}: no such folder")
    if not need_images and split_dir.name in ("labelTxt", "annfiles", "Annotations", "labelXml"):
        split_dir = split_dir.parent  # a label folder given directly: its split folder
    fmt = detect_format(split_dir)
    images = _image_folder(split_dir)
    samples, dropped = [], 0
    if fmt == "coco":
        jsons = sorted(split_dir.glob("*.json")) or sorted((split_dir / "annotations").glob("*.json"))
        coco = read_coco_json(jsons[0])
        classes = list(classes) if classes is not None else coco["categories"]
        for file_name, im in sorted(coco["images"].items()):
            path = images / file_name
            if not path.exists():
                if need_images:
                    _fail(jsons[0], f"image {file_name!r} not found in {images}")
                path = None
            polys = ro.obb2poly(ro.hbb2obb(torch.from_numpy(im["boxes"]))).numpy()
            s, n = _polys_to_sample(jsons[0], polys, im["labels"], im["iscrowd"], classes, path, Path(file_name).stem)
            samples.append(s)
            dropped += n
        return DetectionDataset(samples, classes, "hbb", modality, str(split_dir), dropped_small=dropped)
    files = _label_files(split_dir, fmt)
    if not files:
        raise DatasetError(f"{split_dir}: no annotation files found")
    classwise = fmt == "hrsc" and classes is not None and len(classes) > 1  # the 31-class HRSC2016 task
    reader = dict(dota=read_dota_txt, dior=read_dior_xml, fair1m=read_fair1m_xml,
                  hrsc=lambda f: read_hrsc_xml(f, classwise))[fmt]
    annots = [(f, reader(f)) for f in files]
    if classes is None:
        classes = sorted({l for _, a in annots for l in a["labels"]})
    classes = list(classes)
    outside = 0
    for f, a in annots:
        path = _find_image(images, f.stem)
        if path is None and need_images:
            _fail(f, f"label file without its image ({f.stem}.* not in {images})")
        s, n = _polys_to_sample(f, a["polys"], a["labels"], a["difficult"], classes, path, f.stem)
        samples.append(s)
        dropped += n
        if path is not None and len(s.boxes):  # from the image header: no pixels are read
            with Image.open(path) as im:
                w, h = im.size
            xyxy = ro.obb2hbb(torch.from_numpy(s.boxes).double())
            outside += int(((xyxy[:, :2] < -1).any(1) | (xyxy[:, 2] > w + 1) | (xyxy[:, 3] > h + 1)).sum())
    labelled = {f.stem for f in files}
    unlabelled = sum(1 for p in images.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.stem not in labelled) \
        if images is not None and images.is_dir() else 0
    return DetectionDataset(samples, classes, "obb", modality, str(split_dir), dropped_small=dropped,
                            unlabelled_images=unlabelled, outside_boxes=outside)


def find_split(root, split: str):
    """The folder of `split` ('train' or 'test') under a data set root, or the root itself when it
    is a single split folder (it then serves for training and scoring alike)."""
    root = Path(root)
    names = {"train": ("train", "trainval", "train_val", "dota_train", "Train", "TrainVal"),
             "test": ("test", "val", "dota_test", "validation", "Test")}[split]
    for name in names:
        if (root / name).is_dir():
            return root / name
    return root


def detection_sources(entries: list, synth_root="data/synthsoi", synth_modalities=("rgb",)) -> list:
    """`--data MODALITY:PATH[:CLASS_SET] ...` (none: the `synth_modalities` of SynthSOI under `synth_root`,
    which must exist) -> list of dict(modality, root, train, test[, class_set, classes]), each folder
    checked. A CLASS_SET (a key of CLASS_SETS) fixes the categories and their order, which a released
    checkpoint's class heads need; without one they are the sorted names found in the training labels."""
    if not entries:
        entries = [f"{m}:{Path(synth_root) / m}" for m in synth_modalities]
    sources = []
    for e in entries:
        modality, sep, path = e.partition(":")
        if not sep or modality not in ("rgb", "sar", "ir"):
            raise DatasetError(f"--data {e!r}: expected MODALITY:PATH[:CLASS_SET] with MODALITY one of rgb, sar, ir")
        head, _, tail = path.rpartition(":")
        class_set = tail if head and tail in CLASS_SETS else None
        root = Path(head if class_set else path).resolve()
        if not root.is_dir():
            raise DatasetError(f"{root}: no such folder (from --data {e}; class sets: {', '.join(CLASS_SETS)})")
        sources.append(dict(modality=modality, root=str(root), train=str(find_split(root, "train")),
                            test=str(find_split(root, "test"))))
        if class_set:
            sources[-1].update(class_set=class_set, classes=list(CLASS_SETS[class_set]))
    return sources


# ---------------------------------------------------------------------------------------------
# DOTA-style splitting into patches and merging detections back
# ---------------------------------------------------------------------------------------------

def sliding_windows(width, height, size, gap, img_rate_thr=0.6):
    """Patch windows (K, 4) xyxy over an image, as mmrotate's `get_sliding_window`: steps of
    size - gap, the last window flush with the border; windows whose in-image fraction is below
    `img_rate_thr` are dropped (the best one is kept if none passes)."""
    step = size - gap
    if step <= 0:
        raise ValueError(f"gap ({gap}) must be smaller than size ({size})")

    def starts(length):
        n = 1 if length <= size else math.ceil((length - size) / step + 1)
        s = [step * i for i in range(n)]
        if len(s) > 1 and s[-1] + size > length:
            s[-1] = length - size
        return s

    wins = np.array([[x, y, x + size, y + size] for x in starts(width) for y in starts(height)], dtype=np.float64)
    inside = (np.minimum(wins[:, 2], width) - wins[:, 0]) * (np.minimum(wins[:, 3], height) - wins[:, 1])
    rate = inside / (size * size)
    if not (rate >= img_rate_thr).any():
        return wins[rate == rate.max()]
    return wins[rate >= img_rate_thr]


def _clip_polygon_area(poly, x1, y1, x2, y2):
    """Area of a polygon (K, 2) clipped to an axis-aligned window (Sutherland-Hodgman)."""
    pts = [tuple(p) for p in poly]
    for axis, bound, keep_le in ((0, x1, False), (0, x2, True), (1, y1, False), (1, y2, True)):
        out = []
        for i in range(len(pts)):
            p, q = pts[i], pts[(i + 1) % len(pts)]
            pin = p[axis] <= bound if keep_le else p[axis] >= bound
            qin = q[axis] <= bound if keep_le else q[axis] >= bound
            if pin:
                out.append(p)
            if pin != qin:
                t = (bound - p[axis]) / (q[axis] - p[axis])
                out.append((p[0] + t * (q[0] - p[0]), p[1] + t * (q[1] - p[1])))
        pts = out
        if not pts:
            return 0.0
    return _polygon_area(np.asarray(pts))


def _polygon_area(pts):
    x, y = pts[:, 0], pts[:, 1]
    return abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))) / 2


def window_iof(polys, window):
    """Fraction of each polygon (N, 8) inside an axis-aligned window (4,) xyxy."""
    out = np.zeros(len(polys))
    for k, p in enumerate(np.asarray(polys, dtype=np.float64).reshape(-1, 4, 2)):
        area = _polygon_area(p)
        if area <= 0:
            continue
        lo, hi = p.min(0), p.max(0)
        if lo[0] >= window[0] and lo[1] >= window[1] and hi[0] <= window[2] and hi[1] <= window[3]:
            out[k] = 1.0
        elif lo[0] < window[2] and lo[1] < window[3] and hi[0] > window[0] and hi[1] > window[1]:
            out[k] = _clip_polygon_area(p, *window) / area
    return out


def patch_name(stem, rate, x, y):
    """DOTA / mmrotate patch name, e.g. P0001__1__0___600."""
    return f"{stem}__{rate:g}__{int(x)}___{int(y)}"


_PATCH_RE = re.compile(r"^(?P<stem>.+)__(?P<rate>[0-9.]+)__(?P<x>-?\d+)___(?P<y>-?\d+)$")


def parse_patch_name(name):
    """'P0001__1__0___600' -> ('P0001', 1.0, 0, 600)."""
    m = _PATCH_RE.match(name)
    if m is None:
        raise ValueError(f"{name!r} is not a patch name like P0001__1__0___600")
    return m["stem"], float(m["rate"]), int(m["x"]), int(m["y"])


def split_images(src_dir, dst_dir, sizes=(1024,), gaps=(200,), rates=(1.0,), iof_thr=0.7,
                 img_rate_thr=0.6, padding_value=(104, 116, 124), ext=".png", skip_empty=False) -> int:
    """Split a DOTA-layout split folder into patches, as mmrotate's `img_split.py`.

    Each image is resized by each rate, cut into size x size windows with the given gap, padded
    with `padding_value` beyond the border. An object is kept in a patch when at least `iof_thr`
    of its polygon lies inside; its polygon is shifted (not clipped) and marked difficult = 2
    when truncated, as mmrotate does. Labels go to `dst_dir/labelTxt`, patches to `dst_dir/images`,
    named like `P0001__1__0___600`. Returns the number of patches written.
    """
    from tqdm import tqdm
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    if detect_format(src_dir) != "dota":
        raise DatasetError(f"{src_dir}: split_images needs a DOTA layout (images/ + labelTxt/ or annfiles/)")
    if len(sizes) != len(gaps):
        raise ValueError("sizes and gaps must have the same length")
    images = _image_folder(src_dir)
    (dst_dir / "images").mkdir(parents=True, exist_ok=True)
    (dst_dir / "labelTxt").mkdir(parents=True, exist_ok=True)
    count = 0
    for label_file in tqdm(_label_files(src_dir, "dota"), desc="split", unit="img"):
        ann = read_dota_txt(label_file)
        path = _find_image(images, label_file.stem)
        if path is None:
            _fail(label_file, "label file without its image")
        full = Image.fromarray(load_image(path))
        for rate in rates:
            img = full if rate == 1 else full.resize((round(full.width * rate), round(full.height * rate)), Image.BILINEAR)
            polys = ann["polys"].astype(np.float64) * rate
            for size, gap in zip(sizes, gaps):
                for win in sliding_windows(img.width, img.height, size, gap, img_rate_thr):
                    iof = window_iof(polys, win)
                    keep = iof >= iof_thr
                    if skip_empty and not keep.any():
                        continue
                    x, y = int(win[0]), int(win[1])
                    patch = Image.new("RGB", (size, size), tuple(padding_value))
                    patch.paste(img.crop((x, y, min(x + size, img.width), min(y + size, img.height))), (0, 0))
                    name = patch_name(label_file.stem, rate, x, y)
                    patch.save(dst_dir / "images" / f"{name}{ext}")
                    shifted = polys[keep] - np.tile([x, y], 4)
                    diff = np.where(iof[keep] < 1, 2, ann["difficult"][keep].astype(int))
                    write_dota_txt(dst_dir / "labelTxt" / f"{name}.txt", shifted,
                                   [ann["labels"][i] for i in np.nonzero(keep)[0]], diff)
                    count += 1
    return count


def merge_patch_detections(patch_dets: dict, iou_thr: float = 0.1) -> dict:
    """Merge per-patch detections into full images, as the DOTA devkit's ResultMerge.

    Args:
        patch_dets: {patch name: list over classes of (K, 6) arrays [cx, cy, w, h, θ, score] in
            patch pixels}; names like `P0001__1__0___600` (rate and offset are read from them).
        iou_thr: rotated NMS threshold per image and class (suppress when IoU > thr; 0.1 in the
            devkit and mmrotate).
    Returns:
        {image name: list over classes of (K, 6) arrays in full-image pixels}.
    """
    grouped = {}
    for name, per_class in patch_dets.items():
        stem, rate, x, y = parse_patch_name(name)
        lists = grouped.setdefault(stem, [[] for _ in per_class])
        for c, det in enumerate(per_class):
            det = np.asarray(det, dtype=np.float64).reshape(-1, 6).copy()
            det[:, 0] += x
            det[:, 1] += y
            det[:, :4] /= rate
            lists[c].append(det)
    merged = {}
    for stem, lists in grouped.items():
        out = []
        for dets in lists:
            dets = np.concatenate(dets) if dets else np.zeros((0, 6))
            if len(dets):
                t = torch.from_numpy(dets)
                dets = dets[ro.nms_rotated(t[:, :5], t[:, 5], iou_thr).numpy()]
            out.append(dets)
        merged[stem] = out
    return merged


# ---------------------------------------------------------------------------------------------
# Transforms (torchvision v2 on polygons, back to le90 boxes through poly2obb)
# ---------------------------------------------------------------------------------------------

def _to_polys(item):
    from torchvision import tv_tensors
    h, w = item["image"].shape[-2:]
    polys = ro.obb2poly(item["boxes"].double()).float()
    return tv_tensors.BoundingBoxes(polys, format="XYXYXYXY", canvas_size=(h, w), clamping_mode=None)


PER_OBJECT = ("labels", "difficult", "embeds")  # item keys with one row per box, filtered with the boxes


def _from_polys(item, image, polys, keep=None):
    item = dict(item)
    boxes = ro.poly2obb(polys.as_subclass(torch.Tensor).double()).float()
    if keep is not None:
        boxes = boxes[keep]
        for key in PER_OBJECT:
            if key in item:
                item[key] = item[key][keep]
    item["image"], item["boxes"] = image.as_subclass(torch.Tensor), boxes
    return item


@dataclass
class Resize:
    """Resize the longer side to `size` keeping the aspect ratio (mmrotate RResize keep_ratio)."""
    size: int

    def __call__(self, item):
        from torchvision.transforms.v2 import functional as TF
        h, w = item["image"].shape[-2:]
        scale = self.size / max(h, w)
        new = [max(1, round(h * scale)), max(1, round(w * scale))]
        polys = TF.resize(_to_polys(item), new)
        image = TF.resize(item["image"], new, antialias=True)
        item = _from_polys(item, image, polys)
        item["scale"] = (new[0] / h, new[1] / w)
        return item


FLIPS = ("horizontal", "vertical", "diagonal")


@dataclass
class RandomFlip:
    """One of `directions` (horizontal, vertical, diagonal = both), each with probability p
    (mmrotate RRandomFlip with flip_ratio [p, p, p]; mmdet RandomFlip(0.5) is
    `directions=("horizontal",)`, p = 0.5)."""
    p: float = 0.25
    generator: random.Random = field(default_factory=random.Random)
    directions: tuple = FLIPS

    def __call__(self, item):
        from torchvision.transforms.v2 import functional as TF
        if not set(self.directions) <= set(FLIPS) or len(self.directions) * self.p > 1:
            raise ValueError(f"RandomFlip: directions {self.directions} with p {self.p}")
        r = self.generator.random()
        if r >= len(self.directions) * self.p:
            return item
        kind = self.directions[int(r // self.p)]
        image, polys = item["image"], _to_polys(item)
        if kind in ("horizontal", "diagonal"):
            image, polys = TF.horizontal_flip(image), TF.horizontal_flip(polys)
        if kind in ("vertical", "diagonal"):
            image, polys = TF.vertical_flip(image), TF.vertical_flip(polys)
        return _from_polys(item, image, polys)


@dataclass
class RandomRotate:
    """Rotate the image about its centre with probability p (mmrotate PolyRandomRotate).

    The angle is uniform in ±`angle_range` degrees (mmrotate's `angles_range`: 180, any rotation), or,
    when the image holds an object of `rect_classes` (whose boxes are only meaningful axis-aligned:
    storage tanks, roundabouts), the first of [90, 180, -90, -180] shuffled, as the official code: a
    quarter turn either way with 1/4 each and a half turn with 1/2. Objects whose centre leaves the
    image are dropped. `quarter_turns_only` restricts every rotation to those turns.
    """
    p: float = 0.5
    angle_range: float = 180.0
    rect_classes: tuple = ()
    quarter_turns_only: bool = False
    generator: random.Random = field(default_factory=random.Random)

    def __call__(self, item):
        from torchvision.transforms.v2 import functional as TF
        if self.generator.random() >= self.p:
            return item
        if self.quarter_turns_only or any(int(l) in self.rect_classes for l in item["labels"]):
            angle = self.generator.choice([90.0, 180.0, -90.0, -180.0])
        else:
            angle = (2 * self.generator.random() - 1) * self.angle_range
        polys = TF.rotate(_to_polys(item), angle)
        image = TF.rotate(item["image"], angle)
        h, w = image.shape[-2:]
        centres = polys.as_subclass(torch.Tensor).view(-1, 4, 2).mean(1)
        keep = (centres[:, 0] >= 0) & (centres[:, 0] < w) & (centres[:, 1] >= 0) & (centres[:, 1] < h)
        return _from_polys(item, image, polys, keep)


def rot90(item, k: int = 1):
    """Turn an item by k x 90° counter-clockwise on screen (image and boxes, canvas swapped)."""
    from torchvision.transforms.v2 import functional as TF
    image, polys = item["image"], _to_polys(item)
    for _ in range(k % 4):
        image, polys = TF.rotate(image, 90, expand=True), TF.rotate(polys, 90, expand=True)
    return _from_polys(item, image, polys)


@dataclass
class Normalize:
    """uint8 image -> float (x - mean) / std with ImageNet statistics (both papers' configs)."""
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD

    def __call__(self, item):
        item = dict(item)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        item["image"] = (item["image"].float() - mean) / std
        return item


@dataclass
class Compose:
    transforms: list

    def __call__(self, item):
        for t in self.transforms:
            item = t(item)
        return item


def collate(items: list) -> dict:
    """Pad images to the largest size in the batch (bottom/right, value 0 after normalisation)
    and keep the per-image targets as lists."""
    h = max(it["image"].shape[-2] for it in items)
    w = max(it["image"].shape[-1] for it in items)
    images = items[0]["image"].new_zeros(len(items), items[0]["image"].shape[0], h, w)
    masks = torch.ones(len(items), h, w, dtype=torch.bool)  # True where padded
    for k, it in enumerate(items):
        ih, iw = it["image"].shape[-2:]
        images[k, :, :ih, :iw] = it["image"]
        masks[k, :ih, :iw] = False
    batch = dict(images=images, masks=masks)
    for key in items[0]:
        if key != "image":
            batch[key] = [it[key] for it in items]
    return batch


# ---------------------------------------------------------------------------------------------
# Multi-source sampling (BabelRS joint training: 2 SAR : 1 RGB : 1 IR per batch)
# ---------------------------------------------------------------------------------------------

class MultiSourceSampler:
    """Batches with a fixed mix of sources, from an infinite shuffled stream per source.

    Batch k holds `ratios[s]` samples of source s, in source order, as (source, index) pairs.
    Each source's stream is a new permutation every pass, seeded by (seed, source, pass). The
    batches are numbered globally: batch k of rank r is global batch G = k·world_size + r, made of
    the stream's elements G·ratio ... G·ratio + ratio - 1. So ranks never share a sample in a pass,
    and one process drawing batches 2k, 2k+1 (gradient accumulation 2) sees exactly what two
    processes see at their batch k. The state is the number of batches drawn:
    `state_dict()` / `load_state_dict()` resume exactly.
    """

    def __init__(self, sizes, ratios, seed=0, rank=0, world_size=1):
        if len(sizes) != len(ratios) or any(r < 1 for r in ratios) or any(n < 1 for n in sizes):
            raise ValueError(f"need one ratio >= 1 per non-empty source, got sizes {sizes} and ratios {ratios}")
        self.sizes, self.ratios = list(sizes), list(ratios)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.batches_drawn = 0
        self._perm_cache = {}

    def global_batch(self, k: int) -> int:
        """The global number of this rank's batch k (it also seeds the batch's augmentation)."""
        return k * self.world_size + self.rank

    def _element(self, source, n):
        """The n-th sample of `source`'s stream (global numbering)."""
        p, offset = divmod(n, self.sizes[source])
        cached = self._perm_cache.get(source)  # (pass, permutation): one per source
        if cached is None or cached[0] != p:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + source * 7919 + p)
            cached = self._perm_cache[source] = (p, torch.randperm(self.sizes[source], generator=g).tolist())
        return cached[1][offset]

    def batch(self, k):
        """The k-th batch (a list of (source, index) pairs)."""
        g, out = self.global_batch(k), []
        for s, r in enumerate(self.ratios):
            out += [(s, self._element(s, g * r + j)) for j in range(r)]
        return out

    def __iter__(self):
        while True:
            b = self.batch(self.batches_drawn)
            self.batches_drawn += 1
            yield b

    def state_dict(self):
        return dict(batches_drawn=self.batches_drawn)

    def load_state_dict(self, state):
        self.batches_drawn = int(state["batches_drawn"])


# ---------------------------------------------------------------------------------------------
# Training batches: a step's micro-batches, determined by the step alone (train.py's stages)
# ---------------------------------------------------------------------------------------------

def subset(ds, fraction: float, seed: int):
    """A random `fraction` of a split (at least one image), the same for every process."""
    if fraction >= 1.0:
        return ds
    if not 0 < fraction:
        raise ValueError(f"data_fraction must be in (0, 1], got {fraction}")
    g = torch.Generator().manual_seed(seed)
    keep = sorted(torch.randperm(len(ds), generator=g)[:max(1, math.ceil(fraction * len(ds)))].tolist())
    return dataclasses.replace(ds, samples=[ds.samples[i] for i in keep])


RECT_CLASSES = ("roundabout", "storage-tank", "tank")  # turned by multiples of 90° only (mmrotate's DOTA
#   rect_classes; SOI-Det's `rect_classes=[..., 16, 18]`); "tank" is SynthSOI's round storage tank


def detection_transform(image_size: int, augment: bool, rotate_p: float, generator: random.Random,
                        modality: str = "rgb", classes: list = ()):
    """Resize -> augmentation per source, as the official SOI-Det pipelines (`SOI_Det.py`) -> Normalize.
    SAR: a horizontal flip with p = 0.5 only (mmdet RandomFlip). RGB and IR: a horizontal, vertical
    or diagonal flip with p = 0.25 each (RRandomFlip), then with `rotate_p` a rotation by any angle,
    or by a multiple of 90° when the image holds a RECT_CLASSES object (PolyRandomRotate)."""
    steps = [Resize(image_size)]
    if augment and modality == "sar":
        steps.append(RandomFlip(0.5, generator, directions=("horizontal",)))
    elif augment:
        steps.append(RandomFlip(0.25, generator))
        if rotate_p > 0:
            rect = tuple(i for i, c in enumerate(classes) if c.lower() in RECT_CLASSES)
            steps.append(RandomRotate(rotate_p, rect_classes=rect, generator=generator))
    return Compose(steps + [Normalize()])


def pad_batch(batch: dict, multiple: int = 32) -> dict:
    """Pad a collated batch to a multiple of the largest stride (mmdet Pad(size_divisor=32))."""
    h, w = batch["images"].shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if ph or pw:
        batch["images"] = torch.nn.functional.pad(batch["images"], (0, pw, 0, ph))
        batch["masks"] = torch.nn.functional.pad(batch["masks"], (0, pw, 0, ph), value=True)
    return batch


class StepBatches(torch.utils.data.Dataset):
    """Step k's `accum` micro-batches, determined by k alone: the sampler's draws k·accum + a, each
    augmented with a generator seeded by the draw's global batch number. Resuming at step k, and
    any number of processes or loader workers with the same global batch, see exactly the batches
    of an uninterrupted single-process run."""

    def __init__(self, splits: list, sampler: MultiSourceSampler, cfg, rank: int, accum: int = 1):
        self.splits, self.sampler, self.cfg, self.rank, self.accum = splits, sampler, cfg, rank, accum

    def __len__(self):
        return 1 << 62

    def micro_batch(self, draw: int) -> dict:
        gen = random.Random(f"{self.cfg.seed}-{self.sampler.global_batch(draw)}")
        items = []
        for source, index in self.sampler.batch(draw):
            ds = self.splits[source]
            item = detection_transform(self.cfg.image_size, self.cfg.augment, self.cfg.rotate_p, gen, ds.modality,
                                       ds.classes)(ds[index])
            item["size"] = tuple(item["image"].shape[-2:])
            items.append(item)
        return pad_batch(collate(items))

    def __getitem__(self, k: int):
        micro = [self.micro_batch(k * self.accum + a) for a in range(self.accum)]
        return micro if self.accum > 1 else micro[0]


# ---------------------------------------------------------------------------------------------
# SynthSOI: the embedded default data set
# ---------------------------------------------------------------------------------------------

CONCEPTS = ("ship", "plane", "vehicle", "tank", "bridge", "harbor")
SYNTH_CLASSES = {"rgb": list(CONCEPTS), "sar": list(CONCEPTS), "ir": ["vehicle", "ship", "plane"]}
# (length, width) range in px at a 256-px image; each concept has its own shape and colour
_SHAPE = {"ship": ((30, 44), (9, 12)), "plane": ((26, 34), (26, 34)), "vehicle": ((14, 20), (7, 9)),
          "tank": ((18, 26), (18, 26)), "bridge": ((60, 90), (8, 11)), "harbor": ((36, 48), (22, 28))}
_COLOUR = {"ship": (235, 235, 240), "plane": (190, 40, 40), "vehicle": (40, 80, 210),
           "tank": (240, 200, 40), "bridge": (120, 120, 120), "harbor": (140, 70, 160)}


def _draw_object(draw, concept, box, colour):
    """Draw one object of a concept inside its oriented box (cx, cy, L, W, θ)."""
    cx, cy, L, W, t = box
    u, v = np.array([math.cos(t), math.sin(t)]), np.array([-math.sin(t), math.cos(t)])

    def P(a, b):  # local (along, across) in units of half-length / half-width
        p = np.array([cx, cy]) + a * L / 2 * u + b * W / 2 * v
        return (float(p[0]), float(p[1]))

    if concept == "ship":  # pointed hull
        draw.polygon([P(-1, -1), P(0.55, -1), P(1, 0), P(0.55, 1), P(-1, 1)], fill=colour)
    elif concept == "plane":  # fuselage + wings + tail
        draw.polygon([P(-1, -0.14), P(1, -0.14), P(1, 0.14), P(-1, 0.14)], fill=colour)
        draw.polygon([P(0.05, -1), P(0.3, -1), P(0.3, 1), P(0.05, 1)], fill=colour)
        draw.polygon([P(-0.95, -0.45), P(-0.8, -0.45), P(-0.8, 0.45), P(-0.95, 0.45)], fill=colour)
    elif concept == "tank":  # round tank
        draw.ellipse([cx - L / 2, cy - W / 2, cx + L / 2, cy + W / 2], fill=colour)
    elif concept == "harbor":  # pier: an L shape
        draw.polygon([P(-1, -1), P(1, -1), P(1, -0.3), P(-0.4, -0.3), P(-0.4, 1), P(-1, 1)], fill=colour)
    else:  # vehicle, bridge: rectangles (a bridge gets darker railings)
        draw.polygon([P(-1, -1), P(1, -1), P(1, 1), P(-1, 1)], fill=colour)
        if concept == "bridge":
            dark = max(0, colour - 60) if isinstance(colour, int) else tuple(max(0, c - 60) for c in colour)
            draw.line([P(-1, -0.8), P(1, -0.8)], fill=dark, width=2)
            draw.line([P(-1, 0.8), P(1, 0.8)], fill=dark, width=2)


def _scene_objects(rng, classes, size, max_objects, axis_aligned=False):
    """Non-overlapping oriented boxes (cx, cy, L, W, θ) and their concepts for one image."""
    scale = size / 256
    objects, placed = [], []
    for _ in range(rng.randint(2, max_objects)):
        concept = rng.choice(classes)
        (l0, l1), (w0, w1) = _SHAPE[concept]
        L, W = rng.uniform(l0, l1) * scale, rng.uniform(w0, w1) * scale
        t = 0.0 if axis_aligned else rng.uniform(-math.pi / 2, math.pi / 2)
        if concept == "tank":
            W, t = L, 0.0
        for _ in range(20):  # rejection sampling for free space
            cx, cy = rng.uniform(L / 2 + 2, size - L / 2 - 2), rng.uniform(L / 2 + 2, size - L / 2 - 2)
            box = (cx, cy, L, W, t)
            if all((cx - p[0]) ** 2 + (cy - p[1]) ** 2 > ((L + p[2]) / 2 + 3) ** 2 for p in placed):
                placed.append(box)
                objects.append((concept, box))
                break
    return objects


def _render(modality, objects, rng, size):
    """RGB: textured ground; SAR: dark speckled clutter with bright scatterers; IR: thermal blobs."""
    nrng = np.random.default_rng(rng.randrange(2 ** 31))
    if modality == "rgb":
        base = np.array([rng.randint(60, 110), rng.randint(80, 120), rng.randint(50, 90)], np.float64)
        img = np.clip(base + nrng.normal(0, 10, (size, size, 3)), 0, 255).astype(np.uint8)
        pil = Image.fromarray(img)
        draw = ImageDraw.Draw(pil)
        for concept, box in objects:
            _draw_object(draw, concept, box, _COLOUR[concept])
        return pil
    grey = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(grey)
    level = {"ship": 230, "plane": 200, "vehicle": 170, "tank": 250, "bridge": 150, "harbor": 190}
    for concept, box in objects:
        _draw_object(draw, concept, box, level[concept])
    if modality == "ir":  # heat spreads; objects only a little warmer than warm, noisy ground
        grey = grey.filter(ImageFilter.GaussianBlur(2.5))
        a = 0.5 * np.asarray(grey, np.float64) + 70 + nrng.normal(0, 14, (size, size))
    else:  # 2-look speckle (gamma, shape 2), dimmer targets, and bright point clutter (sea, land scatterers)
        clutter = Image.fromarray((nrng.random((size // 4, size // 4)) < 0.04).astype(np.uint8) * 255)
        clutter = np.asarray(clutter.resize((size, size), Image.NEAREST).filter(ImageFilter.GaussianBlur(1)), np.float64)
        a = (0.6 * np.asarray(grey, np.float64) + 40 + 0.5 * clutter) * nrng.gamma(2.0, 1 / 2.0, (size, size))
    a = np.clip(a, 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(a[..., None], 3, axis=2))


def _instructions(objects, modality, image_rel, size):
    """Instruction turns about one scene: counts, categories at a box, and where an object is."""
    def box1000(box):
        x1, y1, x2, y2 = ro.obb2hbb(torch.tensor([box], dtype=torch.float64))[0].tolist()
        return "[[" + ", ".join(str(int(round(min(max(v / size, 0), 1) * 1000))) for v in (x1, y1, x2, y2)) + "]]"

    name = {"rgb": "optical", "sar": "SAR", "ir": "infrared"}[modality]
    counts = {}
    for concept, _ in objects:
        counts[concept] = counts.get(concept, 0) + 1
    out = []
    summary = ", ".join(f"{n} {c}{'s' if n > 1 else ''}" for c, n in sorted(counts.items()))
    out.append((f"How many objects are in this {name} image, and of which categories?",
                f"There are {len(objects)} objects: {summary}."))
    concept, box = objects[0]
    out.append((f"What is the category visible in the area <box>{box1000(box)}</box>? "
                f"The classes are: {', '.join(CONCEPTS)}.", f"A {concept}."))
    out.append((f"Where is a {concept} in the image?", f"<ref>{concept}</ref><box>{box1000(box)}</box>"))
    return [{"image": image_rel, "conversations": [{"from": "human", "value": "<image>\n" + q},
                                                   {"from": "gpt", "value": a}]} for q, a in out]


SYNTH_VERSION = 2  # 2: SAR and IR made harder than RGB (2-look speckle; low thermal contrast), as in SOI-Det


def make_synthetic(root, n_train=48, n_test=None, size=256, max_objects=8, seed=0, modalities=("rgb", "sar", "ir")) -> Path:
    """Write SynthSOI, the embedded default data set, under `root` and return it.

    Layout (the official ones): `rgb/{train,test}/{images,labelTxt}` (DOTA txt, oriented),
    `sar/{train,test}/{images, annotations.json}` (COCO json, horizontal boxes, as SARDet-50K),
    `ir/{train,test}/{images,labelTxt}` (DOTA txt, oriented, as DroneVehicle), and
    `instructions/{rgb,sar,ir}.jsonl` + `instructions/meta.json` (InternVL-style). The concepts
    (ship, plane, vehicle, tank, bridge, harbor) are shared across modalities, each with its own
    shape, so a detector learns them quickly. meta.json holds absolute paths (the official loader
    opens annotations from the working folder). Deterministic from `seed`; a finished data set
    (marked by `root/.complete`) is not written again. `n_test=None` keeps the test split a finished
    data set has (16 images a modality when new; the tiny protocol v3 writes 200, whose first 16 are these).
    """
    root = Path(root)
    with folder_lock(root):  # two processes asking at once: the second waits, then finds it complete
        return _write_synthetic(root, n_train, n_test, size, max_objects, seed, modalities)


def _write_synthetic(root: Path, n_train, n_test, size, max_objects, seed, modalities) -> Path:
    marker = root / ".complete"
    def wanted_for(n):  # meta.json holds absolute paths, so the root is part of what was written
        return json.dumps(dict(version=SYNTH_VERSION, n_train=n_train, n_test=n, size=size, max_objects=max_objects,
                               seed=seed, modalities=list(modalities), root=str(root.resolve())))
    if n_test is None:  # the test split of a finished data set of the same settings, else 16
        kept = json.loads(marker.read_text()).get("n_test") if marker.exists() else None
        n_test = kept if kept is not None and marker.read_text() == wanted_for(kept) else 16
    wanted = wanted_for(n_test)
    if marker.exists() and marker.read_text() == wanted:
        return root
    meta = {}
    for m_index, modality in enumerate(modalities):
        classes = SYNTH_CLASSES[modality]
        jsonl = []
        for split, n in (("train", n_train), ("test", n_test)):
            rng = random.Random(seed * 1000 + m_index * 10 + (split == "test"))
            out = root / modality / split
            shutil.rmtree(out, ignore_errors=True)  # a rewrite with another split size leaves no stale images
            (out / "images").mkdir(parents=True, exist_ok=True)
            coco = dict(images=[], annotations=[], categories=[{"id": k + 1, "name": c} for k, c in enumerate(classes)])
            for i in range(n):
                stem = f"{modality}_{split}_{i:04d}"
                objects = _scene_objects(rng, classes, size, max_objects, axis_aligned=False)
                _render(modality, objects, rng, size).save(out / "images" / f"{stem}.png")
                boxes = torch.tensor([b for _, b in objects], dtype=torch.float64)
                if modality == "sar":
                    coco["images"].append(dict(id=i + 1, file_name=f"{stem}.png", width=size, height=size))
                    for concept, hb in zip([c for c, _ in objects], ro.obb2hbb(boxes).tolist()):
                        x1, y1, x2, y2 = (min(max(v, 0), size) for v in hb)
                        coco["annotations"].append(dict(id=len(coco["annotations"]) + 1, image_id=i + 1,
                                                        category_id=classes.index(concept) + 1, iscrowd=0,
                                                        bbox=[x1, y1, x2 - x1, y2 - y1], area=(x2 - x1) * (y2 - y1)))
                else:
                    write_dota_txt(out / "labelTxt" / f"{stem}.txt", ro.obb2poly(boxes).numpy(),
                                   [c for c, _ in objects], np.zeros(len(objects), bool))
                if split == "train":
                    jsonl += _instructions(objects, modality, f"{modality}/{split}/images/{stem}.png", size)
            if modality == "sar":
                atomic_write_text(out / "annotations.json", json.dumps(coco))
        atomic_write_text(root / "instructions" / f"{modality}.jsonl", "".join(json.dumps(s) + "\n" for s in jsonl))
        # absolute paths: the official loader opens `annotation` from the working folder, whatever that is
        meta[f"synthsoi_{modality}"] = dict(root=str(root.resolve()),
                                            annotation=str((root / "instructions" / f"{modality}.jsonl").resolve()),
                                            modality=modality, repeat_time=1, length=len(jsonl))
    atomic_write_text(root / "instructions" / "meta.json", json.dumps(meta, indent=2))
    atomic_write_text(marker, wanted)
    return root


# ---------------------------------------------------------------------------------------------
# Formula-driven images: FractalDB-style iterated function systems (train.py --stage fractal)
# ---------------------------------------------------------------------------------------------
# Kataoka et al., "Pre-training without Natural Images" (ACCV 2020): a category is an iterated
# function system (IFS) of N affine maps x -> A x + b drawn at random; its images are the attractor
# drawn by the chaos game, each map chosen with probability proportional to |det A|. Instances of a
# category jitter one parameter of one map (their "weight" augmentation, x0.8-1.2). Nothing here
# looks at SynthSOI: the images owe nothing to the detection data, as ImageNet owes nothing to DOTA.

def ifs_categories(n: int, seed: int = 0, maps: tuple = (2, 4), min_fill: float = 0.08) -> torch.Tensor:
    """`n` random IFS categories, (n, max(maps), 2, 3): rows [A | b] per map; unused maps are all 0.

    FractalDB draws every parameter from U(-1, 1) and keeps a system when its rendered points fill
    enough of the image; we keep contractive systems only (every map with spectral norm < 1, so the
    attractor exists and the chaos game cannot diverge) and then filter on the filled fraction."""
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(n, maps[1], 2, 3)
    k = 0
    while k < n:
        m = int(torch.randint(maps[0], maps[1] + 1, (1,), generator=g))
        sys_ = torch.rand(m, 2, 3, generator=g) * 2 - 1
        if torch.linalg.matrix_norm(sys_[:, :, :2], ord=2).max() >= 1:
            continue
        cand = torch.zeros(maps[1], 2, 3)
        cand[:m] = sys_
        img = render_fractals(cand[None], torch.Generator().manual_seed(k), size=64, jitter=False, colour=False)
        if (img[0, 0] > 0).float().mean() >= min_fill:
            out[k] = cand
            k += 1
    return out


def render_fractals(systems: torch.Tensor, g: torch.Generator, size: int = 64, walkers: int = 512, iters: int = 48,
                    burn_in: int = 8, jitter: bool = True, colour: bool = True) -> torch.Tensor:
    """One image of each system: (B, M, 2, 3) -> (B, 3, size, size) uint8.

    The chaos game runs `walkers` points for `iters` steps (the first `burn_in` not drawn); the points
    are scaled into a random square of 50-95 % of the image at a random place, randomly flipped, and
    splatted as a density. With `jitter`, one parameter of one map is scaled by U(0.8, 1.2) first
    (an instance of the category); with `colour`, a random colour on a random dark, noisy background."""
    B = len(systems)
    systems = systems.clone()
    used = systems.abs().sum((2, 3)) > 0  # (B, M)
    if jitter:
        pick = torch.multinomial(used.float(), 1, generator=g)[:, 0]  # one used map each
        param = torch.randint(0, 6, (B,), generator=g)
        scale = torch.rand(B, generator=g) * 0.4 + 0.8
        flat = systems.view(B, -1, 6)
        flat[torch.arange(B), pick, param] *= scale
    A, b = systems[..., :2], systems[..., 2]  # (B, M, 2, 2), (B, M, 2)
    det = torch.linalg.det(A).abs() * used + 1e-3 * used  # FractalDB's p_i ∝ |det A_i| (no degenerate map left out)
    choice = torch.multinomial(det, walkers * iters, replacement=True, generator=g).view(B, iters, walkers)
    x = torch.rand(B, walkers, 2, generator=g) * 2 - 1
    points = []
    rows = torch.arange(B)[:, None]
    for t in range(iters):
        k = choice[:, t]  # (B, W)
        x = (A[rows, k] @ x[..., None])[..., 0] + b[rows, k]
        if t >= burn_in:
            points.append(x)
    p = torch.cat(points, 1)  # (B, P, 2)
    lo, hi = p.amin(1, keepdim=True), p.amax(1, keepdim=True)
    p = (p - lo) / (hi - lo).amax(2, keepdim=True).clamp_min(1e-6)  # [0, 1], aspect kept
    if jitter:
        side = (torch.rand(B, 1, 1, generator=g) * 0.45 + 0.5) * (size - 1)
        flip = torch.rand(B, 1, 2, generator=g) < 0.5
        p = torch.where(flip, 1 - p, p) * side
        p = p + torch.rand(B, 1, 2, generator=g) * (size - 1 - p.amax(1, keepdim=True)).clamp_min(0)
    else:
        p = p * (size - 1)
    pix = p.round().long().clamp(0, size - 1)
    counts = torch.zeros(B, size * size)
    counts.scatter_add_(1, pix[..., 1] * size + pix[..., 0], torch.ones(pix.shape[:2]))
    density = (1 - torch.exp(-counts / 2)).view(B, 1, size, size)  # saturating: thin parts stay visible
    if not colour:
        return (density * 255).round().to(torch.uint8).expand(B, 3, size, size)
    fg = torch.rand(B, 3, 1, 1, generator=g) * 0.7 + 0.3
    bg = torch.rand(B, 3, 1, 1, generator=g) * 0.3
    noise = torch.randn(B, 3, size, size, generator=g) * 0.04
    img = bg + density * (fg - bg) + noise
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


class FractalImages(torch.utils.data.Dataset):
    """Batch k of a FractalDB-style classification set: `batch` images of random categories, drawn
    from (seed, k) alone, so a resumed run sees the same images. `split` "test" draws from another
    stream: held-out instances of the same categories."""

    def __init__(self, systems: torch.Tensor, batch: int, size: int, seed: int = 0, split: str = "train"):
        self.systems, self.batch, self.size = systems, batch, size
        self.seed = seed * 7919 + (10 ** 9 if split == "test" else 0)
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def __len__(self):
        return 1 << 62

    def __getitem__(self, k: int) -> dict:
        g = torch.Generator().manual_seed(self.seed + k)
        labels = torch.randint(0, len(self.systems), (self.batch,), generator=g)
        images = render_fractals(self.systems[labels], g, self.size)
        return dict(images=(images.float() - self.mean) / self.std, labels=labels)
