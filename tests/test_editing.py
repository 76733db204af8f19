"""Editing: ablation hooks change exactly what they should, and never the weights."""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest
import torch
from torch import nn

from neuroviz import editing
from neuroviz.datasets import ProbeImage, ProbeSet, from_folder
from neuroviz.models import Preprocessing, ProbedModel
from neuroviz.provenance import hash_state_dict

COLOURS = ("red", "green", "blue", "yellow")


class ChannelClassifier(nn.Module):
    """Class j's logit is the spatial mean of channel j of ``relu`` and nothing else.

    A fixed 1x1 conv turns colours into four channel responses; its bias of 0.1 keeps
    every channel strictly positive, so zeroing channel j makes class j lose to every
    other class on exactly the images where it was on top, and changes no other image.
    """

    def __init__(self):
        super().__init__()
        self.colour = nn.Conv2d(3, 4, 1)
        with torch.no_grad():
            self.colour.weight.copy_(torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, -1.0]])[:, :, None, None])
            self.colour.bias.fill_(0.1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()

    def forward(self, x):
        return self.flatten(self.pool(self.relu(self.colour(x))))


def channel_model() -> ProbedModel:
    prep = Preprocessing(image_size=32, resize_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    return ProbedModel("custom:tests.test_editing:ChannelClassifier", ChannelClassifier().eval(), prep, list(COLOURS), "test model")


@pytest.fixture(scope="module")
def workspace(tiny_workspace, tmp_path_factory):
    """tiny_workspace with a private copy of its cache, so saved edits and prediction caches
    written here cannot leak into other test files that share the session fixture."""
    from neuroviz.store import Store

    root = tmp_path_factory.mktemp("editing-cache")
    shutil.copytree(tiny_workspace["store"].root, root, dirs_exist_ok=True)
    return {**tiny_workspace, "store": Store(root)}


@pytest.fixture(scope="module")
def colour_probe(image_folder) -> ProbeSet:
    """The fixture's images, labelled by colour name only (so labels map to class names)."""
    ps = from_folder(image_folder)
    images = [ProbeImage(im.image_id, im.path, im.label.split("/")[-1].split()[0] if im.label.startswith("shapes") else "")
              for im in ps.images]
    return ProbeSet("colours", ps.source + "#colours", images)


def test_ablating_a_channel_flips_exactly_its_images(colour_probe, workspace):
    store = workspace["store"]
    model = channel_model()
    before = editing.predict(model, colour_probe, store)
    shapes = [i for i, im in enumerate(colour_probe.images) if im.label]
    # the fixed filters classify every coloured shape correctly
    assert [COLOURS[c] for c in before.top1[shapes]] == [colour_probe.images[i].label for i in shapes]
    edit = editing.make_edit("no red", model.spec, {"relu": [0]})
    after = editing.predict(model, colour_probe, store, edit)
    expected = set(np.flatnonzero(before.top1 == 0).tolist())
    assert len(expected) >= 8  # 8 red shapes at least
    assert set(np.flatnonzero(before.top1 != after.top1).tolist()) == expected
    assert (after.top1[list(expected)] != 0).all()

    cmp = editing.compare(before, after, colour_probe, model.class_names)
    assert {c.image_idx for c in cmp.changed} == expected
    assert all(c.before_class == "red" and c.after_class != "red" for c in cmp.changed)
    assert cmp.n_labelled == 32 and cmp.accuracy_before == 1.0 and cmp.accuracy_after == pytest.approx(24 / 32)
    red = cmp.per_class.set_index("class_name").loc["red"]
    assert red["lost"] == len(expected) and red["predicted_after"] == 0 and red["accuracy_after"] == 0.0
    assert cmp.per_class.set_index("class_name").loc["green", "accuracy_after"] == 1.0


def test_random_counterpart_is_an_equal_size_control_from_the_other_neurons():
    edit = editing.make_edit("text", "custom:m", {"layer2": [3, 7, 9], "layer4": [100]})
    sizes = {"layer2": 128, "layer4": 512}
    controls = [editing.random_counterpart(edit, sizes, seed) for seed in range(20)]
    for control in controls:
        assert {k: len(v) for k, v in control.neurons.items()} == {"layer2": 3, "layer4": 1}
        assert not set(control.neurons["layer2"]) & {3, 7, 9} and 100 not in control.neurons["layer4"]
        assert all(0 <= n < sizes[layer] for layer, ns in control.neurons.items() for n in ns)
        assert control.mode == edit.mode and control.name.startswith("text-random-")
    assert editing.random_counterpart(edit, sizes, 5).neurons == controls[5].neurons  # seeded
    assert len({tuple(c.neurons["layer2"]) for c in controls}) > 15  # and really random
    with pytest.raises(editing.EditError, match="too few other neurons"):
        editing.random_counterpart(editing.make_edit("most", "custom:m", {"layer2": [0, 1, 2]}), {"layer2": 4}, 0)


def test_ablating_the_class_channel_beats_random_channels(colour_probe, workspace):
    """The control makes the point: zeroing the red channel flips every red image, while a
    random other channel flips only its own colour's images, never the red ones."""
    store, model = workspace["store"], channel_model()
    edit = editing.make_edit("no red", model.spec, {"relu": [0]})
    red = editing.evaluate_edit(model, edit, colour_probe, store)
    for seed in range(3):
        control = editing.evaluate_edit(model, editing.random_counterpart(edit, {"relu": 4}, seed), colour_probe, store)
        assert not {c.image_idx for c in control.changed} & {c.image_idx for c in red.changed}
        assert all(c.before_class != "red" for c in control.changed)


def test_edit_leaves_weights_untouched_and_hooks_removed(colour_probe):
    model = channel_model()
    state_hash = hash_state_dict(model.module.state_dict())
    x = torch.stack([model.transform(colour_probe.load(i)) for i in range(4)])
    reference = model.module(x)
    edit = editing.make_edit("zero two", model.spec, {"relu": [0, 2]}, "zero")
    with editing.applied(model, edit):
        edited = model.module(x)
        assert hash_state_dict(model.module.state_dict()) == state_hash
        # another thread (another Streamlit session sharing the cached model) sees no edit
        other = {}
        worker = threading.Thread(target=lambda: other.setdefault("out", model.module(x)))
        worker.start()
        worker.join()
        assert torch.equal(other["out"], reference)
    assert (edited[:, [0, 2]] == 0).all() and torch.equal(edited[:, [1, 3]], reference[:, [1, 3]])
    assert torch.equal(model.module(x), reference)  # hooks are gone
    assert not model.module.relu._forward_hooks
    assert hash_state_dict(model.module.state_dict()) == state_hash
    # a bad neuron fails clearly and leaves no hook behind
    with pytest.raises(editing.EditError, match="neurons 0..3"):
        with editing.applied(model, editing.Edit("bad", model.spec, {"colour": [1], "relu": [9]})):
            pass
    assert not model.module.colour._forward_hooks and not model.module.relu._forward_hooks


def test_mean_ablation_sets_the_pooled_value(workspace):
    store, probed, ps = workspace["store"], workspace["model"], workspace["probe_set"]
    edit = editing.make_edit("mean l2", probed.spec, {"layer2": [3, 5]}, "mean", store, ps.id)
    stats = store.neuron_stats(workspace["runs"]["layer2"].run_key).set_index("neuron")["mean"]
    assert edit.values["layer2"] == pytest.approx([stats[3], stats[5]])
    x = torch.stack([probed.transform(ps.load(i)) for i in range(3)])
    seen = {}  # layer3's input is the edited layer2 output
    handle = probed.module.layer3.register_forward_pre_hook(lambda m, inp: seen.setdefault("x", inp[0].clone()))
    try:
        with torch.no_grad(), editing.applied(probed, edit):
            probed.module(x)
    finally:
        handle.remove()
    maps = seen["x"][:, [3, 5]]
    assert torch.allclose(maps.mean(dim=(2, 3)), torch.tensor(edit.values["layer2"]).expand(3, 2), atol=1e-5)
    assert torch.allclose(maps.amax(dim=(2, 3)), maps.amin(dim=(2, 3)))  # constant maps


def test_edits_are_stored_listed_and_deleted(workspace):
    store, probed, ps = workspace["store"], workspace["model"], workspace["probe_set"]
    state_hash = hash_state_dict(probed.module.state_dict())
    edit = editing.make_edit("drop some layer4", probed.spec, {"layer4": [1, 2, 3]}, "mean", store, ps.id,
                             source={"audit": "x"})
    editing.save_edit(store, edit)
    assert "drop some layer4" in [e.name for e in editing.list_edits(store, probed.spec)]
    loaded = editing.load_edit(store, "drop some layer4")
    assert loaded.neurons == {"layer4": [1, 2, 3]} and loaded.mode == "mean" and loaded.values == edit.values
    assert store.get_record("edit", "drop some layer4")["model"] == probed.spec
    cmp = editing.evaluate_edit(probed, loaded, ps, store)
    assert cmp.n_images == len(ps) and 0.0 <= cmp.agreement <= 1.0
    assert cmp.accuracy_before is None  # a random ResNet has no class names to map labels to
    assert hash_state_dict(probed.module.state_dict()) == state_hash
    again = editing.evaluate_edit(probed, loaded, ps, store)  # served from the prediction cache
    assert again.summary() == cmp.summary()
    editing.delete_edit(store, "drop some layer4")
    assert "drop some layer4" not in [e.name for e in editing.list_edits(store)]
    with pytest.raises(editing.EditError, match="No edit named"):
        editing.load_edit(store, "drop some layer4")


def test_bad_edits_fail_with_clear_messages(workspace):
    store = workspace["store"]
    with pytest.raises(editing.EditError, match="at least one neuron"):
        editing.make_edit("x", "m", {"layer2": []})
    with pytest.raises(editing.EditError, match="mode"):
        editing.make_edit("x", "m", {"layer2": [1]}, "scramble")
    with pytest.raises(editing.EditError, match="extract it first"):
        editing.make_edit("x", "torchvision:resnet18@random", {"layer1": [1]}, "mean", store, workspace["probe_set"].id)
    with pytest.raises(editing.EditError, match="name"):
        editing.make_edit("", "m", {"layer2": [1]})


def test_label_mapping_uses_the_head_noun():
    names = ["tench", "lemon", "great white shark", "crane", "crane"]
    assert editing.map_labels_to_classes(["yellow lemon", "photos/Great_White shark", "dog", "", "crane"], names) == [
        "lemon", "great white shark", None, None, "crane"]
    assert editing.map_labels_to_classes(["lemon"], None) == [None]


def test_evaluations_are_stored_and_found_without_the_model(workspace):
    """The Editing page shows an `edit` job's result: every comparison (and each random
    group's) is stored by what the edit does, the weights and the images, never by name."""
    store, probed, ps = workspace["store"], workspace["model"], workspace["probe_set"]
    edit = editing.make_edit("stored", probed.spec, {"layer4": [1, 5, 9]}, "mean", store, ps.id)
    assert editing.stored_comparison(store, edit, probed.weights_id, ps.id, 7) is None
    cmp = editing.evaluate_edit(probed, edit, ps, store, max_images=7)
    renamed = editing.make_edit("another name", probed.spec, {"layer4": [9, 5, 1]}, "mean", store, ps.id)
    found = editing.stored_comparison(store, renamed, probed.weights_id, ps.id, 7)
    assert found.summary() == cmp.summary() and found.changed == cmp.changed
    assert found.per_class.to_dict("records") == cmp.per_class.to_dict("records")
    assert editing.stored_comparison(store, edit, probed.weights_id, ps.id, None) is None  # other images
    assert editing.stored_comparison(store, edit, "other-weights", ps.id, 7) is None
    sizes = {"layer4": 512}
    assert editing.stored_controls(store, edit, probed.weights_id, ps.id, 7, 2, sizes) is None
    controls = editing.evaluate_controls(probed, edit, ps, store, n_groups=2, max_images=7)
    again = editing.stored_controls(store, edit, probed.weights_id, ps.id, 7, 2, sizes)
    assert [c.summary() for c in again] == [c.summary() for c in controls]


def _wait_for(store, job_id: str):
    import time

    from neuroviz import jobs

    deadline = time.time() + 300
    while not (job := jobs.read_job(store, job_id)).finished and time.time() < deadline:
        time.sleep(0.5)
    assert job.status == "done", jobs.job_log(store, job_id)
    return job


def _start_evaluation(at, store, model_spec: str):
    """Click the page's evaluate button; the `edit` job it started, once finished."""
    from neuroviz import jobs

    before = {j.job_id for j in jobs.list_jobs(store)}
    (start,) = [b for b in at.button if b.key and b.key.startswith("start_editing_")]
    start.click().run()
    assert not at.exception and not at.error, [e.value for e in [*at.exception, *at.error]]
    (job,) = [j for j in jobs.list_jobs(store) if j.job_id not in before]
    assert job.kind == "edit" and job.argv[:2] == ["edit", model_spec]
    return _wait_for(store, job.job_id)


def test_editing_page_evaluates_as_a_job_and_saves_an_edit(workspace, monkeypatch):
    from tests.conftest import dashboard_env, open_page

    store = workspace["store"]
    dashboard_env(monkeypatch, store.root)
    at = open_page("views/editing.py", model=workspace["model"].spec)
    at.radio(key="editing_source_radio").set_value("list").run()
    at.text_area(key="editing_list").input("layer4:" + ",".join(map(str, range(0, 512, 2)))).run()
    at.number_input(key="editing_max_images").set_value(10).run()
    assert not at.metric, "nothing is evaluated before the button"
    job = _start_evaluation(at, store, workspace["model"].spec)
    assert "--neurons" in job.argv and job.argv[job.argv.index("--max-images") + 1] == "10"
    at.run()  # the job's comparison is in the store now
    assert not at.exception and not at.error, [e.value for e in [*at.exception, *at.error]]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Accuracy"] == "n/a" and metrics["Same top-1 as before"].endswith("%")
    def control_tables():
        return [d.value for d in at.dataframe if "random mean" in d.value.columns]

    assert control_tables() == []  # no controls asked for
    at.number_input(key="editing_controls").set_value(2).run()
    assert not at.metric, "the random groups are not evaluated yet"
    job = _start_evaluation(at, store, workspace["model"].spec)
    assert job.argv[job.argv.index("--random-groups") + 1] == "2"
    at.run()
    assert not at.exception and not at.error, [e.value for e in [*at.exception, *at.error]]
    (table,) = control_tables()
    assert list(table["measure"][:2]) == ["images changed", "agreement"] and (table["random max"] >= table["random min"]).all()
    at.button(key="editing_save").click().run()
    (saved,) = [e for e in editing.list_edits(store) if e.neurons == {"layer4": list(range(0, 512, 2))}]
    assert saved.mode == "zero"


def test_evaluations_are_listed_again_with_their_edit_and_downloadable(workspace):
    """A page reopened after a reload finds the latest result with the edit it measured (not
    its random controls), and the result downloads as CSV tables and as one JSON file."""
    import io
    import json

    import pandas as pd

    store, probed, ps = workspace["store"], workspace["model"], workspace["probe_set"]
    edit = editing.make_edit("listed", probed.spec, {"layer4": [2, 4, 6]}, "zero")
    cmp = editing.evaluate_edit(probed, edit, ps, store, max_images=6)
    controls = editing.evaluate_controls(probed, edit, ps, store, n_groups=1, max_images=6)
    latest = editing.recent_evaluations(store, probed.spec)[0]
    assert latest.edit.neurons == {"layer4": [2, 4, 6]} and latest.edit.name == "listed" and latest.max_images == 6
    assert latest.weights_id == probed.weights_id and latest.probe_set_id == ps.id and not latest.is_control
    assert latest.key == editing.evaluation_key(edit, probed.weights_id, ps.id, 6)
    assert all(not e.is_control for e in editing.recent_evaluations(store, probed.spec))
    assert any(e.is_control for e in editing.recent_evaluations(store, probed.spec, include_controls=True))
    assert editing.recent_evaluations(store, "some other model") == []

    per_class = pd.read_csv(io.StringIO(editing.comparison_csv(cmp, "per_class")))
    assert list(per_class["class_index"]) == list(cmp.per_class["class_index"])
    assert list(per_class["lost"]) == list(cmp.per_class["lost"])
    changed = pd.read_csv(io.StringIO(editing.comparison_csv(cmp, "changed")))
    assert len(changed) == len(cmp.changed) and list(changed["image_id"]) == [c.image_id for c in cmp.changed]
    assert "before_class" in changed.columns and "after_class" in changed.columns
    record = json.loads(editing.comparison_json(edit, cmp, controls, probed.weights_id, ps.id, 6))
    assert record["summary"] == json.loads(json.dumps(cmp.summary()))
    assert record["edit"]["neurons"] == {"layer4": [2, 4, 6]} and record["max_images"] == 6
    assert len(record["changed"]) == len(cmp.changed) and len(record["random_controls"]) == 1
    with pytest.raises(editing.EditError, match="per_class or changed"):
        editing.comparison_csv(cmp, "nope")


def test_a_comparison_stored_before_edits_were_kept_with_it_still_opens(workspace):
    store, probed, ps = workspace["store"], workspace["model"], workspace["probe_set"]
    edit = editing.make_edit("old", probed.spec, {"layer4": [7]}, "zero")
    cmp = editing.evaluate_edit(probed, edit, ps, store, max_images=5)
    key = editing.evaluation_key(edit, probed.weights_id, ps.id, 5)
    store.put_record(editing.EVALUATION_NAMESPACE, key, cmp.to_record())  # the session-3 record shape
    assert editing.stored_comparison(store, edit, probed.weights_id, ps.id, 5).summary() == cmp.summary()
    assert key not in {e.key for e in editing.recent_evaluations(store)}


def test_editing_page_reopens_on_the_latest_result_with_downloads(workspace, monkeypatch):
    """A fresh session (a reload) opens on the latest evaluated edit and draws it with the
    CSV and JSON downloads, without a model and without retyping the neurons."""
    from tests.conftest import dashboard_env, open_page

    store, probed, ps = workspace["store"], workspace["model"], workspace["probe_set"]
    dashboard_env(monkeypatch, store.root)
    edit = editing.make_edit("reopened", probed.spec, {"layer4": [1, 3]}, "zero")
    cmp = editing.evaluate_edit(probed, edit, ps, store, max_images=8)
    at = open_page("views/editing.py", model=probed.spec)
    assert not at.exception and not at.error, [e.value for e in [*at.exception, *at.error]]
    assert at.radio(key="editing_source_radio").value == "earlier"
    assert at.number_input(key="editing_max_images").value == 8
    assert any("reopened" in s.value for s in at.subheader)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Same top-1 as before"] == f"{100 * cmp.agreement:.1f}%"
    assert len(at.get("download_button")) == 3
