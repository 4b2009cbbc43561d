"""What a new user meets first on real scenes and at the command line: prediction that
never writes over an input or loses output, says why nothing was drawn, skips an unreadable image and
says so; files readable under the usual umask; mistyped flags named with the closest right one;
Ctrl-C that checkpoints; paper-scale sweeps that refuse to train on SynthSOI; the next command of a
multi-modal run."""
import json
import os
import signal
import stat

import numpy as np
import pytest
from PIL import Image

import babelrs
import datasets
import eval as ev
import tables
import train
from test_predict import _run


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    g = np.random.default_rng(0)
    for name in ("a.png", "b.jpg"):
        Image.fromarray(g.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(folder / name)
    return folder


def test_prediction_refuses_to_write_over_its_inputs(tmp_path, images, capsys):
    run = _run(tmp_path)
    before = (images / "a.png").read_bytes()
    assert ev.main(["--run", str(run), "--predict", str(images), "--out", str(images)]) == 2
    assert "holds input images" in capsys.readouterr().err and (images / "a.png").read_bytes() == before
    (images / "a.jpg").write_bytes((images / "b.jpg").read_bytes())  # a.png and a.jpg: one name, two images
    assert ev.main(["--run", str(run), "--predict", str(images), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "one name (a) for two images" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_an_unreadable_image_is_skipped_and_named(tmp_path, images, capsys, monkeypatch):
    monkeypatch.setattr(ev, "TASK1_SCORE", 0.0)
    (images / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    run = _run(tmp_path)
    out = tmp_path / "o"
    assert ev.main(["--run", str(run), "--predict", str(images), "--out", str(out), "--score", "0.0"]) == 2
    captured = capsys.readouterr()
    assert "c.png" in captured.err and "skipped" in captured.err
    assert (out / "a.png").exists() and (out / "b.png").exists() and not (out / "c.png").exists()
    names = {l.split()[0] for l in (out / "Task1_ship.txt").read_text().splitlines()}
    assert names == {"a", "b"} and "2 images" in captured.out  # the summary counts what was written


def test_nothing_drawn_says_which_score_would_show_boxes(tmp_path, images, capsys):
    run = _run(tmp_path)  # an untrained detector scores about 0.01, under the default 0.3
    assert ev.main(["--run", str(run), "--predict", str(images / "a.png"), "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "no box reached --score 0.3; the highest score was" in out


def test_labels_are_capped_and_stay_inside_the_image(tmp_path):
    image = np.zeros((64, 64, 3), np.uint8)
    boxes = np.array([[2.0 + i % 60, 3.0, 6, 4, 0.0, 0.9 - i * 1e-4] for i in range(ev.MAX_LABELS + 50)])
    assert ev.draw_detections(image, [boxes], ["ship"], tmp_path / "d.png", 0.3) == len(boxes)
    drawn = np.asarray(Image.open(tmp_path / "d.png"))
    assert drawn.shape == image.shape and drawn.any()


def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        datasets.atomic_write_text(tmp_path / "x.txt", "x\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "x.txt").stat().st_mode) == 0o644


def test_a_mistyped_flag_is_named_with_the_closest_one(capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_config(["--max-step", "2"])  # an abbreviation is no longer taken
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--max-step (did you mean --max-steps?)" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit):
        ev.main(["--run", "x", "--scroe", "0.1"])
    assert "did you mean --score?" in capsys.readouterr().err
    assert ev.main(["--table", "babelrs-table3", "x"]) == 2 and "tables.py" in capsys.readouterr().err
    assert train.main(["--sweep", "babelrs-table3"]) == 2 and "tables.py --sweep" in capsys.readouterr().err


def test_ctrl_c_checkpoints_and_a_second_one_stops_at_once(tmp_path, monkeypatch, capsys):
    argv = ["--stage", "csia", "--vit", "", "--image_size", "32", "--vocab_size", "400", "--llm_dim", "32",
            "--llm_layers", "1", "--llm_ffn", "64", "--synth_root", str(tmp_path / "synth"), "--max-steps", "4"]
    datasets.make_synthetic(tmp_path / "synth")
    lr = train.cosine_lr

    def once(step, cfg):
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return lr(step, cfg)
    monkeypatch.setattr(train, "cosine_lr", once)
    assert train.main(argv + ["--out", str(tmp_path / "run")]) == train.EXIT_PREEMPTED
    assert train.checkpoint_pair(tmp_path / "run")[2] == 2 and "Ctrl-C" in capsys.readouterr().err

    def twice(step, cfg):
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return lr(step, cfg)
    monkeypatch.setattr(train, "cosine_lr", twice)
    assert train.main(argv + ["--out", str(tmp_path / "run2")]) == train.EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "interrupted: stopped at once" in err and "Traceback" not in err


def test_paper_scale_sweeps_need_their_data(tmp_path, capsys):
    with pytest.raises(SystemExit, match="--csia-args '--data ...' and --finetune-args '--data ...'"):
        tables.main(["--sweep", "babelrs-table3", "--scale", "1gpu", "--runs", str(tmp_path)])
    assert tables.main(["--sweep", "mutdet-table2", "--scale", "paper", "--runs", str(tmp_path), "--dry-run",
                        "--sam-args", "--data rgb:d", "--finetune-args", "--data rgb:d"]) == 0
    assert "warning" not in capsys.readouterr().out


def test_next_command_of_a_multi_modal_run_names_a_modality():
    assert "{hint}" in train.NEXT_COMMAND["finetune"]
    assert train.NEXT_COMMAND["finetune"].format(run="r", hint=" --modality sar").startswith(
        "python eval.py --run r --predict IMAGES --modality sar")


def test_input_that_is_silently_wrong_is_counted_and_said(tmp_path, capsys):
    """A label box past its image, one wholly outside it, an image without a label file: counted once
    for the data set; the corpus clips the first and leaves the second out of its answers."""
    split = tmp_path / "dota" / "train"
    (split / "images").mkdir(parents=True)
    for name in ("a", "b"):
        Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(split / "images" / f"{name}.png")
    datasets.write_dota_txt(split / "labelTxt" / "a.txt",
                            np.array([[10, 10, 40, 10, 40, 30, 10, 30.0],      # inside
                                      [80, 80, 130, 80, 130, 95, 80, 95],      # past the right border
                                      [300, 300, 340, 300, 340, 320, 300, 320]]),  # wholly outside
                            ["plane", "plane", "ship"])
    ds = datasets.load_detection_split(split)
    assert (ds.outside_boxes, ds.unlabelled_images) == (2, 1)
    assert "2 boxes reaching past their image kept" in ds.report() and "1 images without a label file" in ds.report()
    meta = babelrs.build_instruction_corpus([("rgb", split)], tmp_path / "corpus")
    out = capsys.readouterr().out
    assert "1 boxes clipped to their image" in out and "1 boxes wholly outside their image left out" in out
    rows = [json.loads(l) for l in (tmp_path / "corpus" / "rgb.jsonl").read_text().splitlines()]
    answer = rows[0]["conversations"][1]["value"]
    assert "two planes" in answer and "ship" not in answer and "1000, 1000, 1000, 1000" not in answer
    assert meta.exists()


def test_a_data_error_leaves_no_run_folder(tmp_path, capsys):
    bad = tmp_path / "bad" / "train"
    (bad / "images").mkdir(parents=True)
    (bad / "labelTxt").mkdir()
    (bad / "labelTxt" / "x.txt").write_text("1 2 3\n")  # a malformed DOTA line
    run = tmp_path / "run"
    assert train.main(["--stage", "csia", "--vit", "", "--data", f"rgb:{bad.parent}", "--out", str(run)]) == 2
    assert not run.exists() and "x.txt" in capsys.readouterr().err
    assert train.main(["--stage", "sam", "--sam", str(tmp_path / "missing"), "--out", str(tmp_path / "sam"),
                       "--synth_root", str(tmp_path / "synth"), "--resnet", ""]) == 2
    assert not (tmp_path / "sam").exists()


def test_foreign_class_names_are_said_not_dropped(tmp_path, images, capsys, monkeypatch):
    """--zip with classes the DOTA server does not know, and --dets with Task1 files of classes the
    annotations lack: one warning line naming them."""
    run = _run(tmp_path)  # classes ship, plane: "plane" is DOTA's, "ship" too; add a foreign one
    model_json = json.loads((run / "model.json").read_text())
    model_json["sources"][0]["classes"] = ["ship", "tank"]
    (run / "model.json").write_text(json.dumps(model_json))
    assert ev.main(["--run", str(run), "--predict", str(images / "a.png"), "--out", str(tmp_path / "o"), "--zip"]) == 0
    err = capsys.readouterr().err
    assert "tank is not a DOTA-v1.0 class" in err.replace("are not DOTA-v1.0 classes", "is not a DOTA-v1.0 class")
    ann = tmp_path / "ann"
    datasets.write_dota_txt(ann / "labelTxt" / "a.txt", np.array([[10, 10, 40, 10, 40, 30, 10, 30.0]]), ["ship"])
    (tmp_path / "dets").mkdir()
    (tmp_path / "dets" / "Task1_ship.txt").write_text("a 0.9 10 10 40 10 40 30 10 30\n")
    (tmp_path / "dets" / "Task1_vehicle.txt").write_text("a 0.9 10 10 40 10 40 30 10 30\n")
    assert ev.main(["--dets", str(tmp_path / "dets"), "--ann", str(ann / "labelTxt")]) == 0
    err = capsys.readouterr().err
    assert "not scored: vehicle" in err and len(err.strip().splitlines()) == 1
