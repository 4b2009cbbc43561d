"""Every benchmark runs in its quick mode (small sizes, seconds), so none can break silently; the
README's figures come from full runs."""
import pytest

import bench


@pytest.mark.parametrize("command", ["iou", "eval", "detr", "vit", "sam", "mutdet", "paper", "tiny"])
def test_benchmark_runs_quick(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # SynthSOI goes to tmp_path/data
    bench.main([command, "--quick", "--threads", "2"])
    out = capsys.readouterr().out
    assert out.strip() and "nan" not in out.lower().replace("nan_to_num", "")


def test_gpu_check_dry_run(tmp_path, monkeypatch):
    """`bench.py gpu --dry-run`: every part of the GPU check at the smallest sizes on the CPU, its JSON
    and Markdown written; on a machine without CUDA the real check refuses in one line."""
    import json
    monkeypatch.chdir(tmp_path)
    assert bench.main(["gpu", "--dry-run", "--threads", "2", "--out", str(tmp_path / "gpu")]) == 0
    report = json.loads((tmp_path / "gpu" / "cpu-dry-run.json").read_text())
    assert report["ok"] and not report["errors"] and len(report["correctness"]) == 7 and len(report["tiny_rows"]) == 2
    assert set(report["paper_steps"]) == {f"{s}:{p}" for s, p in bench.PAPER_STEPS}
    assert all(h > 0 for h in report["table_hours"].values()) and len(report["peers"]) == 4
    assert "| MutDet pre-trainer | ok" in (tmp_path / "gpu" / "cpu-dry-run.md").read_text()
    import torch
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA device"):
            bench.main(["gpu", "--threads", "2"])


def test_the_tiny_steps_compute_what_the_baseline_computed(tmp_path, monkeypatch):
    """The speed work of the tiny steps leaves the numbers alone: 3 seeded optimizer steps of every tiny
    step (quick sizes) give the losses that the baseline's code gave (`bench.TINY_BASELINE`, recorded in
    its own process by `bench.py tiny --quick --losses tests/fixtures/tiny_losses.json`), to float32
    rounding."""
    import json
    from pathlib import Path
    record = json.loads((Path(__file__).parent / "fixtures" / "tiny_losses.json").read_text())
    assert record["commit"] == bench.TINY_BASELINE and record["quick"]
    monkeypatch.chdir(tmp_path)  # the quick SynthSOI goes to tmp_path/data
    now = bench._losses_tiny(quick=True)
    assert now.keys() == record["losses"].keys()
    for name, losses in now.items():
        assert losses == pytest.approx(record["losses"][name], rel=1e-5), name
