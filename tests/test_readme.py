"""The README's hybrid-loss example runs as written."""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_loss_example_runs(capsys):
    text = README.read_text()
    section = text.split("## The hybrid loss", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) <= 12
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out.split(" ", 1)
    assert np.isfinite(float(printed[0])) and "image_text" in printed[1]
