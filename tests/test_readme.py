"""The README's "A first look" block runs as written: a newcomer copies it first."""
from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def first_look_code() -> str:
    """The first ```python block under the "## A first look" heading."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = text.split("## A first look", 1)[1]
    match = re.search(r"```python\n(.*?)\n```\n", section, re.S)
    assert match, "README.md: no python block under '## A first look'"
    return match.group(1)


def test_first_look_runs_and_writes_the_graph(tmp_path) -> None:
    code = first_look_code()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    loss = float(re.search(r"loss after 100 compiled steps: ([0-9.]+)", r.stdout).group(1))
    assert loss < 0.5                                 # log(3) = 1.10 untrained: it learned
    assert "program(" in r.stdout and "wall" in r.stdout       # the IR and the profile
    mermaid = (tmp_path / "train_step.md").read_text()
    assert mermaid.startswith("```mermaid\nflowchart TD") and "matmul" in mermaid
    assert (tmp_path / "train_step.dot").read_text().startswith("digraph")
