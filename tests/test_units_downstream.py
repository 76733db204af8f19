"""Everything downstream takes a unit run (issue 14.3): analysis, audit, studies and editing
work on an SAE's latents apart from the layer's neurons, raters never learn the unit kind,
and dead latents (never active on the probe set) get no label and show as dead.

The SAE is made by hand (random, seeded) so one latent is dead for certain: its encoder bias
is so negative that its ReLU code is 0 at every position of every image."""

from __future__ import annotations

import csv
import io
import json
import re

import numpy as np
import pytest
import torch

from neuroviz import analysis, audit, editing, extract
from neuroviz import study as studies
from neuroviz.cli import build_parser, main
from neuroviz.hooks import LayerRecorder
from neuroviz.methods.base import DEAD_CAPTION, dead_units
from neuroviz.requests import AnalyzeRequest, EditRequest
from neuroviz.store import LabelRow
from neuroviz.units import NEURONS, Dictionary, per_position, save_dictionary, short_units

DEAD = 7  # the latent that never fires
LATENTS = 48
PLANTED_LATENT, PLANTED_NEURON = 11, 3  # both labelled "printed text", for the audit
PLANTED_METHOD = "linear_explanations"  # labels only the planted units and the dead latent


def hand_made_sae(dim: int, layer: str, model_spec: str, weights_id: str) -> Dictionary:
    rng = np.random.default_rng(5)
    dec = rng.normal(size=(LATENTS, dim)).astype(np.float32)
    dec /= np.linalg.norm(dec, axis=1, keepdims=True)
    bias = np.full(LATENTS, 0.1, np.float32)
    bias[DEAD] = -1e6
    encoder = np.abs(rng.normal(size=(LATENTS, dim))).astype(np.float32)  # layer2 is a ReLU output: all fire but one
    return Dictionary("sae", "handmade-sae-downstream-0001", encoder, bias, dec,
                      np.zeros(dim, np.float32), 2.0, "topk", LATENTS,  # every code kept: only the dead one is 0
                      meta={"model_spec": model_spec, "weights_id": weights_id, "layer": layer, "created_at": 0.0,
                            "hyperparams": {"expansion": "0.375", "k": LATENTS}})


@pytest.fixture(scope="module")
def unit_ws(tmp_path_factory, image_folder):
    """The dashboard test cache (labelled neuron runs of layer2/layer4/fc) plus the hand-made
    SAE's unit run on layer2, labelled by the same two methods (dead latent included, as a
    workspace labelled before dead units were skipped has it)."""
    from neuroviz import models
    from neuroviz.catalog import probe_set_from_store
    from neuroviz.sae import extract_units
    from tests.conftest import dashboard_env
    from tests.test_pages import add_probe_labels, build_dashboard_cache

    root = tmp_path_factory.mktemp("units_downstream")
    info = build_dashboard_cache(root, image_folder)
    store = info["store"]
    model = models.create(info["model_spec"], image_size=64)
    probe_set = probe_set_from_store(store, info["probe_set_id"])
    d = hand_made_sae(model.layer("layer2").n_neurons, "layer2", model.spec, model.weights_id)
    save_dictionary(store, d)
    run = extract_units(store, model, probe_set, d, k=10)
    add_probe_labels(store, run)
    for r, planted in ((run, (PLANTED_LATENT, DEAD)), (info["runs"]["layer2"], (PLANTED_NEURON,))):
        store.save_labels(f"planted-{r.run_key}", r.run_key, PLANTED_METHOD, {}, {"planted": 1}, None,
                          [LabelRow(n, 0, "printed text", 1.0, 0.9) for n in planted], "test")
    env = pytest.MonkeyPatch()
    dashboard_env(env, root)
    yield {**info, "model": model, "probe_set": probe_set, "dictionary": d, "unit_run": run,
           "short": short_units(d.units_id)}
    env.undo()


def page(unit_ws, view: str, **query):
    from tests.conftest import open_page

    return open_page(f"views/{view}.py", model=unit_ws["model_spec"], layer="layer2", units=unit_ws["short"], **query)


def assert_clean(at) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def all_text(at) -> str:
    """Every element's message on the page (labels, captions, HTML, image captions, links)."""
    out: list[str] = []

    def walk(node) -> None:
        proto = getattr(node, "proto", None)
        if proto is not None:
            out.append(str(proto))
        for child in getattr(node, "children", {}).values():
            walk(child)

    walk(at._tree)
    return "\n".join(out)


# -- dead latents ---------------------------------------------------------------------------------
def test_dead_latents_are_not_labelled_and_show_as_dead(unit_ws, capsys, tmp_path):
    store, run = unit_ws["store"], unit_ws["unit_run"]
    (tmp_path / "concepts.txt").write_text("red\ngreen\nblue\ncircle\nsquare\nrocket\ncoffee\ncat\n")
    assert dead_units(store, run) == [DEAD]
    assert dead_units(store, unit_ws["runs"]["layer2"]) == []  # the neurons all fire somewhere
    argv = ["--cache", str(store.root), "label", unit_ws["model_spec"], "--probe", unit_ws["probe_set_id"],
            "--layers", "layer2", "--units", unit_ws["short"], "--methods", "clip_dissect", "--concepts", str(tmp_path / "concepts.txt"),
            "--neurons", f"0-{DEAD + 2}"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"labelled {DEAD + 2} latents" in out and f"skipped 1 latent: {DEAD_CAPTION}" in out
    key = next(line.split("label key ")[1].rstrip(")") for line in out.splitlines() if "label key" in line)
    assert DEAD not in set(store.labelled_neurons(key)) and len(store.labelled_neurons(key)) == DEAD + 2
    assert main(["--cache", str(store.root), "labels", unit_ws["model_spec"], "--probe", unit_ws["probe_set_id"],
                 "--layer", "layer2", "--units", unit_ws["short"], "--limit", "500"]) == 0
    out = capsys.readouterr().out
    assert f"1 latent unlabelled, {DEAD_CAPTION}: {DEAD}" in out
    assert not any(line.split()[0] == str(DEAD) for line in out.splitlines()[2:] if line.split())  # its stale labels are hidden
    at = page(unit_ws, "browser")
    assert_clean(at)
    html = [str(h.proto.body) for h in at.get("html")]
    assert sum(DEAD_CAPTION in h for h in html) == 1  # latent 7's card, and no other
    at = page(unit_ws, "neuron", neuron=DEAD)
    assert_clean(at)
    assert any(DEAD_CAPTION in i.value for i in at.info)
    at = page(unit_ws, "neuron", neuron=DEAD + 1)
    assert not any(DEAD_CAPTION in i.value for i in at.info)


# -- analysis ---------------------------------------------------------------------------------------
def test_analysis_takes_a_unit_run_apart_from_the_neurons(unit_ws, capsys):
    store, spec, ps_id, run = unit_ws["store"], unit_ws["model_spec"], unit_ws["probe_set_id"], unit_ws["unit_run"]
    neurons = analysis.category_shares(store, spec, ps_id, methods=["milan"])
    latents = analysis.category_shares(store, spec, ps_id, methods=["milan"], units=unit_ws["short"])
    assert set(latents["run_key"]) == {run.run_key} and set(latents["n_neurons"]) == {LATENTS}
    assert run.run_key not in set(neurons["run_key"]) and set(neurons["layer"]) == {"layer2", "layer4"}
    assert set(latents["n_labelled"]) == {LATENTS - 1}  # the dead latent's stale label is not counted
    assert latents.groupby("method")["share"].sum().to_numpy() == pytest.approx(1.0)
    every = analysis.category_shares(store, spec, ps_id, analysis.AnalysisConfig(unlabelled="uninterpretable"),
                                     methods=["milan"], units=unit_ws["short"])
    assert every["count"].sum() == pytest.approx(LATENTS - 1) and set(every["n_dead"]) == {1}  # dead: not uninterpretable
    groups = analysis.neuron_categories(store, run, "milan", analysis.AnalysisConfig(unlabelled="uninterpretable"))
    assert sum(map(len, groups.values())) == LATENTS - 1 and DEAD not in {n for g in groups.values() for n in g}
    config, imp = analysis.AnalysisConfig(), analysis.ImportanceConfig()
    assert analysis.importance_key(store, spec, ps_id, "milan", config, imp, units=unit_ws["short"]) != \
        analysis.importance_key(store, spec, ps_id, "milan", config, imp)
    with pytest.raises(analysis.AnalysisError, match="No runs of units 'sae:zzzzzzzz'"):
        analysis.category_shares(store, spec, ps_id, units="sae:zzzzzzzz")
    args = build_parser().parse_args(AnalyzeRequest(spec, ps_id, "milan", units=unit_ws["dictionary"].units_id).argv())
    assert args.units == unit_ws["dictionary"].units_id
    assert main(["--cache", str(store.root), "analyze", spec, "--probe", ps_id, "--image-size", "64",
                 "--units", unit_ws["short"], "--json", "--methods", "milan"]) == 0
    shares = json.loads(capsys.readouterr().out)["shares"]
    assert {r["run_key"] for r in shares} == {run.run_key}
    at = page(unit_ws, "analysis")
    assert_clean(at)
    assert at.query_params["units"] == unit_ws["short"]
    assert any("latents of" in c.value for c in at.caption) and len(at.get("plotly_chart")) == 1


# -- audit --------------------------------------------------------------------------------------------
def test_audit_names_the_unit_kind_and_keeps_latents_apart(unit_ws, capsys, tmp_path):
    store, spec, ps_id, d = unit_ws["store"], unit_ws["model_spec"], unit_ws["probe_set_id"], unit_ws["dictionary"]
    result = audit.search(store, spec, ps_id, "printed text", audit.AuditOptions(match_meaning=False))
    found = {(h.place, h.unit_word, h.neuron) for h in result.hits}
    place = f"layer2 · SAE latents {d.key[:8]}"
    assert found == {("layer2", "neuron", PLANTED_NEURON), (place, "latent", PLANTED_LATENT)}  # dead latent 7: not found
    assert {"layer2", place} <= set(result.layers_searched)
    assert result.neurons_by_layer() == {"layer2": [PLANTED_NEURON]}
    assert result.neurons_by_layer(d.units_id) == {"layer2": [PLANTED_LATENT]}
    latent_hit = next(h for h in result.hits if h.units != NEURONS)
    assert "units=sae%3A" + d.key[:8] in audit.neuron_page_link(latent_hit, spec, ps_id)
    rows = list(csv.DictReader(io.StringIO("\n".join(audit.audit_to_csv(result).splitlines()[1:]))))
    assert {(r["units"], int(r["neuron"])) for r in rows} == {(NEURONS, PLANTED_NEURON), (d.units_id, PLANTED_LATENT)}
    assert audit.Audit.from_dict(result.to_dict()).hits == result.hits
    only = audit.search(store, spec, ps_id, "printed text", audit.AuditOptions(match_meaning=False, units=[NEURONS]))
    assert [(h.layer, h.neuron, h.units) for h in only.hits] == [("layer2", PLANTED_NEURON, NEURONS)]
    assert main(["--cache", str(store.root), "audit", spec, "printed text", "--probe", ps_id, "--image-size", "64",
                 "--text-only"]) == 0
    out = capsys.readouterr().out
    assert f"{place} latent {PLANTED_LATENT}" in out and re.search(rf"layer2 +neuron {PLANTED_NEURON} ", out)
    at = page(unit_ws, "audit")
    at.text_input(key="audit_query").input("printed text")
    at.radio(key="audit_mode").set_value("text")
    next(b for b in at.button if b.label == "Search").click().run()
    assert_clean(at)
    captions = [c.value for c in at.caption]
    assert any(c.startswith(f"{place} · latent {PLANTED_LATENT}") for c in captions)
    assert any(c.startswith(f"layer2 · neuron {PLANTED_NEURON}") for c in captions)
    links = {link.proto.label: link.proto.query_string for link in at.get("page_link") if link.proto.label.startswith("Open ")}
    assert f"units=sae%3A{d.key[:8]}" in links["Open latent"] and "units" not in links["Open neuron"]


# -- studies ------------------------------------------------------------------------------------------
def test_a_study_over_latents_is_rated_blind_and_scored(unit_ws):
    from streamlit.testing.v1 import AppTest

    from tests.conftest import APP_PATH

    store, run, d = unit_ws["store"], unit_ws["unit_run"], unit_ws["dictionary"]
    stale = studies.choose_items(store, [run.run_key], ["milan", PLANTED_METHOD], per_layer=LATENTS)
    assert [i.neuron for i in stale] == [PLANTED_LATENT]  # latent 7 has both labels too, but it is dead
    methods = ["clip_dissect", "milan"]
    items = studies.choose_items(store, [run.run_key], methods, per_layer=3, seed=1)
    study = studies.create_study(store, "latents", items, methods, raters_per_item=1, gold_items=0, n_images=4)
    at = AppTest.from_file(str(APP_PATH), default_timeout=60)
    at.query_params["study"] = study.token
    at.run()
    at.text_input[0].input("Ada")
    at.button[0].click().run()
    seen = []
    while (radios := [r for r in at.radio if r.key and r.key.startswith("choice_")]):
        assert_clean(at)
        seen.append(all_text(at))
        radios[0].set_value("A")
        at.button[0].click().run()
    assert len(seen) == 3 and any("All done" in t.value for t in at.title)
    labels = {text for item in items for text in item.item_labels.values()}
    for text in seen:  # the rater never learns that these are latents, of which SAE
        assert studies.DEFAULT_PUBLIC_TITLE in text and any(label in text for label in labels)  # the page was read
        for word in ("latent", "Latent", "SAE", "sae:", d.key, d.key[:8], "layer2"):
            assert word not in text, word
    results = studies.study_results(store, study.study_id)
    assert results.n_votes == 3 and sum(s.wins for s in results.scores) == pytest.approx(3)  # every vote counted once
    (layer,) = results.by_layer
    assert layer.units == d.units_id and layer.place == f"layer2 · SAE latents {d.key[:8]}" and layer.n_votes == 3
    setup = page(unit_ws, "study_setup")
    assert_clean(setup)
    assert any("Items are latents of" in c.value for c in setup.caption)
    assert setup.multiselect(key="study_layers").value == ["layer2"]


# -- editing ------------------------------------------------------------------------------------------
def layer2_output(model, batch) -> torch.Tensor:
    with torch.inference_mode(), LayerRecorder(model.module.eval(), ["layer2"]) as rec:  # entered last: sees the edit
        model.module(batch)
        return rec.outputs["layer2"].clone()


def test_editing_a_latent_is_a_cached_edit_with_controls(unit_ws, capsys):
    store, model, ps, d = unit_ws["store"], unit_ws["model"], unit_ws["probe_set"], unit_ws["dictionary"]
    edit = editing.make_edit("no latent 11", model.spec, {"layer2": [PLANTED_LATENT]}, units=d.units_id)
    same_numbers = editing.make_edit("no neuron 11", model.spec, {"layer2": [PLANTED_LATENT]})
    assert edit.effect_key != same_numbers.effect_key and edit.unit_word == "latent"
    assert editing.Edit.from_record(edit.to_record()) == edit
    batch = next(iter(extract.image_loader(ps, model.transform, batch_size=6)))
    original = layer2_output(model, batch)
    rows, fold = per_position(original, model.layer("layer2").layout)
    codes = d.encode(rows)
    with editing.applied(model, edit, store):
        zeroed = layer2_output(model, batch)
    torch.testing.assert_close(original - zeroed, fold(d.contribution(codes, [PLANTED_LATENT])), rtol=1e-4, atol=1e-4)
    mean = editing.make_edit("latent 11 to its mean", model.spec, {"layer2": [PLANTED_LATENT]}, "mean", store, ps.id,
                             units=d.units_id)
    m = mean.values["layer2"][0]
    assert m == pytest.approx(float(store.activations(unit_ws["unit_run"].run_key)[:, PLANTED_LATENT].mean()), rel=1e-3)
    with editing.applied(model, mean, store):
        meaned = layer2_output(model, batch)
    shifted = codes.clone()
    shifted[:, PLANTED_LATENT] -= m
    torch.testing.assert_close(original - meaned, fold(d.contribution(shifted, [PLANTED_LATENT])), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer2_output(model, batch), original)  # reversible
    with pytest.raises(editing.EditError, match="0..47"):
        editing.evaluate_edit(model, editing.make_edit("x", model.spec, {"layer2": [LATENTS]}, units=d.units_id), ps, store)
    with pytest.raises(editing.EditError, match="dictionary of layer layer2"):
        editing.evaluate_edit(model, editing.make_edit("x", model.spec, {"layer4": [1]}, units=d.units_id), ps, store)
    # random controls are live latents: a dead one would change nothing and flatter any edit
    assert editing.control_exclusions(store, edit, ps.id) == {"layer2": [DEAD]}
    assert editing.control_exclusions(store, same_numbers, ps.id) == {}  # the layer's neurons all fire
    drawn = {n for seed in range(40) for n in editing.random_counterpart(
        editing.make_edit("many", model.spec, {"layer2": list(range(20))}, units=d.units_id), {"layer2": LATENTS}, seed,
        exclude={"layer2": [DEAD]}).neurons["layer2"]}
    assert drawn == set(range(20, LATENTS)) - {DEAD}
    # the job the page starts: `edit --units`, cached by provenance, with a random control of latents
    request = EditRequest.of(model.spec, ps.id, edit.name, edit.neurons, max_images=10, random_groups=1, units=d.units_id)
    assert build_parser().parse_args(request.argv()).units == d.units_id
    assert main(["--cache", str(store.root), *request.argv(), "--image-size", "64"]) == 0
    assert "this edit vs 1 random groups" in capsys.readouterr().out
    stored = editing.stored_comparison(store, edit, model.weights_id, ps.id, 10)
    assert stored is not None and stored.n_images == 10
    controls = editing.stored_controls(store, edit, model.weights_id, ps.id, 10, 1, {"layer2": LATENTS})
    assert controls is not None and len(controls) == 1
    (recent,) = [e for e in editing.recent_evaluations(store, model.spec) if e.edit.units == d.units_id]
    assert recent.edit.neurons == {"layer2": [PLANTED_LATENT]}
    # the page opens on that result, with the same before/after view and downloads
    at = page(unit_ws, "editing")
    assert_clean(at)
    text = "\n".join(s.value for s in at.subheader)
    assert f"Effect of '{edit.name}' (1 latent, zero)" in text
    assert {b.proto.label for b in at.get("download_button")} >= {"Per-class table (CSV)", "Everything (JSON)"}
    assert at.radio(key="editing_source_radio").options[2] == "A list of latents"
    at.number_input(key="editing_controls").set_value(1).run()
    assert_clean(at)
    assert any("random groups with as many latents" in m.value for m in at.markdown)
