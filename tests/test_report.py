"""Step 5's report and graph export, on a real pipeline run of the demo bundle."""

import json
import shutil
import subprocess
import sys

import pytest
from pydantic import BaseModel

from .conftest import clean_env, require

CHROMIUM = shutil.which("chromium") or "chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def run_dir(demo_dir, prefect_api, tmp_path_factory):
    store = tmp_path_factory.mktemp("report-store")
    r = subprocess.run([sys.executable, "-m", "pathflow", "run", "-c", str(demo_dir / "config.yaml"), "--store",
                        str(store)], env=clean_env(PREFECT_API_URL=prefect_api), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (d,) = (store / "runs").iterdir()
    return d


# The attribution-graphs frontend's JSON, restated from circuit-tracer's pydantic models.
class Metadata(BaseModel):
    slug: str
    scan: str
    transcoder_list: list[str]
    prompt_tokens: list[str]
    prompt: str
    node_threshold: float | None = None
    schema_version: int | None = 1


class QParams(BaseModel):
    pinnedIds: list[str]
    supernodes: list[list[str]]
    linkType: str
    clickedId: str
    sg_pos: str


class Node(BaseModel):
    node_id: str
    feature: int
    layer: str
    ctx_idx: int
    feature_type: str
    jsNodeId: str
    activation: float | None = None


class Link(BaseModel):
    source: str
    target: str
    weight: float


def test_graph_export_matches_the_viewer_format(run_dir):
    feats = json.loads((run_dir / "integrated/features.json").read_text())["features"]
    for r in feats:
        for prompt, cands in r["candidates"].items():
            g = json.loads((run_dir / f"integrated/graphs/{r['feature']}_{prompt}.json").read_text())
            Metadata(**g["metadata"])
            QParams(**g["qParams"])
            nodes = [Node(**n) for n in g["nodes"]]
            links = [Link(**link) for link in g["links"]]
            ids = {n.node_id for n in nodes}
            assert len(ids) == len(nodes) and all(link.source in ids and link.target in ids for link in links)
            target = f"{r['layer']}_{r['feature_id']}_{len(g['metadata']['prompt_tokens']) - 1}"
            assert {link.target for link in links} == {target}
            assert [link.weight for link in links] == [c["attribution"] for c in cands]


def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    require("chromium")
    page = f"file://{run_dir / 'integrated' / 'report.html'}"
    feats = [r["feature"] for r in json.loads((run_dir / "integrated/features.json").read_text())["features"]]
    base = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0"]
    dom = subprocess.run([*base, "--dump-dom", page], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line]
    assert not console, console  # the report logs nothing: any console message is an error or a stray log
    for f in feats:  # every feature's graph is in the rendered page
        assert f'<svg class="pathway" data-feature="{f}"' in dom.stdout
    shot = tmp_path / "report.png"
    r = subprocess.run([*base, "--window-size=1200,2000", f"--screenshot={shot}", page], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and shot.stat().st_size > 20_000  # a page with pictures, not a blank one
