"""Every command in the code blocks of the README and docs/ still fits the code: each `train.py` command parses
with its stage's real flags and presets, each tiny `tables.py --sweep` resolves (`--dry-run`), each
`eval.py` and `tables.py --table / --plot` command parses, and every SynthSOI path it names exists once SynthSOI is generated. (Running them
takes minutes each; the quick ones run in the other tests.)"""
import re
import shlex
from pathlib import Path

import eval as ev
import tables
import train

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list:
    text = "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        current = ""
        for line in block.splitlines():
            if line.lstrip().startswith("#"):
                continue
            line = line.split("  #")[0].rstrip()
            if not line:
                continue
            current += line.rstrip("\\") + " "
            if not line.endswith("\\"):
                commands.append(current.strip())
                current = ""
    return commands


def _argv(command: str, script: str):
    """The arguments after `script` in a python / torchrun command line, or None."""
    command = re.sub(r"<[^>]*>", "PLACEHOLDER", command.replace("[--strict]", "--strict"))  # runs/<time>
    tokens = shlex.split(command)
    return tokens[tokens.index(script) + 1:] if script in tokens else None


def test_readme_commands_fit_the_code(tmp_path, monkeypatch, synthsoi):
    commands = readme_commands()
    assert len(commands) > 30
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "synthsoi").symlink_to(synthsoi)  # the session's SynthSOI, read only
    checked = 0
    for command in commands:
        if "$" in command or " ... " in command or re.match(r"[A-Z_]+=|--", command):
            continue  # shell variables of the paper-scale sweeps (their lines), elided flags
        for token in shlex.split(command):
            for path in re.findall(r"(data/synth\w*[\w/]*)", token, re.I):
                assert (tmp_path / path).exists(), f"README: {command}: no {path} in SynthSOI"
        argv = _argv(command, "train.py")
        if argv is not None and "--resume" not in argv:
            train.parse_config(argv)
            checked += 1
        argv = _argv(command, "tables.py")
        if argv is not None:
            if "--sweep" in argv:
                if "--scale" not in argv:
                    assert tables.main(argv + ["--dry-run", "--runs", str(tmp_path / "runs")]) == 0, command
            else:
                tables.build_parser().parse_args(argv)
            checked += 1
        argv = _argv(command, "eval.py")
        if argv is not None:
            ev.build_parser().parse_args(argv)
            checked += 1
    assert checked > 25
