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
