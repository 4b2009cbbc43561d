"""The house rules of DESIGN.md that a change can break without any other test noticing: imports run
one way down the file table, no top-level file grows much past 1,400 lines, and each file's opening
docstring says what it may import."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bottom to top; a file may import only files of a lower rank (babelrs and mutdet share one)
RANK = dict(rotated_ops=0, datasets=1, detection=2, babelrs=3, mutdet=3, eval=4, train=5, tables=6, bench=7)


def _project_imports(name: str) -> set:
    tree = ast.parse((ROOT / f"{name}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in RANK}
        elif isinstance(node, ast.ImportFrom) and node.module in RANK:
            found.add(node.module)
    return found - {name}


def test_imports_run_one_way_down():
    upward = [(m, i) for m in RANK for i in _project_imports(m) if RANK[i] >= RANK[m]]
    assert upward == []
    assert "tables" not in _project_imports("train") | _project_imports("eval")  # no alias runs back up


def test_files_stay_small_and_say_what_they_may_import():
    for name in RANK:
        text = (ROOT / f"{name}.py").read_text()
        assert len(text.splitlines()) <= 1450, f"{name}.py holds two concerns: split it (DESIGN.md)"
        assert "May import:" in ast.get_docstring(ast.parse(text)), f"{name}.py: its docstring names no imports"
