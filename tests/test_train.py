"""train.py --stage finetune and eval.py --run, end to end on a very small model: exact resume,
clean errors, non-finite stops, DDP with two CPU processes, scoring with several modalities."""
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import datasets
import eval as evaluation
import tables
import train

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--resnet", "", "--image_size", "64", "--dim", "32", "--heads", "2", "--enc_layers", "1", "--dec_layers", "1", "--ffn", "32",
         "--num_queries", "10", "--num_dn_queries", "4", "--gn_groups", "8", "--batch_size", "2", "--global_batch", "2", "--eval", "false"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return datasets.make_synthetic(tmp_path_factory.mktemp("synth"), n_train=8, n_test=4, size=128, max_objects=4)


def read_log(run):
    return [json.loads(line) for line in (Path(run) / "log.jsonl").read_text().splitlines()]


def test_presets_and_flags():
    stage, cfg = train.parse_config(["--preset", "paper", "--resnet", "r50.pth", "--max-steps", "7", "--lr_steps", "30", "33"])
    assert stage == "finetune" and cfg.backbone == "resnet50" and cfg.lr == 1e-4 and cfg.lr_mult == 0.1
    assert cfg.max_steps == 7 and cfg.lr_steps == [30, 33] and cfg.frozen_bn and cfg.enc_layers == 6
    _, tiny = train.parse_config(["--augment", "false", "--data-fraction", "0.1"])
    assert tiny.backbone == "resnet18" and tiny.augment is False and tiny.data_fraction == 0.1


def test_lr_schedule():
    cfg = train.FinetuneConfig(lr=1.0, warmup=10, warmup_ratio=0.25, lr_steps=[2])
    assert train.lr_at(0, cfg, 100) == pytest.approx(0.25)
    assert train.lr_at(5, cfg, 100) == pytest.approx(0.25 + 0.75 * 0.5)
    assert train.lr_at(10, cfg, 100) == 1.0 and train.lr_at(199, cfg, 100) == 1.0
    assert train.lr_at(200, cfg, 100) == pytest.approx(0.1)


def test_data_fraction_is_a_fixed_subset(synth):
    ds = datasets.load_detection_split(synth / "rgb" / "train", "rgb")
    a, b = datasets.subset(ds, 0.25, seed=1), datasets.subset(ds, 0.25, seed=1)
    assert len(a) == 2 and [s.name for s in a.samples] == [s.name for s in b.samples]
    assert len(datasets.subset(ds, 0.01, seed=1)) == 1


def test_resume_continues_exactly(synth, tmp_path):
    data = ["--data", f"rgb:{synth / 'rgb'}"]
    assert train.main(SMALL + data + ["--max-steps", "6", "--out", str(tmp_path / "straight")]) == 0
    assert train.main(SMALL + data + ["--max-steps", "3", "--out", str(tmp_path / "split")]) == 0
    assert train.main(["--resume", str(tmp_path / "split"), "--max-steps", "6"]) == 0
    assert json.loads((tmp_path / "split" / "config.json").read_text())["stage"] == "finetune"
    with pytest.raises(datasets.DatasetError, match="a finetune run, not --stage csia"):
        train.parse_config(["--stage", "csia", "--resume", str(tmp_path / "split")])
    straight, split = read_log(tmp_path / "straight"), read_log(tmp_path / "split")
    assert [r["step"] for r in split] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(straight, split):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-6)
    assert {"loss_cls", "grad_norm", "lr", "samples_per_s", "dn_loss_giou"} <= {k.split(".", 1)[-1] for k in split[-1]}
    assert sorted(p.name for p in (tmp_path / "split").iterdir()) == [
        "config.json", "log.jsonl", "model.json", "model.safetensors", "state.pt"]


def test_bad_data_stops_with_one_line(tmp_path, capsys):
    split = tmp_path / "bad" / "train"
    (split / "images").mkdir(parents=True)
    (split / "labelTxt").mkdir()
    from PIL import Image
    Image.new("RGB", (32, 32)).save(split / "images" / "a.png")
    (split / "labelTxt" / "a.txt").write_text("1 1 10 1 10 10 1 10 ship 0\n1 1 10 1 10 ship\n")
    out = tmp_path / "run"
    assert train.main(SMALL + ["--data", f"rgb:{tmp_path / 'bad'}", "--out", str(out)]) == train.EXIT_BAD_DATA
    err = capsys.readouterr().err
    assert "a.txt:2:" in err and "Traceback" not in err and not out.exists()
    assert train.main(SMALL + ["--data", f"xray:{tmp_path}"]) == train.EXIT_BAD_DATA
    assert "MODALITY:PATH" in capsys.readouterr().err
    assert train.main(SMALL + ["--resnet", str(tmp_path / "missing.pth"), "--out", str(out)]) == train.EXIT_BAD_DATA
    assert "missing.pth" in capsys.readouterr().err and not out.exists()


def test_non_finite_loss_stops_cleanly(synth, tmp_path, capsys):
    run = tmp_path / "run"
    code = train.main(SMALL + ["--data", f"rgb:{synth / 'rgb'}", "--lr", "1e30", "--warmup", "0", "--max-steps", "20",
                               "--out", str(run)])
    assert code == train.EXIT_NONFINITE
    log = read_log(run)
    import math
    assert not (math.isfinite(log[-1]["loss"]) and math.isfinite(log[-1]["grad_norm"])) and len(log) < 20
    assert f"step {log[-1]['step']}: non-finite" in capsys.readouterr().err


def test_two_sources_init_and_eval_run(synth, tmp_path, capsys):
    rgb = tmp_path / "rgb"
    assert train.main(SMALL + ["--data", f"rgb:{synth / 'rgb'}", "--max-steps", "2", "--out", str(rgb)]) == 0
    both = tmp_path / "both"
    argv = SMALL + ["--data", f"rgb:{synth / 'rgb'}", f"sar:{synth / 'sar'}", "--source_ratio", "1", "1",
                    "--loss_weights", "1.5", "1", "--max-steps", "2", "--init", str(rgb), "--out", str(both)]
    assert train.main(argv) == 0
    out = capsys.readouterr().out
    assert "missing: heads.sar." in out and "heads.rgb" not in out.split("--init")[1].split("\n", 1)[1].split("{")[0]
    log = read_log(both)
    assert "rgb.loss_angle" in log[0] and "sar.loss_giou" in log[0] and "sar.loss_angle" not in log[0]
    assert evaluation.main(["--run", str(both)]) == 0
    metrics = json.loads((both / "metrics.json").read_text())
    assert set(metrics["sources"]) == {"rgb", "sar"}
    for m in ("rgb", "sar"):
        r = metrics["sources"][m]
        assert {"ap50", "ap75", "map", "voc07_ap50", "voc07_ap75", "per_class"} <= set(r) and 0 <= r["map"] <= 1
    assert metrics["sources"]["sar"]["box_type"] == "hbb"
    assert {"overall_map", "h_map"} <= set(metrics)
    printed = capsys.readouterr().out
    assert "H-mAP" in printed and "voc07_ap50" in printed and "Overall" in printed
    assert evaluation.main(["--run", str(tmp_path)]) == 2  # not a run folder: one line, status 2
    # the figures of these runs and Tab. 2 over the scored one
    assert tables.main(["--plot", str(both), str(rgb), "--out", str(tmp_path / "figs")]) == 0
    names = {p.name for p in (tmp_path / "figs").iterdir()}
    assert {"loss.png", "iterations.png", "detections_both.png", "detections_rgb.png", "pr_confusion_rgb.png"} <= names
    assert "loss_grad_norm.png" not in names  # Fig. 7 is drawn for runs trained with AMP
    assert tables.main(["--table", "babelrs-table2", str(both), "--out", str(tmp_path / "t2")]) == 0
    row = (tmp_path / "t2.csv").read_text().splitlines()[1].split(",")
    assert row[:2] == ["ours", "both"] and float(row[-1]) == pytest.approx(100 * metrics["h_map"], abs=1e-2)


def test_sweep_commands_share_runs_and_skip_finished(tmp_path, capsys):
    root = tmp_path / "runs"
    assert tables.main(["--sweep", "babelrs-table5", "--runs", str(root), "--dry-run"]) == 0
    cmds = [l for l in capsys.readouterr().out.splitlines() if l.startswith("[sweep]")]
    # protocol v3: 8 seeds of (d) and the last-layer baseline, 3 of the other merges (csia + finetune each)
    assert len(cmds) == 2 * 2 * 8 + 3 * 2 * 3 and cmds[-1].endswith(f"--seed 7 --out {root}/ft-csia-lvsa-s200-tau60-off-seed7")
    assert not any("-concat-" in c and "-seed3" in c for c in cmds) and any("-last-" in c and "-seed7" in c for c in cmds)
    assert tables.main(["--sweep", "babelrs-table5", "--runs", str(root), "--dry-run", "--seeds", "1"]) == 0
    cmds = [l for l in capsys.readouterr().out.splitlines() if l.startswith("[sweep]")]
    assert len(cmds) == 10 and sum("--stage csia" in c for c in cmds) == 5
    assert all(f"--merge {m}" in " ".join(cmds) for m in tables.MERGES)
    assert f"--init {root}/csia-lvsa-s200-tau60-seed0 " in cmds[-1] + " " and "--epochs 4 --lr_steps 2.667 3.667" in cmds[-1]
    # Tab. 3 reuses Tab. 5's row (d): finished runs are skipped, started ones resumed
    (root / "csia-lvsa-s200-tau60-seed0").mkdir(parents=True)
    (root / "csia-lvsa-s200-tau60-seed0" / "finished.json").write_text("{}")
    (root / "ft-generic-off-seed0").mkdir()
    (root / "ft-generic-off-seed0" / "config.json").write_text("{}")
    assert tables.main(["--sweep", "babelrs-table3", "--runs", str(root), "--dry-run", "--seeds", "1"]) == 0
    out = capsys.readouterr().out
    assert "csia-lvsa-s200-tau60-seed0: finished, skipped" in out
    assert f"--stage finetune --resume {root}/ft-generic-off-seed0" in out
    assert tables.main(["--sweep", "mutdet-table2", "--runs", str(root), "--dry-run", "--seeds", "1"]) == 0
    out = capsys.readouterr().out
    assert "--masks components" in out and "--no-enhance --embed-loss l1 --pseudo-classes 1" in out
    assert out.count("--stage finetune") == 3 and f"--init {root}/pre-mutdet-seed0" in out
    # Fig. 6: the τ rows fine-tune with the sweep's --amp (fp16 as in the paper unless told)
    for amp in ("fp16", "off"):
        assert tables.main(["--sweep", "babelrs-fig6", "--runs", str(root), "--dry-run", "--amp", amp, "--seeds", "1"]) == 0
        out = capsys.readouterr().out
        assert all(f"--amp {amp} --init {root}/csia-lvsa-s200-tau{t}-seed0 --seed 0 --out "
                   f"{root}/ft-csia-lvsa-s200-tau{t}-{amp}-seed0" in out for t in (0, 20, 100))
        assert "--steps 50 --tau 60" in out and "--ckpt_every 48" in out


def test_ddp_two_cpu_processes(synth, tmp_path):
    run = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(ROOT / "train.py")] + SMALL + ["--data", f"rgb:{synth / 'rgb'}", "--max-steps", "2", "--global_batch", "4",
                                              "--out", str(run)]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-2000:]
    log = read_log(run)
    assert [r["step"] for r in log] == [1, 2]  # rank 0 logs; each step saw 2 x 2 images
    assert (run / "model.safetensors").exists()


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_steps(synth, tmp_path, amp):
    run = tmp_path / amp
    assert train.main(SMALL + ["--data", f"rgb:{synth / 'rgb'}", "--amp", amp, "--max-steps", "2", "--out", str(run)]) == 0
    log = read_log(run)
    assert len(log) == 2 and all(math.isfinite(r["loss"]) for r in log)


def test_help_explains_every_flag_and_the_config_prints_as_a_table(capsys):
    for stage, (cls, _) in train.STAGES.items():
        docs = datasets.field_docs(cls)
        assert set(docs) == {f.name for f in dataclasses.fields(cls)}, stage  # every field has its comment
        with pytest.raises(SystemExit):
            train.main(["--stage", stage, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "[presets: tiny" in text
    assert "sample rate (repeat_time)" in datasets.field_docs(train.CSIAConfig)["rate_rgb"]
    table = train.format_config("csia", train.CSIA_PRESETS["tiny"]).splitlines()
    assert table[0] == "CSIAConfig:" and table[1].split() == ["stage", "csia"]
    assert len({line.index(line.split()[1]) for line in table[1:]}) == 1  # values start in one column


def test_table3_sweep_writes_submissions(tmp_path, capsys):
    assert tables.main(["--sweep", "mutdet-table3", "--dry-run", "--runs", str(tmp_path), "--seeds", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("eval.py --run") == 3 and "--zip" in out and "ft-mutdet-data1.0-dota-seed0/dota-test" in out


def test_global_batch_and_explicit_lr_scaling(capsys):
    stage, cfg = train.parse_config(["--stage", "finetune", "--preset", "paper", "--resnet", "r50.pth"])
    assert (cfg.global_batch, cfg.batch_size, cfg.lr) == (16, 2, 1e-4)
    assert train.accumulation(cfg.global_batch, cfg.batch_size, world=1) == 8  # one GPU: 8 micro-batches a step
    assert train.accumulation(cfg.global_batch, cfg.batch_size, world=8) == 1
    _, small = train.parse_config(["--stage", "finetune", "--preset", "paper", "--resnet", "r50.pth", "--global_batch", "8"])
    assert small.lr == 1e-4  # no silent rescaling
    _, lin = train.parse_config(["--stage", "finetune", "--preset", "paper", "--resnet", "r50.pth", "--global_batch", "8",
                                   "--lr_scaling", "linear"])
    _, sq = train.parse_config(["--stage", "mutdet", "--preset", "paper", "--resnet", "r50.pth", "--global_batch", "4",
                                  "--lr_scaling", "sqrt"])
    assert lin.lr == pytest.approx(5e-5) and sq.lr == pytest.approx(1e-4 * 0.5)
    assert "lr 0.0001 x (8 / 16) = 5e-05" in capsys.readouterr().out
    assert train.CSIA_PRESETS["paper"].global_batch == 128 and train.FINETUNE_PRESETS["babelrs"].global_batch == 32


def test_dry_run_prints_what_each_run_costs(tmp_path, capsys):
    assert tables.main(["--sweep", "mutdet-table2", "--dry-run", "--runs", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    row = next(l for l in out.splitlines() if l.startswith("pre-mutdet-seed0 ")).split()
    measured = json.loads((ROOT / "results" / "tiny_step.json").read_text())["mutdet:tiny"]
    assert row[1] == "mutdet" and int(row[4]) == 204  # 17 epochs of 12 steps (the tiny protocol)
    assert float(row[3]) == pytest.approx(measured["flops"] / 1e12, abs=0.01)  # global batch 4 = one micro-batch
    assert "hours on one GPU at 312 TFLOPS x 0.35 MFU" in out
    one = dict(tables.sweep_runs("babelrs-table3", "1gpu", dict(csia=[], finetune=[], sam=[], mutdet=[], weights=[])))
    assert one["csia-lvsa-s2000-tau600"][-4:] == ["--steps", "2000", "--tau", "600"]  # τ cut with the steps
    assert "--lr_steps" in one["ft-generic-off"] and "2.75" in one["ft-generic-off"]  # lr steps at 8/12 and 11/12


def test_compiled_run_matches_eager(synth, tmp_path):
    """--compile (inductor, the encoder layer) trains the same tiny run as eager, to float tolerance."""
    argv = SMALL + ["--data", f"rgb:{synth / 'rgb'}", "--max-steps", "2"]
    assert train.main(argv + ["--out", str(tmp_path / "eager")]) == 0
    assert train.main(argv + ["--compile", "true", "--out", str(tmp_path / "compiled")]) == 0
    eager, compiled = read_log(tmp_path / "eager"), read_log(tmp_path / "compiled")
    assert len(eager) == len(compiled) == 2
    for a, b in zip(eager, compiled):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


def test_a_sweep_runs_jobs_at_once_after_the_runs_they_read(tmp_path):
    """`tables.py --sweep ... --jobs 2`: two runs at a time, a run that reads another (`{runs}/X`) only
    once X is finished; each writes finished.json; a failure starts nothing more and is returned."""
    import sys
    import time
    assert tables.reads(["--init", "{runs}/pre-mutdet-seed1", "--data", "{runs}/sam", "--seed", "1"]) == \
        {"pre-mutdet-seed1", "sam"}

    def sleeper(name, seconds, status=0):  # writes when it started and ended
        code = (f"import time, pathlib; p = pathlib.Path({str(tmp_path)!r}); (p / '{name}.start').write_text(str(time.time())); "
                f"time.sleep({seconds}); (p / '{name}.end').write_text(str(time.time())); raise SystemExit({status})")
        return [sys.executable, "-c", code]
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
    todo = [("a", set(), sleeper("a", 1.0)), ("b", {"a"}, sleeper("b", 0.1)), ("c", set(), sleeper("c", 0.1))]
    t0 = time.time()
    assert tables.run_commands(todo[2:], dict(os.environ), 2, tmp_path / "fresh") == 0  # a sweep folder not made yet
    assert (tmp_path / "fresh" / "c.log").exists()
    (tmp_path / "c.start").unlink()
    assert tables.run_commands(todo, dict(os.environ), 2, tmp_path) == 0
    when = {f"{n}.{e}": float((tmp_path / f"{n}.{e}").read_text()) for n in "abc" for e in ("start", "end")}
    assert when["c.start"] < when["a.end"]  # c did not wait for a: two at once
    assert when["b.start"] >= when["a.end"]  # b reads a
    assert all((tmp_path / n / "finished.json").exists() for n in "abc") and (tmp_path / "a.log").exists()
    assert time.time() - t0 < 5
    # one at a time keeps the order; a failure stops the rest
    for name in ("d", "e"):
        (tmp_path / name).mkdir()
    assert tables.run_commands([("d", set(), sleeper("d", 0, status=7)), ("e", set(), sleeper("e", 0))],
                               dict(os.environ), 1, tmp_path) == 7
    assert not (tmp_path / "e.start").exists() and not (tmp_path / "d" / "finished.json").exists()


def test_sweep_rows_runs_a_part_of_a_table_with_what_it_reads(tmp_path, capsys):
    """--rows: the ViT gate of tiny-checks before the BabelRS tables; a row brings the runs it reads."""
    root = tmp_path / "runs"
    assert tables.main(["--sweep", "tiny-checks", "--runs", str(root), "--dry-run", "--seeds", "2",
                        "--rows", "ft-generic-off", "ft-random-off"]) == 0
    cmds = [l for l in capsys.readouterr().out.splitlines() if l.startswith("[sweep]")]
    assert [c.rsplit("--out ", 1)[1] for c in cmds] == [f"{root}/{r}-seed{k}" for k in range(2)
                                                        for r in ("ft-generic-off", "ft-random-off")]
    assert tables.main(["--sweep", "babelrs-table3", "--runs", str(root), "--dry-run", "--seeds", "1",
                        "--rows", "ft-csia-lvsa-s200-tau60-off"]) == 0
    cmds = [l for l in capsys.readouterr().out.splitlines() if l.startswith("[sweep]")]
    assert len(cmds) == 2 and "--stage csia" in cmds[0] and cmds[1].endswith("ft-csia-lvsa-s200-tau60-off-seed0")
    with pytest.raises(SystemExit, match="--rows ft-nothing: not a row of tiny-checks"):
        tables.main(["--sweep", "tiny-checks", "--runs", str(root), "--dry-run", "--rows", "ft-nothing"])
