"""Weight files are data: a `.pth` is a pickle, and a released checkpoint comes from a
file-sharing link. Every flag that reads one reads it with `weights_only=True` (or as safetensors):
a file whose pickle would run a command on load is refused in one line naming it, and the command
never runs."""
import os

import pytest
import torch

import detection
import train


class _RunsACommand:
    """Unpickling this calls os.system: what a hostile checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def hostile(tmp_path):
    marker = tmp_path / "the-command-ran"
    path = tmp_path / "released.pth"
    torch.save({"state_dict": {"backbone.conv1.weight": torch.zeros(1)}, "meta": _RunsACommand(marker)}, path)
    return path, marker


def test_the_loader_refuses_a_pickle_that_runs_code(hostile):
    path, marker = hostile
    with pytest.raises(ValueError, match="weights_only=True"):
        detection.load_state_file(str(path))
    assert not marker.exists()


@pytest.mark.parametrize("flags", [["--stage", "finetune", "--resnet", "{path}"],
                                   ["--stage", "finetune", "--resnet", "", "--init", "{path}"],
                                   ["--stage", "csia", "--vit", "{path}", "--image_size", "32"]])
def test_every_weight_flag_refuses_it_in_one_line(flags, hostile, tmp_path, capsys):
    path, marker = hostile
    argv = [f.format(path=path) for f in flags]
    status = train.main(argv + ["--synth_root", str(tmp_path / "synth"), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert status == train.EXIT_BAD_DATA and not marker.exists()
    assert str(path) in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_hostile_state_file_is_never_unpickled(hostile, tmp_path):
    path, marker = hostile
    run = tmp_path / "run"
    run.mkdir()
    os.replace(path, run / "state.pt")
    assert train.checkpoint_pair(run) is None and not marker.exists()  # not a checkpoint, and nothing ran
