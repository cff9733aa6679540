"""The documentation: the site builds strictly, its configuration reference is the config model's, the
deployment guide is deploy/README.md itself, and the README points at pages that exist."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_docs_build_strictly_with_the_config_reference(tmp_path):
    from pathflow.config import Config

    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env={"NO_MKDOCS_2_WARNING": "1", "PATH": ""})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    reference = (tmp_path / "site" / "configuration" / "index.html").read_text()
    keys = [f"{s}.{k}" for s, f in Config.model_fields.items() for k in f.annotation.model_fields]
    assert len(keys) > 60 and all(f"<code>{k}</code>" in reference for k in keys)
    assert "<!-- config-reference -->" not in reference
    deploying = (tmp_path / "site" / "deploying" / "index.html").read_text()
    assert "The pools come first" in deploying and "prefect --no-prompt deploy --all" in deploying


def test_readme_is_short_and_points_at_pages_that_exist():
    readme = (ROOT / "README.md").read_text()
    assert len(readme) < 12_000  # what pathflow is, the two set-up commands, a tour, links
    assert "<!-- run-command -->" in readme and "<!-- test-command -->" in readme
    links = re.findall(r"\]\((docs/[^)#]+)\)", readme)
    assert len(links) >= 5 and all((ROOT / link).is_file() for link in links)
