"""Every ```python block of README.md runs on its own: in a fresh interpreter, in an empty directory."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_readme_has_python_snippets():
    assert len(SNIPPETS) >= 4


@pytest.mark.parametrize("code", SNIPPETS, ids=[f"snippet {i + 1}" for i in range(len(SNIPPETS))])
def test_snippet_runs_on_its_own(code, tmp_path):
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"README snippet failed:\n{code}\n--- stderr ---\n{result.stderr[-3000:]}"
