"""The method documentation covers every registered method."""

from __future__ import annotations

import re
from pathlib import Path

from modelfuse.methods import all_methods

DOCS = Path(__file__).resolve().parents[1] / "docs" / "methods.md"


def test_every_method_has_a_documented_section() -> None:
    """Each registered method is named in a '## ' heading of docs/methods.md and listed in its table."""
    text = DOCS.read_text(encoding="utf-8")
    headings = " ".join(line for line in text.splitlines() if line.startswith("## "))
    documented = set(re.findall(r"`([a-z0-9_]+)`", headings))
    missing = [spec.name for spec in all_methods() if spec.name not in documented]
    assert not missing, f"docs/methods.md has no section for {missing}"
    for spec in all_methods():
        assert f"| `{spec.name}` |" in text, f"{spec.name} is missing from the overview table"


def test_ci_runs_the_readme_test_command_in_a_fresh_venv() -> None:
    """.ci/run makes a new virtual environment and runs the line README.md gives as the test command, which
    installs every test dependency (the dev extra) before pytest."""
    import subprocess

    root = DOCS.parents[1]
    script = (root / ".ci" / "run").read_text(encoding="utf-8")
    assert "python3 -m venv" in script
    extract = re.search(r'command="\$\((.*)\)"', script)
    assert extract is not None
    command = subprocess.run(["bash", "-c", extract.group(1)], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
    readme = (root / "README.md").read_text(encoding="utf-8").splitlines()
    assert command == readme[readme.index("# 2. set up and run the tests:") + 1]
    assert command.startswith("pip install torch==2.13.0 && pip install -e \".[dev]\"")
    assert command.endswith("python -m pytest -q --durations=25")
