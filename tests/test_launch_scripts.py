"""Every launch/ script runs as a script, the way users and the deepspeed launcher start it.

As a script its folder comes first on sys.path: a file there named like a standard-library
module (select.py, say) would shadow it for torch's imports and break every script.
"""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p.name for p in (ROOT / "launch").glob("*.py") if p.name != "__init__.py")


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_help_runs(script):
    done = subprocess.run([sys.executable, str(ROOT / "launch" / script), "--help"], capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout


def test_no_script_shadows_the_standard_library():
    shadowing = [s for s in SCRIPTS if s[:-3] in sys.stdlib_module_names]
    assert not shadowing, f"rename {shadowing}: they shadow standard-library modules"
