"""numba's set-up started early in a ``modelfuse merge`` process (modelfuse/_early.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from modelfuse._early import merge_command


@pytest.mark.parametrize(("argv", "expected"), [
    (["/usr/bin/modelfuse", "merge", "recipe.yml", "-o", "out"], True),
    (["-m", "merge", "recipe.yml"], True),  # `python -m modelfuse.cli merge`, while the package is imported
    (["modelfuse", "--verbose", "merge", "recipe.yml"], True),
    (["modelfuse", "plan", "recipe.yml"], False),
    (["modelfuse", "eval", "merge"], False),  # "merge" as an argument of another command
    (["/usr/bin/python", "merge"], False),
    (["modelfuse"], False),
    ([], False),
])
def test_merge_command_lines(argv: list[str], expected: bool) -> None:
    assert merge_command(argv) is expected


def test_a_merge_process_starts_numba_while_importing() -> None:
    """Importing modelfuse in a merge command line starts the set-up thread, which imports numba; elsewhere
    (a library import) nothing starts and numba is not imported."""
    probe = ("import sys, threading; sys.argv = {argv!r}; import modelfuse; "
             "names = [t.name for t in threading.enumerate()]; "
             "[t.join() for t in threading.enumerate() if t.name == 'modelfuse-numba-set-up']; "
             "print('modelfuse-numba-set-up' in names, 'numba' in sys.modules)")
    merging = subprocess.run([sys.executable, "-c", probe.format(argv=["modelfuse", "merge", "r.yml"])],
                             capture_output=True, text=True, check=True)
    assert merging.stdout.split() == ["True", "True"]
    library = subprocess.run([sys.executable, "-c", probe.format(argv=["script.py"])],
                             capture_output=True, text=True, check=True)
    assert library.stdout.split()[0] == "False"
