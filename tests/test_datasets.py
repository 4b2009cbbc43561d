import json
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

import datasets as D


def _dota_split(root, objects, size=(200, 300), header=True):
    """A DOTA split folder with one image P0001 and the given (poly, label, difficult) objects."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labelTxt").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size[1], size[0]), (10, 20, 30)).save(root / "images" / "P0001.png")
    lines = ["imagesource:GoogleEarth", "gsd:0.5"] if header else []
    lines += [" ".join(str(v) for v in p) + f" {l}" + (f" {d}" if d is not None else "") for p, l, d in objects]
    (root / "labelTxt" / "P0001.txt").write_text("\n".join(lines) + "\n")
    return root


def test_read_dota_txt_header_tokens_and_errors(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("imagesource:GoogleEarth\ngsd:0.146\n1 1 9 1 9 5 1 5 ship 1\n\n2  2 8 2 8 6 2 6 small-vehicle\n")
    a = D.read_dota_txt(f)
    assert a["polys"].shape == (2, 8) and a["labels"] == ["ship", "small-vehicle"]
    assert a["difficult"].tolist() == [True, False]
    f.write_text("1 1 9 1 9 5 1 5 ship 0\n1 1 9 1 9 5 ship 0\n")
    with pytest.raises(D.DatasetError, match=r"a.txt:2: expected .* got 8"):
        D.read_dota_txt(f)
    f.write_text("1 1 9 one 9 5 1 5 ship 0\n")
    with pytest.raises(D.DatasetError, match=r"a.txt:1: non-numeric"):
        D.read_dota_txt(f)
    polys = np.array([[1.5, 1, 9, 1, 9, 5, 1, 5]])
    D.write_dota_txt(f, polys, ["plane"], [True])
    back = D.read_dota_txt(f)
    assert np.allclose(back["polys"], polys) and back["labels"] == ["plane"] and back["difficult"].tolist() == [True]


def test_read_dior_xml_and_coco(tmp_path):
    xml = tmp_path / "00001.xml"
    xml.write_text("""<annotation><object><name>airplane</name><difficult>0</difficult><robndbox>
      <x_left_top>10</x_left_top><y_left_top>10</y_left_top><x_right_top>50</x_right_top><y_right_top>10</y_right_top>
      <x_right_bottom>50</x_right_bottom><y_right_bottom>30</y_right_bottom><x_left_bottom>10</x_left_bottom>
      <y_left_bottom>30</y_left_bottom></robndbox></object></annotation>""")
    a = D.read_dior_xml(xml)
    assert a["polys"].tolist() == [[10, 10, 50, 10, 50, 30, 10, 30]] and a["labels"] == ["airplane"]
    xml.write_text("<annotation><object>")
    with pytest.raises(D.DatasetError, match="00001.xml: cannot parse xml"):
        D.read_dior_xml(xml)
    coco = tmp_path / "ann.json"
    coco.write_text(json.dumps(dict(images=[dict(id=7, file_name="s.png", width=64, height=64)],
                                    annotations=[dict(id=1, image_id=7, category_id=2, bbox=[4, 5, 10, 20])],
                                    categories=[dict(id=1, name="ship"), dict(id=2, name="car")])))
    c = D.read_coco_json(coco)
    assert c["categories"] == ["ship", "car"]
    assert c["images"]["s.png"]["boxes"].tolist() == [[4, 5, 14, 25]] and c["images"]["s.png"]["labels"] == ["car"]
    coco.write_text(json.dumps(dict(images=[], annotations=[dict(id=1, image_id=3, category_id=1, bbox=[0, 0, 1, 1])],
                                    categories=[dict(id=1, name="ship")])))
    with pytest.raises(D.DatasetError, match="ann.json: annotation 0 refers to image id 3"):
        D.read_coco_json(coco)


def test_load_image_any_mode(tmp_path):
    rgba = tmp_path / "a.png"
    Image.new("RGBA", (5, 4), (1, 2, 3, 4)).save(rgba)
    assert D.load_image(rgba).shape == (4, 5, 3) and D.load_image(rgba)[0, 0].tolist() == [1, 2, 3]
    grey = tmp_path / "g.png"
    Image.new("L", (5, 4), 77).save(grey)
    assert D.load_image(grey)[0, 0].tolist() == [77, 77, 77]
    deep = tmp_path / "d.png"
    Image.fromarray(np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)).save(deep)
    img = D.load_image(deep)
    assert img.dtype == np.uint8 and img[1, 1, 0] == 255 and img[0, 1, 0] == round(1000 * 255 / 4000)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(D.DatasetError, match="bad.png: cannot read image"):
        D.load_image(bad)


def test_load_split_drops_small_boxes_and_reports_missing_images(tmp_path):
    split = _dota_split(tmp_path / "train", [([10, 10, 60, 10, 60, 30, 10, 30], "plane", 0),
                                             ([80, 80, 81, 80, 81, 90, 80, 90], "ship", None)])
    ds = D.load_detection_split(split)
    assert ds.classes == ["plane", "ship"] and ds.dropped_small == 1
    assert len(ds) == 1 and ds.samples[0].boxes.shape == (1, 5)
    item = ds[0]
    assert item["image"].shape == (3, 200, 300) and item["image"].dtype == torch.uint8
    assert torch.allclose(item["boxes"], torch.tensor([[35.0, 20.0, 50.0, 20.0, 0.0]]))
    (split / "labelTxt" / "P0002.txt").write_text("1 1 9 1 9 5 1 5 ship 0\n")
    with pytest.raises(D.DatasetError, match=r"P0002.txt: label file without its image"):
        D.load_detection_split(split)
    assert D.find_split(tmp_path, "train") == split and D.find_split(split, "test") == split


def test_split_images_and_merge(tmp_path):
    # a 300 x 200 image, patches of 128 with gap 28 (step 100): x starts 0, 100, 172; y 0, 72
    objects = [([5, 5, 45, 5, 45, 25, 5, 25], "plane", 0),          # inside patch (0, 0) only
               ([90, 40, 130, 40, 130, 60, 90, 60], "ship", 0)]      # straddles x = 100 and 128
    src = _dota_split(tmp_path / "src", objects, size=(200, 300))
    n = D.split_images(src, tmp_path / "dst", sizes=(128,), gaps=(28,), iof_thr=0.7, img_rate_thr=0.6)
    names = sorted(p.stem for p in (tmp_path / "dst" / "images").glob("*.png"))
    assert n == len(names) == 6 and "P0001__1__0___0" in names and "P0001__1__172___72" in names
    first = D.read_dota_txt(tmp_path / "dst" / "labelTxt" / "P0001__1__0___0.txt")
    assert first["labels"] == ["plane", "ship"]  # the ship is 95% inside (iof >= 0.7): kept, difficult 2
    assert first["difficult"].tolist() == [False, True]
    second = D.read_dota_txt(tmp_path / "dst" / "labelTxt" / "P0001__1__100___0.txt")
    assert second["labels"] == ["ship"] and np.allclose(second["polys"][0], [-10, 40, 30, 40, 30, 60, -10, 60])
    patch = np.asarray(Image.open(tmp_path / "dst" / "images" / "P0001__1__172___72.png"))
    assert patch.shape == (128, 128, 3)
    assert D.parse_patch_name("P0001__0.5__172___72") == ("P0001", 0.5, 172, 72)
    # the same object seen in two patches merges back to one box in image coordinates
    dets = {"P0001__1__0___0": [np.zeros((0, 6)), np.array([[110.0, 50.0, 40.0, 20.0, 0.0, 0.9]])],
            "P0001__1__100___0": [np.zeros((0, 6)), np.array([[10.5, 50.0, 40.0, 20.0, 0.0, 0.8]])],
            "P0001__0.5__0___0": [np.array([[20.0, 10.0, 20.0, 10.0, 0.0, 0.7]]), np.zeros((0, 6))]}
    merged = D.merge_patch_detections(dets, iou_thr=0.1)
    assert len(merged["P0001"][1]) == 1 and np.allclose(merged["P0001"][1][0], [110, 50, 40, 20, 0, 0.9])
    assert np.allclose(merged["P0001"][0][0], [40, 20, 40, 20, 0, 0.7])  # rate 0.5: coordinates doubled


def _item_with_bright_box(box, shape=(96, 128)):
    img = torch.zeros(3, *shape, dtype=torch.uint8)
    ys, xs = torch.meshgrid(torch.arange(shape[0]) + 0.5, torch.arange(shape[1]) + 0.5, indexing="ij")
    b = torch.tensor(box, dtype=torch.float64)
    cos, sin = math.cos(box[4]), math.sin(box[4])
    along = (xs - b[0]) * cos + (ys - b[1]) * sin
    across = -(xs - b[0]) * sin + (ys - b[1]) * cos
    inside = (along.abs() <= b[2] / 2) & (across.abs() <= b[3] / 2)
    img[:, inside] = 255
    return dict(image=img, boxes=b[None].float(), labels=torch.tensor([0]), difficult=torch.tensor([False]))


def _box_matches_pixels(item):
    """The (only) box covers the bright pixels: IoU of the box with the bright-pixel mask."""
    img = item["image"][0]
    ys, xs = torch.nonzero(img > 127, as_tuple=True)
    b = item["boxes"][0].double()
    cos, sin = math.cos(b[4]), math.sin(b[4])
    px, py = xs + 0.5, ys + 0.5
    along = (px - b[0]) * cos + (py - b[1]) * sin
    across = -(px - b[0]) * sin + (py - b[1]) * cos
    inside = ((along.abs() <= b[2] / 2 + 0.75) & (across.abs() <= b[3] / 2 + 0.75)).double().mean().item()
    return inside, len(xs) / (b[2] * b[3]).item()


@pytest.mark.parametrize("k", [1, 2, 3])
def test_rot90_turns_boxes_with_the_image(k):
    item = _item_with_bright_box([40.0, 30.0, 40.0, 12.0, 0.4])
    out = D.rot90(item, k)
    assert out["image"].shape[-2:] == (item["image"].shape[-2:] if k == 2 else item["image"].shape[-2:][::-1])
    inside, fill = _box_matches_pixels(out)
    assert inside > 0.99 and 0.85 < fill < 1.15
    assert out["boxes"][0, 2] == pytest.approx(40.0, abs=1e-3) and out["boxes"][0, 3] == pytest.approx(12.0, abs=1e-3)
    assert math.cos(2 * (out["boxes"][0, 4].item() - (0.4 - k * math.pi / 2))) == pytest.approx(1.0, abs=1e-6)


def test_flips_resize_rotate_normalize_keep_boxes_on_the_object():
    item = _item_with_bright_box([60.0, 50.0, 50.0, 16.0, -0.7])
    for t in [D.RandomFlip(p=1 / 3, generator=random.Random(s)) for s in range(6)] + [D.Resize(64),
                                                                                       D.RandomRotate(p=1.0, generator=random.Random(1))]:
        out = t(item)
        inside, fill = _box_matches_pixels(out)
        assert inside > 0.97 and 0.8 < fill < 1.2, t
    assert D.Resize(64)(item)["image"].shape[-2:] == (48, 64)
    quarter = D.RandomRotate(p=1.0, rect_classes=(0,), generator=random.Random(0))(item)
    assert quarter["boxes"][0, 2] == pytest.approx(50.0, abs=1e-3)  # a multiple of 90°: size kept exactly
    norm = D.Normalize()(item)["image"]
    assert norm.dtype == torch.float32 and norm[0, 0, 0] == pytest.approx(-123.675 / 58.395)


def test_collate_pads_and_masks():
    a = dict(image=torch.ones(3, 4, 6), boxes=torch.zeros(1, 5), labels=torch.tensor([1]))
    b = dict(image=torch.ones(3, 5, 3), boxes=torch.zeros(0, 5), labels=torch.tensor([], dtype=torch.long))
    batch = D.collate([a, b])
    assert batch["images"].shape == (2, 3, 5, 6) and batch["masks"][0, 4].all() and not batch["masks"][0, :4, :].any()
    assert batch["masks"][1, :, 3:].all() and len(batch["boxes"]) == 2


def test_multi_source_sampler_mix_ranks_and_resume():
    s = D.MultiSourceSampler([10, 7, 5], [2, 1, 1], seed=3)
    it = iter(s)
    batches = [next(it) for _ in range(20)]
    assert all([src for src, _ in b] == [0, 0, 1, 2] for b in batches)
    first_pass = [i for b in batches[:5] for src, i in b if src == 0]
    assert sorted(first_pass) == list(range(10))  # every sample once per pass
    resumed = D.MultiSourceSampler([10, 7, 5], [2, 1, 1], seed=3)
    resumed.load_state_dict(dict(batches_drawn=12))
    assert next(iter(resumed)) == batches[12]
    r0 = D.MultiSourceSampler([10, 8], [1, 1], seed=3, rank=0, world_size=2)
    r1 = D.MultiSourceSampler([10, 8], [1, 1], seed=3, rank=1, world_size=2)
    seen0 = {i for k in range(5) for src, i in r0.batch(k) if src == 0}
    seen1 = {i for k in range(5) for src, i in r1.batch(k) if src == 0}
    assert not seen0 & seen1 and len(seen0 | seen1) == 10


def test_make_synthetic_layout_determinism_and_tight_boxes(tmp_path):
    root = D.make_synthetic(tmp_path / "a", n_train=4, n_test=2, size=128)
    again = D.make_synthetic(tmp_path / "b", n_train=4, n_test=2, size=128)
    for rel in ("rgb/train/labelTxt/rgb_train_0000.txt", "sar/test/annotations.json", "instructions/ir.jsonl"):
        assert (root / rel).read_bytes() == (again / rel).read_bytes()
    rgb = D.load_detection_split(root / "rgb" / "train", "rgb")
    sar = D.load_detection_split(root / "sar" / "test", "sar")
    ir = D.load_detection_split(root / "ir" / "train", "ir")
    assert len(rgb) == 4 and len(sar) == 2 and sar.box_type == "hbb" and ir.classes == ["plane", "ship", "vehicle"]
    assert set(rgb.classes) == set(D.CONCEPTS)
    samples = D.read_instruction_jsonl(root / "instructions" / "rgb.jsonl")
    assert samples[0]["conversations"][0]["value"].startswith("<image>\n")
    assert any("<box>[[" in s["conversations"][1]["value"] for s in samples)
    meta = json.loads((root / "instructions" / "meta.json").read_text())
    assert set(meta) == {"synthsoi_rgb", "synthsoi_sar", "synthsoi_ir"}
    # every RGB box sits on drawn pixels: the box interior differs from the background
    item = rgb[0]
    img = item["image"].double()
    for b in item["boxes"]:
        x, y = int(b[0]), int(b[1])
        assert (img[:, y, x] - img[:, 2, 2]).abs().sum() > 60


def test_a_larger_synthetic_test_split_extends_the_small_one(tmp_path):
    """Tiny protocol v3 scores on 200 test images a modality: its first ones are the 16 of the default
    split, a later call without n_test keeps what is there, and a rewrite leaves no stale images."""
    small = D.make_synthetic(tmp_path / "small", n_train=2, n_test=2, size=64, modalities=("rgb",))
    large = D.make_synthetic(tmp_path / "large", n_train=2, n_test=5, size=64, modalities=("rgb",))
    for rel in ("rgb/test/labelTxt/rgb_test_0001.txt", "rgb/test/images/rgb_test_0001.png",
                "rgb/train/labelTxt/rgb_train_0001.txt"):
        assert (small / rel).read_bytes() == (large / rel).read_bytes()
    D.make_synthetic(tmp_path / "large", n_train=2, size=64, modalities=("rgb",))  # n_test=None: as written
    assert len(D.load_detection_split(large / "rgb" / "test", "rgb")) == 5
    D.make_synthetic(tmp_path / "large", n_train=2, n_test=3, size=64, modalities=("rgb",))
    assert len(list((large / "rgb" / "test" / "images").iterdir())) == 3
    D.make_synthetic(tmp_path / "large", n_train=3, size=64, modalities=("rgb",))  # other settings: 16 again
    assert len(list((large / "rgb" / "test" / "images").iterdir())) == 16
