"""CSIA instruction corpora built from detection sets (App. D tasks, shared concepts)."""
import json
import re

import numpy as np
from PIL import Image

import babelrs
import datasets
import train

CSIA_SMALL = ["--stage", "csia", "--vit", "", "--image_size", "32", "--batch_size", "4", "--global_batch", "4", "--steps", "3", "--vocab_size", "400",
              "--llm_dim", "32", "--llm_layers", "1", "--llm_ffn", "64"]


def _dior(root):
    """A DIOR-R split: JPEGImages + Annotations (VOC xml with <robndbox>)."""
    (root / "JPEGImages").mkdir(parents=True)
    (root / "Annotations").mkdir()
    Image.new("RGB", (120, 80)).save(root / "JPEGImages" / "00001.jpg")
    objects = [("airplane", (10, 10, 50, 10, 50, 30, 10, 30)), ("storagetank", (60, 40, 90, 40, 90, 70, 60, 70)),
               ("storagetank", (95, 5, 115, 5, 115, 25, 95, 25))]
    xml = "<annotation>" + "".join(
        f"<object><name>{n}</name><difficult>0</difficult><robndbox>" +
        "".join(f"<{t}>{v}</{t}>" for t, v in zip(datasets._DIOR_CORNERS, p)) + "</robndbox></object>"
        for n, p in objects) + "</annotation>"
    (root / "Annotations" / "00001.xml").write_text(xml)
    return root


def _drone(root):
    """A DroneVehicle-like split (DOTA txt, infrared), one object partly outside the image."""
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (100, 100)).save(root / "images" / "a.png")
    polys = np.array([[10, 10, 30, 10, 30, 20, 10, 20], [40, 40, 60, 40, 60, 50, 40, 50], [85, 80, 110, 80, 110, 95, 85, 95]],
                     np.float32)
    datasets.write_dota_txt(root / "labelTxt" / "a.txt", polys, ["car", "truck", "car"])
    return root


def _rows(meta):
    return {m: [json.loads(l) for l in open(src["annotation"])]
            for m, src in ((s["modality"], s) for s in json.loads(meta.read_text()).values())}


def test_corpus_boxes_counts_and_concepts(tmp_path):
    synth = datasets.make_synthetic(tmp_path / "synth", n_train=3, n_test=1, size=64, max_objects=3)
    sources = [("rgb", synth / "rgb" / "train"), ("sar", synth / "sar" / "train"), ("rgb", _dior(tmp_path / "dior")),
               ("ir", _drone(tmp_path / "drone"))]
    meta = babelrs.build_instruction_corpus(sources, tmp_path / "corpus", dict(sar=0.6), seed=0)
    spec = json.loads(meta.read_text())
    assert spec["detections_sar"]["repeat_time"] == 0.6 and spec["detections_rgb"]["repeat_time"] == 1.0
    rows = _rows(meta)
    for modality, items in rows.items():
        for r in items:
            for box in re.findall(r"<box>\[\[([^\]]*)\]\]</box>", r["conversations"][1]["value"] + r["conversations"][0]["value"]):
                x1, y1, x2, y2 = map(int, box.split(", "))
                assert 0 <= x1 <= x2 <= 1000 and 0 <= y1 <= y2 <= 1000
    # counts: the grounding answer of each image holds its number of objects
    for modality, split in (("rgb", synth / "rgb" / "train"), ("ir", tmp_path / "drone")):
        ds = datasets.load_detection_split(split, modality)
        for s in ds.samples:
            answer = next(r["conversations"][1]["value"] for r in rows[modality]
                          if r["image"] == str(s.image.resolve()) and "Detect all" in r["conversations"][0]["value"])
            n = len(s.labels)
            assert answer.startswith("There are no objects") if n == 0 else re.search(
                rf"There (is|are) {babelrs._NUMBERS[n]} object", answer), (answer, n)
    text = " ".join(t["value"] for r in rows["rgb"] + rows["ir"] for t in r["conversations"])
    assert "airplane" not in text and "storagetank" not in text and "truck" not in text  # mapped to concepts
    dior = [r for r in rows["rgb"] if r["image"].endswith("00001.jpg")]
    assert "including a plane <box>" in dior[0]["conversations"][1]["value"] and "two tanks" in dior[0]["conversations"][1]["value"]
    drone = rows["ir"][0]["conversations"][1]["value"]
    assert "three vehicles" in drone and "infrared" in rows["ir"][0]["conversations"][0]["value"]
    own = babelrs.build_instruction_corpus([("ir", tmp_path / "drone")], tmp_path / "own", concept_map={"truck": "truck"})
    assert "a truck <box>" in _rows(own)["ir"][0]["conversations"][1]["value"]


def test_csia_trains_on_detection_folders(tmp_path):
    synth = datasets.make_synthetic(tmp_path / "synth", n_train=4, n_test=1, size=64, max_objects=2)
    data = ["--data", f"rgb:{synth / 'rgb'}", f"sar:{synth / 'sar'}", f"ir:{synth / 'ir'}"]
    assert train.main(CSIA_SMALL + data + ["--out", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "corpus" / "meta.json").exists()
    log = [json.loads(l) for l in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(np.isfinite(r["loss_align"]) for r in log)
    assert train.main(CSIA_SMALL + ["--data", "rgb"] + ["--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()  # nothing written for bad input
