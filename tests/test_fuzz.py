"""Readers under fuzzing: real-format files of every reader are mutated (truncation, bit
flips, swapped fields, NaN / inf / huge / negative numbers, empty files, other encodings, duplicate
keys and lines), seeded, and read through the same path training reads them. Each mutant is either
read into boxes that pass a clean file's checks (finite, positive sides, labels in the class list)
or refused with one `DatasetError` naming the file; never another exception, never a bad box let
through. `pytest tests/test_fuzz.py --fuzz-cases 5000 --fuzz-seed 1` runs a longer campaign (another seed) and prints
the counts."""
import json
import random
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

import babelrs
import datasets
import mutdet

CLASSES = ["plane", "ship", "tank"]
NUMBERS = ["nan", "NaN", "inf", "-inf", "1e39", "-1e39", "1e30", "-5", "0", "", "1e", "0x10", "٣"]


def _mutants(text: str, rng: random.Random, n: int):
    """`n` mutants of a text file, as bytes, each with the name of its mutation."""
    data = text.encode()
    tokens = text.split(" ")
    kinds = ["truncate", "bitflip", "swap", "number", "empty", "utf16", "latin1", "duplicate", "delete-line"]
    for _ in range(n):
        kind = rng.choice(kinds)
        if kind == "truncate":
            yield kind, data[:rng.randrange(len(data))]
        elif kind == "bitflip":
            b = bytearray(data)
            for _ in range(rng.randint(1, 4)):
                i = rng.randrange(len(b))
                b[i] ^= 1 << rng.randrange(8)
            yield kind, bytes(b)
        elif kind == "swap":
            t = list(tokens)
            i, j = rng.randrange(len(t)), rng.randrange(len(t))
            t[i], t[j] = t[j], t[i]
            yield kind, " ".join(t).encode()
        elif kind == "number":  # a numeric field replaced by a hostile number
            spots = [i for i, tok in enumerate(tokens) if any(ch.isdigit() for ch in tok)]
            t = list(tokens)
            i = rng.choice(spots)
            digits = "".join(ch for ch in t[i] if ch.isdigit() or ch in ".-")
            t[i] = t[i].replace(digits, rng.choice(NUMBERS), 1) if digits else t[i]
            yield kind, " ".join(t).encode()
        elif kind == "empty":
            yield kind, b""
        elif kind == "utf16":
            yield kind, text.encode("utf-16")
        elif kind == "latin1":
            yield kind, text.replace("ship", "shïp").encode("latin-1")
        elif kind == "duplicate":
            lines = text.splitlines(keepends=True)
            k = rng.randrange(len(lines))
            yield kind, "".join(lines[:k + 1] + lines[k:]).encode()
        else:
            lines = text.splitlines(keepends=True)
            del lines[rng.randrange(len(lines))]
            yield kind, "".join(lines).encode()


def _check_split(ds):
    """What a clean file's boxes satisfy."""
    for s in ds.samples:
        assert np.isfinite(s.boxes).all(), "a non-finite box got through"
        assert (s.boxes[:, 2] > 0).all() and (s.boxes[:, 3] > 0).all(), "a zero-area box got through"
        assert ((s.labels >= 0) & (s.labels < len(ds.classes))).all(), "a label outside the class list"
        assert list(ds.classes) == CLASSES


def _campaign(tmp_path, base: str, target, n: int, seed: int, load) -> Counter:
    """Write each mutant to `target` and load; count outcomes; any other exception fails the test."""
    rng = random.Random(seed)
    outcomes = Counter()
    for kind, data in _mutants(base, rng, n):
        target.write_bytes(data)
        try:
            result = load()
        except datasets.DatasetError as e:
            assert len(str(e).splitlines()) == 1 and str(target.name) in str(e), f"{kind}: {e}"
            outcomes["refused"] += 1
            continue
        except Exception as e:  # noqa: BLE001 -- the point of the test
            pytest.fail(f"mutation {kind!r} escaped as {e.__class__.__name__}: {e}\n{data[:300]!r}")
        if result is not None:
            _check_split(result)
        outcomes["read"] += 1
    return outcomes


def _image(folder, name="a.png", size=(100, 80)):
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((size[1], size[0], 3), np.uint8)).save(folder / name)


DOTA = ("imagesource:GoogleEarth\ngsd:0.146\n10 10 40 10 40 30 10 30 plane 0\n"
        "50.5 20 90 20 90 60 50.5 60 ship 1\n5 50 30 45 35 70 10 75 tank\n")

DIOR = ("<annotation><filename>a.png</filename><object><name>plane</name><difficult>0</difficult><robndbox>"
        "<x_left_top>10</x_left_top><y_left_top>10</y_left_top><x_right_top>40</x_right_top><y_right_top>10"
        "</y_right_top><x_right_bottom>40</x_right_bottom><y_right_bottom>30</y_right_bottom><x_left_bottom>10"
        "</x_left_bottom><y_left_bottom>30</y_left_bottom></robndbox></object><object><name>ship</name><robndbox>"
        "<x_left_top>50</x_left_top><y_left_top>20</y_left_top><x_right_top>90</x_right_top><y_right_top>20"
        "</y_right_top><x_right_bottom>90</x_right_bottom><y_right_bottom>60</y_right_bottom><x_left_bottom>50"
        "</x_left_bottom><y_left_bottom>60</y_left_bottom></robndbox></object></annotation>\n")

COCO = json.dumps({"images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 80}],
                   "categories": [{"id": 1, "name": "plane"}, {"id": 2, "name": "ship"}, {"id": 3, "name": "tank"}],
                   "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 20], "iscrowd": 0},
                                   {"id": 2, "image_id": 1, "category_id": 2, "bbox": [50.5, 20, 40, 40]}]}, indent=1)


@pytest.mark.parametrize("fmt", ["dota", "dior", "coco"])
def test_annotation_readers_under_fuzzing(fmt, tmp_path, fuzz_cases, fuzz_seed, capsys):
    split = tmp_path / fmt
    if fmt == "dota":
        _image(split / "images")
        target, base = split / "labelTxt" / "a.txt", DOTA
    elif fmt == "dior":
        _image(split / "JPEGImages-trainval")
        target, base = split / "Annotations" / "a.xml", DIOR
    else:
        _image(split / "images")
        target, base = split / "annotations.json", COCO
    target.parent.mkdir(parents=True, exist_ok=True)
    outcomes = _campaign(tmp_path, base, target, fuzz_cases, seed=fuzz_seed + len(fmt),
                         load=lambda: datasets.load_detection_split(split, classes=CLASSES))
    with capsys.disabled():
        print(f"\n  fuzz {fmt}: {fuzz_cases} mutants, {dict(outcomes)}")
    assert sum(outcomes.values()) == fuzz_cases and outcomes["refused"] and outcomes["read"]


def test_instruction_files_under_fuzzing(tmp_path, fuzz_cases, fuzz_seed, capsys):
    _image(tmp_path / "imgs")
    jsonl = tmp_path / "rgb.jsonl"
    rows = [{"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat is here?"},
                                                  {"from": "gpt", "value": "Two planes."}]},
            {"image": "a.png", "width": 100, "height": 80,
             "conversations": [{"from": "human", "value": "<image>\nCount 2 ships"}, {"from": "gpt", "value": "2"}]}]
    base = "".join(json.dumps(r) + "\n" for r in rows)
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"rgb": {"root": str(tmp_path / "imgs"), "annotation": str(jsonl), "repeat_time": 1}}))
    def load():
        for r in babelrs.read_instruction_meta(meta):  # what a clean file's records are
            assert all(isinstance(t["value"], str) for t in r["conversations"]) and r["modality"] == "rgb"
    outcomes = _campaign(tmp_path, base, jsonl, fuzz_cases, seed=fuzz_seed + 7, load=load)
    meta_base = meta.read_text()
    jsonl.write_text(base)
    meta_outcomes = _campaign(tmp_path, meta_base.replace(", ", " , "), meta, fuzz_cases, seed=fuzz_seed + 8,
                              load=load)
    with capsys.disabled():
        print(f"\n  fuzz instruction jsonl: {dict(outcomes)}; meta json: {dict(meta_outcomes)}")
    assert outcomes["refused"] and meta_outcomes["refused"]


def test_sam_cache_manifest_under_fuzzing(tmp_path, fuzz_cases, fuzz_seed, capsys):
    from safetensors.torch import save_file
    cache = tmp_path / "cache"
    (cache / "cache").mkdir(parents=True)
    _image(tmp_path / "imgs")
    save_file(dict(boxes=torch.tensor([[30.0, 30, 20, 10, 0.3]]), labels=torch.tensor([1]),
                   embeds=torch.nn.functional.normalize(torch.randn(1, 8), dim=-1)), str(cache / "cache" / "a.safetensors"))
    base = json.dumps({"classes": ["cluster_1", "cluster_2"], "embed_dim": 8,
                       "images": [{"name": "a", "image": str(tmp_path / "imgs" / "a.png"), "modality": "rgb", "boxes": 1}]})

    def load():
        data = mutdet.PseudoLabels(str(cache))
        for i in range(len(data)):
            item = data[i]
            assert torch.isfinite(item["boxes"]).all() and (item["labels"] < len(data.classes)).all()
    outcomes = _campaign(tmp_path, base, cache / "manifest.json", fuzz_cases, seed=fuzz_seed + 9, load=load)
    with capsys.disabled():
        print(f"\n  fuzz sam cache manifest: {dict(outcomes)}")
    assert outcomes["refused"]


def test_images_of_every_kind_read_or_refused_in_one_line(tmp_path):
    """Real SAR and thermal data come as 16-bit or single-channel files; others as CMYK, palette or
    EXIF-rotated JPEGs; some are truncated or corrupt."""
    g = np.random.default_rng(0)
    rgb = g.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    cases = {"grey.png": Image.fromarray(rgb[..., 0]), "sar16.tif": Image.fromarray((rgb[..., 0].astype(np.uint16) * 40)),
             "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"), "palette.png": Image.fromarray(rgb).convert("P"),
             "rgba.png": Image.fromarray(rgb).convert("RGBA")}
    for name, im in cases.items():
        im.save(tmp_path / name)
        out = datasets.load_image(tmp_path / name)
        assert out.shape == (40, 60, 3) and out.dtype == np.uint8, name
    assert datasets.load_image(tmp_path / "sar16.tif").max() == 255  # scaled by its own maximum
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the camera was turned by 90°
    Image.fromarray(rgb).save(tmp_path / "turned.jpg", exif=exif)
    assert datasets.load_image(tmp_path / "turned.jpg").shape == (60, 40, 3)  # applied, as cv2.imread does
    for name in ("grey.png", "cmyk.jpg", "sar16.tif"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"cut-{name}").write_bytes(data[:len(data) // 2])
        (tmp_path / f"bad-{name}").write_bytes(data[:16] + bytes(64))
        for broken in (f"cut-{name}", f"bad-{name}"):
            with pytest.raises(datasets.DatasetError, match=broken) as e:
                datasets.load_image(tmp_path / broken)
            assert len(str(e.value).splitlines()) == 1
