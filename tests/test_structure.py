"""The layering DESIGN and the README promise: the science package knows nothing of Prefect or the flows;
the command line sits above both."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_science_package_imports_no_prefect_and_no_flows():
    script = (
        "import pkgutil, sys, importlib, pathflow\n"
        "for m in pkgutil.iter_modules(pathflow.__path__):\n"
        "    if m.name != '__main__':\n"
        "        importlib.import_module('pathflow.' + m.name)\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('prefect', 'flows', 'tasks', 'pathflow_cli'))\n"
        "print(len([n for n in sys.modules if n.startswith('pathflow.')]), bad)\n")
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    n, bad = r.stdout.split(" ", 1)
    assert int(n) > 20 and bad.strip() == "[]", r.stdout
    # and the command line is a package of its own, one module per command group
    assert not (ROOT / "pathflow" / "cli.py").exists()
    assert {p.stem for p in (ROOT / "pathflow_cli").glob("*.py")} >= {"__init__", "common", "run", "study", "graphs",
                                                                       "runs"}
