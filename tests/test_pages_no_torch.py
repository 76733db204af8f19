"""No page loads torch: each page module runs in a fresh interpreter, through app.py, and
``torch`` must not be in ``sys.modules`` afterwards.

Pages only draw; model work (extraction, labelling, synthesis, edits, importance) runs in
background jobs. A page that imported torch would pay seconds of import time on a cold
server and could load a model in the script thread. The check runs the real page with
Streamlit's AppTest against a small labelled workspace, in a subprocess so that nothing the
test process already imported counts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import APP_PATH

ROOT = APP_PATH.parent
PAGES = sorted(p.name for p in (ROOT / "views").glob("*.py"))

RUN_PAGE = """
import json, sys
from streamlit.testing.v1 import AppTest

app, page, query = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
at = AppTest.from_file(app, default_timeout=180)
for key, value in query.items():
    at.query_params[key] = value
at.run()
if page:
    at.switch_page(page).run()
if page.endswith("neuron.py"):  # every overlay the methods offer draws without a model too
    from neuroviz.methods import list_methods

    for overlay in ["heatmap"] + [o.key for m in list_methods() for o in m.overlays()]:
        at.get("button_group")[0].set_value(overlay).run()
        assert at.get("image"), overlay
print(json.dumps({
    "torch": "torch" in sys.modules,
    "exceptions": [str(e.value) for e in at.exception],
    "errors": [str(e.value) for e in at.error],
    "titles": [str(t.value) for t in at.title],
}))
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, image_folder):
    """A labelled tiny workspace (as tests/test_pages.py builds it) with one study."""
    from neuroviz import study as studies
    from tests.test_pages import METHODS, build_dashboard_cache

    info = build_dashboard_cache(tmp_path_factory.mktemp("no_torch_cache"), image_folder)
    runs = [info["runs"]["layer2"].run_key]
    items = studies.choose_items(info["store"], runs, list(METHODS), per_layer=2, seed=0)
    info["study"] = studies.create_study(info["store"], "no torch", items, list(METHODS), raters_per_item=1,
                                         gold_items=0, n_images=4)
    return info


def run_page(cache: Path, page: str | None, **query: str) -> dict:
    """Run app.py (then ``page``) once in a fresh interpreter; what it reported."""
    env = dict(os.environ, NEUROVIZ_CACHE=str(cache), NEUROVIZ_UI_RAISE="1", PYTHONPATH=str(ROOT))
    env.pop("NEUROVIZ_OWNER_PASSWORD", None)
    done = subprocess.run([sys.executable, "-c", RUN_PAGE, str(APP_PATH), page or "", json.dumps(query)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("page", PAGES)
def test_page_runs_without_importing_torch(workspace, page):
    layer = workspace["runs"]["layer2"]
    if page == "rate.py":  # raters reach only their rating page, through their link
        report = run_page(workspace["store"].root, None, study=workspace["study"].token)
    else:
        report = run_page(workspace["store"].root, f"views/{page}", layer=layer.layer, neuron="3")
    assert not report["exceptions"] and not report["errors"], report
    assert report["titles"], f"{page} drew no title"
    assert not report["torch"], f"views/{page} imported torch"


def test_imagenet_class_names_are_torchvisions():
    """The class names kept as data (so pages and the lexicon need no torch) are torchvision's."""
    from torchvision.models import MobileNet_V2_Weights

    from neuroviz.offline_weights import imagenet_class_names

    assert imagenet_class_names() == list(MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"])
