"""Readers of DOTA-v1.5 / v2.0 class sets, HRSC2016 (1 and 31 classes) and FAIR1M, on small files
written from each format's description; the boxes checked with shapely (exact polygons)."""
import math

import numpy as np
import pytest
import shapely
from PIL import Image

import datasets
import train

HRSC_OBJECT = """  <HRSC_Object>
   <Object_ID>{oid}</Object_ID><Class_ID>{cid}</Class_ID><Object_NO>1</Object_NO>
   <truncated>0</truncated><difficult>{diff}</difficult>
   <box_xmin>0</box_xmin><box_ymin>0</box_ymin><box_xmax>1</box_xmax><box_ymax>1</box_ymax>
   <mbox_cx>{cx}</mbox_cx><mbox_cy>{cy}</mbox_cy><mbox_w>{w}</mbox_w><mbox_h>{h}</mbox_h><mbox_ang>{ang}</mbox_ang>
   <header_x>10</header_x><header_y>10</header_y>
  </HRSC_Object>
"""


def hrsc_xml(objects, image_id="100000001"):
    body = "".join(HRSC_OBJECT.format(oid=i, **o) for i, o in enumerate(objects))
    return (f"<?xml version='1.0' encoding='utf-8'?>\n<HRSC_Image>\n <Img_ID>{image_id}</Img_ID>\n"
            f" <Img_SizeWidth>300</Img_SizeWidth><Img_SizeHeight>200</Img_SizeHeight>\n"
            f" <HRSC_Objects>\n{body} </HRSC_Objects>\n</HRSC_Image>\n")


def fair1m_xml(objects):
    objs = "".join(
        "<object><coordinate>pixel</coordinate><type>rectangle</type><description>None</description>"
        f"<possibleresult><name>{name}</name></possibleresult><points>"
        + "".join(f"<point>{x:.6f},{y:.6f}</point>" for x, y in pts + [pts[0]]) + "</points></object>"
        for name, pts in objects)
    return (f"<?xml version='1.0' encoding='utf-8'?><annotation><source><filename>0.tif</filename>"
            f"<origin>GF2/GF3</origin></source><research><version>1.0</version></research>"
            f"<size><width>300</width><height>200</height><depth>3</depth></size><objects>{objs}</objects></annotation>")


SHIPS = [dict(cid="100000002", diff=0, cx=120.5, cy=80.25, w=90.0, h=20.0, ang=0.6),    # aircraft carrier
         dict(cid="100000099", diff=1, cx=200.0, cy=150.0, w=40.0, h=12.0, ang=-1.2)]   # an ID outside the 31


def check_rectangle(poly, cx, cy, w, h, ang):
    """The polygon is the rectangle (cx, cy, w, h) whose w side turns clockwise on screen by ang."""
    p = shapely.Polygon(np.asarray(poly, np.float64).reshape(4, 2))
    assert p.is_valid and p.area == pytest.approx(w * h, rel=1e-5)
    assert (p.centroid.x, p.centroid.y) == pytest.approx((cx, cy), abs=1e-3)
    xy = np.asarray(poly, np.float64).reshape(4, 2)
    sides = [xy[(i + 1) % 4] - xy[i] for i in range(4)]
    long = max(sides, key=np.linalg.norm)
    # the long side is parallel to (cos ang, sin ang) in image coordinates (y down)
    assert abs(long[0] * math.sin(ang) - long[1] * math.cos(ang)) / np.linalg.norm(long) < 1e-5


def test_hrsc_one_class_and_31_classes(tmp_path):
    f = tmp_path / "100000001.xml"
    f.write_text(hrsc_xml(SHIPS))
    one = datasets.read_hrsc_xml(f)
    assert one["labels"] == ["ship", "ship"] and not one["difficult"].any()  # no difficult objects, as mmrotate
    for poly, o in zip(one["polys"], SHIPS):
        check_rectangle(poly, o["cx"], o["cy"], o["w"], o["h"], o["ang"])
    many = datasets.read_hrsc_xml(f, classwise=True)
    assert many["labels"] == ["aircraft carrier"] and len(many["polys"]) == 1
    assert len(datasets.CLASS_SETS["hrsc2016-31"]) == 31 and len(datasets.HRSC_CLASS_IDS) == 31


def test_hrsc_split_folder_by_class_set(tmp_path):
    for split in ("Train", "Test"):
        d = tmp_path / "HRSC2016" / split
        (d / "AllImages").mkdir(parents=True)
        (d / "Annotations").mkdir()
        Image.new("RGB", (300, 200)).save(d / "AllImages" / "100000001.bmp")
        (d / "Annotations" / "100000001.xml").write_text(hrsc_xml(SHIPS))
    [src] = datasets.detection_sources([f"rgb:{tmp_path / 'HRSC2016'}"])
    assert src["train"].endswith("Train") and src["test"].endswith("Test") and "classes" not in src
    ds = datasets.load_detection_split(src["train"], "rgb", src.get("classes"))
    assert datasets.detect_format(src["train"]) == "hrsc" and ds.classes == ["ship"] and len(ds[0]["boxes"]) == 2
    [src] = datasets.detection_sources([f"rgb:{tmp_path / 'HRSC2016'}:hrsc2016-31"])
    ds = datasets.load_detection_split(src["test"], "rgb", src["classes"])
    assert ds.classes[1] == "aircraft carrier" and ds[0]["labels"].tolist() == [1]


def test_fair1m_reader_and_split(tmp_path):
    objects = [("Small Car", [(10.0, 10.0), (30.0, 10.0), (30.0, 20.0), (10.0, 20.0)]),
               ("Boeing737", [(100.5, 50.0), (140.5, 90.0), (120.5, 110.0), (80.5, 70.0)])]
    d = tmp_path / "FAIR1M" / "validation"
    (d / "images").mkdir(parents=True)
    (d / "labelXml").mkdir()
    Image.new("RGB", (300, 200)).save(d / "images" / "0.tif")
    (d / "labelXml" / "0.xml").write_text(fair1m_xml(objects))
    a = datasets.read_fair1m_xml(d / "labelXml" / "0.xml")
    assert a["labels"] == ["Small Car", "Boeing737"]
    np.testing.assert_allclose(a["polys"][1], [100.5, 50, 140.5, 90, 120.5, 110, 80.5, 70])
    [src] = datasets.detection_sources([f"rgb:{tmp_path / 'FAIR1M'}:fair1m"])
    assert src["test"].endswith("validation") and len(src["classes"]) == 37
    ds = datasets.load_detection_split(src["test"], "rgb", src["classes"])
    assert [ds.classes[i] for i in ds[0]["labels"].tolist()] == ["Small Car", "Boeing737"]
    p = shapely.Polygon(np.asarray(objects[1][1]))
    b = ds[0]["boxes"][1].double()
    assert float(b[2] * b[3]) == pytest.approx(p.area, rel=1e-4)  # a rectangle: its min-area box is itself


def one_dota_image(root, line: str):
    """A DOTA split folder `root/train` of one 64-px image labelled with `line`."""
    d = root / "train"
    (d / "images").mkdir(parents=True)
    (d / "labelTxt").mkdir()
    Image.new("RGB", (64, 64)).save(d / "images" / "P0001.png")
    (d / "labelTxt" / "P0001.txt").write_text(line + "\n")
    return d


def test_dota_v15_v20_class_sets(tmp_path):
    one_dota_image(tmp_path / "dota15", "10 10 40 10 40 20 10 20 container-crane 0")
    [src] = datasets.detection_sources([f"rgb:{tmp_path / 'dota15'}:dota-v1.5"])
    ds = datasets.load_detection_split(src["train"], "rgb", src["classes"])
    assert len(ds.classes) == 16 and ds[0]["labels"].tolist() == [15]
    assert datasets.CLASS_SETS["dota-v2.0"][-2:] == ("airport", "helipad") and len(datasets.CLASS_SETS["dota-v2.0"]) == 18
    with pytest.raises(datasets.DatasetError, match="unknown category"):  # a v1.5 class under the v1.0 set
        datasets.load_detection_split(src["train"], "rgb", datasets.CLASS_SETS["dota-v1.0"])


@pytest.mark.parametrize("text, message", [
    ("<HRSC_Image><HRSC_Objects><HRSC_Object><mbox_cx>1</mbox_cx></HRSC_Object></HRSC_Objects></HRSC_Image>",
     "object 1: <mbox_cy> missing or not a number"),
    ("<HRSC_Image><HRSC_Objects>", "cannot parse xml"),
    ("<annotation><object/></annotation>", "not an HRSC2016 annotation"),
])
def test_hrsc_errors_name_the_file(tmp_path, text, message):
    f = tmp_path / "bad.xml"
    f.write_text(text)
    with pytest.raises(datasets.DatasetError, match=message) as e:
        datasets.read_hrsc_xml(f)
    assert "bad.xml" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("point, message", [("12;3", "is not 'x,y'"), ("nan,3", "not finite")])
def test_fair1m_errors_name_the_file(tmp_path, point, message):
    f = tmp_path / "7.xml"
    f.write_text("<annotation><objects><object><possibleresult><name>Van</name></possibleresult><points>"
                 + f"<point>{point}</point>" + "<point>1,2</point>" * 4 + "</points></object></objects></annotation>")
    with pytest.raises(datasets.DatasetError, match=message) as e:
        datasets.read_fair1m_xml(f)
    assert "7.xml" in str(e.value)


def test_train_reads_the_class_set(tmp_path):
    """finetune trains the heads of the class set, in its order (a released checkpoint's heads)."""
    one_dota_image(tmp_path / "dota20", "10 10 40 10 40 20 10 20 helipad 0")
    cfg = train.parse_config(["--stage", "finetune", "--preset", "tiny", "--data", f"rgb:{tmp_path / 'dota20'}:dota-v2.0"],
                             check_weights=False)[1]
    [src] = train.resolve_sources(cfg, 0)
    assert src["classes"] == list(datasets.CLASS_SETS["dota-v2.0"])
