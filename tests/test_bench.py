"""Every benchmark runs in its quick mode (small sizes, seconds), so none can break silently; the
README's figures come from full runs."""
import pytest

import bench


@pytest.mark.parametrize("command", ["iou", "eval", "detr", "vit", "sam", "mutdet", "paper"])
def test_benchmark_runs_quick(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # SynthSOI goes to tmp_path/data
    bench.main([command, "--quick", "--threads", "2"])
    out = capsys.readouterr().out
    assert out.strip() and "nan" not in out.lower().replace("nan_to_num", "")
