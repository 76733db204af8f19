"""Auditing: planted neurons are found by text and by meaning; audits save, load, export."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest

from neuroviz import audit
from neuroviz.store import LabelRow, Store

FILLERS = ["red", "green", "striped", "dotted", "grass", "sky", "dog", "car wheel", "wooden table", "water", "circles", "kitchen"]


def _label_run(store: Store, run, method: str, planted: dict[int, str], skip: set[int] = frozenset()) -> None:
    rows = [LabelRow(n, 0, planted.get(n, FILLERS[n % len(FILLERS)]), 0.5, 0.9) for n in range(run.n_neurons) if n not in skip]
    rows += [LabelRow(n, 1, "surface" if n == 40 else "blue", 0.1) for n in range(run.n_neurons) if n not in skip]
    store.save_labels(f"test-{method}-{run.run_key}", run.run_key, method, {}, {}, None, rows, "test labels")


@pytest.fixture(scope="module")
def audited(tiny_workspace, tmp_path_factory):
    """A private copy of tiny_workspace's cache with planted labels:
    layer4 #17 'human faces' (clip_dissect) and 'faces of people near a window' (milan),
    layer2 #5 'printed text', and 'surface' as a runner-up label of layer4 #40."""
    root = tmp_path_factory.mktemp("audit-cache")
    shutil.copytree(tiny_workspace["store"].root, root, dirs_exist_ok=True)
    store = Store(root)
    runs = tiny_workspace["runs"]
    _label_run(store, runs["layer2"], "clip_dissect", {5: "printed text"})
    _label_run(store, runs["layer4"], "clip_dissect", {17: "human faces"})
    _label_run(store, runs["layer4"], "milan", {17: "faces of people near a window"}, skip=set(range(100, 512)))
    return {**tiny_workspace, "store": store}


def _search(ws, query, **options):
    return audit.search(ws["store"], ws["model"].spec, ws["probe_set"].id, query, audit.AuditOptions(**options))


def test_text_search_finds_the_planted_face_neuron(audited):
    result = _search(audited, "face", match_meaning=False)
    found = {(h.layer, h.neuron, h.method) for h in result.hits}
    assert found == {("layer4", 17, "clip_dissect"), ("layer4", 17, "milan")}
    top = result.hits[0]
    assert top.label == "human faces" and top.match_kind == "phrase" and top.match_score == audit.TEXT_SCORES["phrase"]
    assert len(top.top_images) == 8 and all(Path(im["path"]).exists() for im in top.top_images)
    assert [im["rank"] for im in top.top_images] == list(range(8))
    assert set(result.layers_searched) == {"layer2", "layer4", "fc"}
    assert result.neurons_by_layer() == {"layer4": [17]}


def test_substring_and_runner_up_labels_are_opt_in(audited):
    plain = _search(audited, "face", match_meaning=False, all_ranks=True)
    assert ("layer4", 40) not in {(h.layer, h.neuron) for h in plain.hits}  # "surface" is not the word "face"
    loose = _search(audited, "face", match_meaning=False, all_ranks=True, substring=True)
    surface = [h for h in loose.hits if h.label == "surface"]
    assert {(h.layer, h.neuron, h.rank, h.match_kind) for h in surface} == {(l, 40, 1, "substring") for l in ("layer2", "layer4")}
    assert loose.hits[0].match_score > surface[0].match_score


def test_meaning_search_finds_planted_neurons_without_shared_words(audited):
    faces = _search(audited, "facial features", match_text=False)
    assert faces.hits and {(h.layer, h.neuron) for h in faces.hits} == {("layer4", 17)}
    assert all(h.match_kind == "meaning" and h.match_score >= 0.5 for h in faces.hits)
    assert faces.text_backend_id.startswith("conse")
    assert _search(audited, "facial features", match_meaning=False).hits == []
    text = _search(audited, "lettering, handwriting")
    assert next((h.layer, h.neuron, h.label) for h in text.hits) == ("layer2", 5, "printed text")
    assert text.hits[0].matched_term == "lettering"


def test_audits_save_list_load_export_and_delete(audited, tmp_path):
    store = audited["store"]
    result = _search(audited, "faces, text", methods=["clip_dissect"])
    assert {(h.layer, h.neuron) for h in result.hits} >= {("layer4", 17), ("layer2", 5)}
    assert all(h.method == "clip_dissect" for h in result.hits)
    audit_id = audit.save_audit(store, result)
    listed = {a["id"]: a for a in audit.list_audits(store, audited["model"].spec)}
    assert listed[audit_id]["query"] == "faces, text" and listed[audit_id]["n_hits"] == len(result.hits)
    loaded = audit.load_audit(store, audit_id)
    assert loaded.hits == result.hits and loaded.options == result.options and loaded.created == result.created
    csv_path, json_path = audit.export_audit(loaded, tmp_path)
    lines = csv_path.read_text().splitlines()
    assert lines[0].startswith(f"# audit {audit_id}")
    rows = list(csv.DictReader(io.StringIO("\n".join(lines[1:]))))
    assert [(r["layer"], int(r["neuron"])) for r in rows] == [(h.layer, h.neuron) for h in result.hits]
    assert len(rows[0]["top_image_ids"].split()) == 8
    assert json.loads(json_path.read_text())["query"] == "faces, text"
    link = audit.neuron_page_link(result.hits[0], audited["model"].spec, audited["probe_set"].id)
    assert link.startswith("neuron?model=torchvision%3Aresnet18") and "&neuron=" in link and "&probe=" in link
    audit.delete_audit(store, audit_id)
    assert audit_id not in {a["id"] for a in audit.list_audits(store)}
    with pytest.raises(audit.AuditError, match="No saved audit"):
        audit.load_audit(store, audit_id)


def test_unusable_queries_fail_clearly(audited):
    with pytest.raises(audit.AuditError, match="Type a word"):
        _search(audited, " , ")
    with pytest.raises(audit.AuditError, match="extract some layers"):
        audit.search(audited["store"], "offline:nothing", audited["probe_set"].id, "face")
    with pytest.raises(audit.AuditError, match="text matching, meaning matching"):
        _search(audited, "face", match_text=False, match_meaning=False)


def test_text_match_rules():
    assert audit.text_match("face", "Faces") == (1.0, "exact")
    assert audit.text_match("dog face", "a dog face close-up")[1] == "phrase"
    assert audit.text_match("dog face", "face of a dog")[1] == "words"
    assert audit.text_match("text", "textile") is None
    assert audit.text_match("text", "textile", substring=True)[1] == "substring"


def test_audit_page_searches_saves_and_links_to_neurons(audited, monkeypatch):
    from tests.conftest import dashboard_env, open_page

    dashboard_env(monkeypatch, audited["store"].root)
    at = open_page("views/audit.py", model=audited["model"].spec)
    at.text_input(key="audit_query").input("face")
    at.radio(key="audit_mode").set_value("text")
    next(b for b in at.button if b.label == "Search").click().run()
    assert not at.exception and not at.error, [e.value for e in [*at.exception, *at.error]]
    assert [m.value for m in at.markdown if m.value.startswith("**")][:2] == ["**human faces**", "**faces of people near a window**"]
    link = at.get("page_link")[0].proto
    assert link.page == "neuron" and "layer=layer4&neuron=17" in link.query_string
    assert len(at.get("image")) >= 2  # the hits' top-image thumbnails
    at.button(key="audit_save").click().run()
    assert [a["query"] for a in audit.list_audits(audited["store"])].count("face") == 1
