"""Inverse-set synthesis on a real tiny model (random ResNet-18 at 64 px) and real images."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from neuroviz import synthesis as S
from neuroviz.hooks import LayerRecorder, UnknownLayerError, pool, to_batch_first

FAST = dict(image_size=48, steps=96, check_every=4, min_steps=8)


def _strong_neuron(ws, layer: str, rank: int = 0) -> int:
    """A neuron with a clearly positive observed max, so fractional levels mean something."""
    stats = ws["store"].neuron_stats(ws["runs"][layer].run_key)
    return int(stats.sort_values("max", ascending=False)["neuron"].iloc[rank])


def _request(ws, **kw) -> S.SynthesisRequest:
    layer = kw.pop("layer", "layer2")
    neuron = kw.pop("neuron", None)
    neuron = _strong_neuron(ws, layer) if neuron is None else neuron
    config = dict(FAST, **kw.pop("config", {}))
    return S.SynthesisRequest(layer=layer, neuron=neuron, **kw).with_config(**config)


def _measure(model, layer: str, pooling: str, neuron: int, images_u8: np.ndarray) -> np.ndarray:
    """The neuron's pooled activation on saved uint8 images, measured independently of synthesis."""
    info = model.layer(layer)
    x = torch.from_numpy(images_u8.reshape(-1, *images_u8.shape[-3:])).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(model.preprocessing.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.preprocessing.std).view(1, 3, 1, 1)
    with torch.no_grad(), LayerRecorder(model.module, [layer]) as rec:
        model.module((x - mean) / std)
    pooled = pool(to_batch_first(rec.outputs[layer], info.layout), info.layout, pooling)
    return pooled[:, neuron].numpy().reshape(images_u8.shape[:2])


def test_samples_reach_each_level_within_tolerance(tiny_workspace):
    ws = tiny_workspace
    request = _request(ws, levels=(0.5, 1.0), n_samples=3)
    result = S.synthesize(ws["model"], request, ws["store"], ws["runs"]["layer2"], use_cache=False)
    assert result.images.shape == (2, 3, 48, 48, 3) and result.images.dtype == np.uint8
    assert result.within_tolerance.all(), result.summary()
    target = result.plan.targets[0]
    independent = _measure(ws["model"], "layer2", target.pooling, request.neuron, result.images)
    np.testing.assert_allclose(independent, result.achieved[..., 0], rtol=1e-3, atol=1e-4)
    expected = np.array(target.levels)[:, None]
    assert (np.abs(independent - expected) / target.scale <= 0.05 + 1e-6).all()
    assert np.all(np.isfinite(result.diversity)) and (result.diversity > 0).all()
    # The samples of one level are different images, not copies.
    assert np.abs(result.images[0, 0].astype(int) - result.images[0, 1].astype(int)).mean() > 2


def test_intersection_hits_every_neuron_including_another_layer(tiny_workspace):
    ws = tiny_workspace
    a = _strong_neuron(ws, "layer2", 0)
    b = _strong_neuron(ws, "layer2", 1)
    c = _strong_neuron(ws, "layer4", 0)
    request = _request(ws, neuron=a, levels=(1.0, 0.5), n_samples=2,
                       also=(S.NeuronTarget("layer2", b, (0.1,)), S.NeuronTarget("layer4", c, (0.5, 1.0))))
    result = S.synthesize(ws["model"], request, ws["store"], ws["runs"]["layer2"], use_cache=False)
    assert result.achieved.shape == (2, 2, 3)
    assert result.within_tolerance.all(), result.summary()
    assert (result.errors <= 0.05).all()
    for ti, (layer, neuron) in enumerate([("layer2", a), ("layer2", b), ("layer4", c)]):
        t = result.plan.targets[ti]
        measured = _measure(ws["model"], layer, t.pooling, neuron, result.images)
        assert (np.abs(measured - np.array(t.levels)[:, None]) / t.scale <= 0.05 + 1e-4).all()


def test_same_seed_same_samples_and_another_seed_differs(tiny_workspace):
    ws = tiny_workspace
    run = ws["runs"]["layer2"]
    req = _request(ws, levels=(0.75,), n_samples=2, seed=3, config=dict(steps=12))
    first = S.synthesize(ws["model"], req, ws["store"], run, use_cache=False)
    again = S.synthesize(ws["model"], req, ws["store"], run, use_cache=False)
    other = S.synthesize(ws["model"], dataclasses.replace(req, seed=4), ws["store"], run, use_cache=False)
    np.testing.assert_array_equal(first.images, again.images)
    assert first.key == again.key != other.key
    assert not np.array_equal(first.images, other.images)


def test_cached_second_call_does_not_optimise(tiny_workspace):
    ws = tiny_workspace
    run = ws["runs"]["layer2"]
    req = _request(ws, levels=(0.5,), n_samples=2, seed=11, config=dict(steps=16))
    calls: list[str] = []
    first = S.synthesize(ws["model"], req, ws["store"], run, progress=lambda d, t, m: calls.append(m))
    assert any(m.startswith("step") for m in calls) and not first.from_cache
    calls.clear()
    second = S.synthesize(ws["model"], req, ws["store"], run, progress=lambda d, t, m: calls.append(m))
    assert second.from_cache and calls == ["loaded from the cache"]
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_allclose(first.achieved, second.achieved)
    assert second.summary() == first.summary()
    # The record can be read without the plan at hand (as the page does after a job).
    loaded = S.load_result(ws["store"], first.key)
    assert loaded is not None and loaded.plan.request == req


def test_not_reached_is_reported_honestly(tiny_workspace):
    ws = tiny_workspace
    req = _request(ws, levels=(1.0,), n_samples=2, config=dict(steps=1, check_every=1, min_steps=1))
    result = S.synthesize(ws["model"], req, ws["store"], ws["runs"]["layer2"], use_cache=False)
    assert not result.within_tolerance.any()
    assert (result.errors > 0.05).all()
    assert "not reached" in result.summary()


def test_start_from_probe_images_uses_the_nearest_ones(tiny_workspace):
    ws = tiny_workspace
    req = _request(ws, levels=(0.5, 1.0), n_samples=2, start="probe", config=dict(steps=4, check_every=4, min_steps=1))
    result = S.synthesize(ws["model"], req, ws["store"], ws["runs"]["layer2"], use_cache=False)
    nearest = S.probe_images_at_levels(ws["store"], result.plan, 2)
    assert result.start_image_idx.tolist() == [[row["idx"] for row in level] for level in nearest]
    acts = ws["store"].activations(ws["runs"]["layer2"].run_key)[:, req.neuron]
    top_row = nearest[1][0]
    assert top_row["achieved"][0] == pytest.approx(float(acts.max()))  # level 100% is nearest to the argmax image


def test_fourier_parameterisation_round_trips_real_images(image_folder):
    from PIL import Image

    photo = Image.open(next((image_folder / "photos").glob("*.png"))).convert("RGB").resize((32, 32))
    x = torch.from_numpy(np.array(photo)).permute(2, 0, 1)[None].float() / 255
    back = S.FourierImage.from_images(x, decay_power=1.0).images().detach()
    assert (back - x.clamp(0.02, 0.98)).abs().max() < 1e-4


def test_bad_requests_get_clear_errors(tiny_workspace):
    ws = tiny_workspace
    model, store, run = ws["model"], ws["store"], ws["runs"]["layer2"]
    with pytest.raises(ValueError, match="neurons 0..127; there is no neuron 500"):
        S.plan_synthesis(model, _request(ws, neuron=500), store, run)
    with pytest.raises(UnknownLayerError, match="Unknown layer 'layer9'"):
        S.plan_synthesis(model, _request(ws, also=(S.NeuronTarget("layer9", 0, (1.0,)),)), store, run)
    with pytest.raises(ValueError, match=r"100\.0x its observed max.*Try levels such as 0.25,0.5,0.75,1"):
        S.synthesize(model, _request(ws, levels=(0.5, 100.0)), store, run)
    with pytest.raises(ValueError, match="at least 1"):
        S.plan_synthesis(model, _request(ws, n_samples=0), store, run)
    with pytest.raises(ValueError, match="never went below"):
        S.plan_synthesis(model, _request(ws, levels=(-0.5,)), store, run)
    with pytest.raises(ValueError, match="same number of levels"):
        S.plan_synthesis(model, _request(ws, also=(S.NeuronTarget("layer2", 1, (0.1, 0.2, 0.3)),)), store, run)
    with pytest.raises(ValueError, match="has not been extracted"):
        S.plan_synthesis(model, _request(ws, also=(S.NeuronTarget("layer3", 0, (0.5,)),)), store, run)


def test_cli_writes_a_grid_and_reports_errors(tiny_workspace, tmp_path, capsys):
    from PIL import Image

    from neuroviz.cli import main

    ws = tiny_workspace
    run = ws["runs"]["layer2"]
    neuron = _strong_neuron(ws, "layer2")
    out = tmp_path / "grid.png"
    base = ["--cache", str(ws["store"].root), "synthesize", "torchvision:resnet18@random", "--run-key", run.run_key]
    code = main(base + ["--neuron", str(neuron), "--levels", "50%,100%", "--samples", "2", "--steps", "6",
                        "--image-size", "32", "--probe-columns", "1", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "samples within 5% of their target" in printed and str(out) in printed
    grid = Image.open(out)
    assert grid.width > 3 * 32 and grid.height >= 2 * 32
    assert main(base + ["--neuron", "9999"]) == 2
    assert "there is no neuron 9999" in capsys.readouterr().err


def test_job_request_round_trips_the_request_and_key(tiny_workspace):
    from neuroviz.cli import build_parser
    from neuroviz.cli.synthesize import request_from_args
    from neuroviz.requests import SynthesizeRequest

    ws = tiny_workspace
    run = ws["runs"]["layer2"]
    req = _request(ws, levels=(1 / 3, 0.9), n_samples=3, start="probe", seed=5,
                   also=(S.NeuronTarget("layer4", 2, (0.25,)),), config=dict(lr=0.013))
    req = dataclasses.replace(req, config=dataclasses.replace(req.config, check_every=S.SynthesisConfig().check_every,
                                                              min_steps=S.SynthesisConfig().min_steps))
    argv = SynthesizeRequest(req, run.model_spec, run.run_key).argv()
    args = build_parser().parse_args(argv)
    assert request_from_args(args) == req
    assert S.plan_synthesis(None, request_from_args(args), ws["store"], run).key == S.plan_synthesis(ws["model"], req, ws["store"], run).key
    with pytest.raises(ValueError, match="cannot set check_every"):
        SynthesizeRequest(req.with_config(check_every=3), run.model_spec, run.run_key).argv()


# -- the page ----------------------------------------------------------------------------------
@pytest.fixture()
def page_env(tiny_workspace, monkeypatch):
    from tests.conftest import dashboard_env

    dashboard_env(monkeypatch, tiny_workspace["store"].root)
    return tiny_workspace


def _page(ws, neuron: int):
    from streamlit.testing.v1 import AppTest

    from tests.conftest import APP_PATH

    at = AppTest.from_file(str(APP_PATH), default_timeout=60)
    at.query_params["layer"] = "layer2"
    at.query_params["neuron"] = str(neuron)
    at.switch_page("views/synthesize.py").run()
    return at


def _page_text(at) -> str:
    return "\n".join(str(e.value) for kind in ("markdown", "caption", "success", "warning", "error", "info")
                     for e in getattr(at, kind))


def _plan_table(at):
    return next(d.value for d in at.dataframe if "observed max" in d.value.columns)


def test_page_shows_the_plan_and_explains_bad_levels(page_env):
    ws = page_env
    neuron = _strong_neuron(ws, "layer2")
    at = _page(ws, neuron)
    assert not at.exception and not at.error, [e.value for e in at.error]
    plan = _plan_table(at)
    assert list(plan["neuron"]) == [neuron] and "level 4" in plan.columns and plan["level 4"][0].startswith("100%")
    assert any(b.key and b.key.startswith("start_syn_") for b in at.button)
    # the page starts with the quick first pass
    assert at.number_input(key="syn_samples").value == S.FIRST_PASS_SAMPLES
    assert at.number_input(key="syn_steps").value == S.FIRST_PASS.steps
    assert at.select_slider(key="syn_size").value == S.FIRST_PASS.image_size
    at.text_input(key="syn_levels").input("50, 900").run()
    assert not at.exception
    assert any("observed max" in e.value and "Try levels" in e.value for e in at.error)
    at.text_input(key="syn_levels").input("50, 100").run()
    at.toggle(key="syn_intersect").set_value(True).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    plan = _plan_table(at)
    assert len(plan) == 2 and plan["neuron"][1] == (neuron + 1) % 128


def test_page_runs_the_job_and_then_shows_samples_beside_real_images(page_env):
    import time

    from neuroviz import jobs

    ws = page_env
    neuron = _strong_neuron(ws, "layer2")
    at = _page(ws, neuron)
    at.text_input(key="syn_levels").input("50, 100").run()
    at.number_input(key="syn_samples").set_value(2).run()
    at.number_input(key="syn_steps").set_value(8).run()
    at.select_slider(key="syn_size").set_value(64).run()
    start = [b for b in at.button if b.key and b.key.startswith("start_syn_")]
    assert start
    start[0].click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    job = next(j for j in jobs.list_jobs(ws["store"]) if j.argv[:1] == ["synthesize"])
    assert job.argv[:2] == ["synthesize", "torchvision:resnet18@random"] and "--run-key" in job.argv
    deadline = time.time() + 240
    while not (job := jobs.read_job(ws["store"], job.job_id)).finished and time.time() < deadline:
        time.sleep(0.5)
    assert job.status == "done", jobs.job_log(ws["store"], job.job_id)
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    text = _page_text(at)
    assert "samples within 5% of their target" in text and "Level 50%" in text and "Level 100%" in text
    captions = [img.proto.imgs[0].caption for img in at.get("image")]
    assert sum(c.startswith("a = ") for c in captions) == 4  # 2 levels x 2 samples, each with its activation
    assert sum(c.startswith("real · a = ") for c in captions) == 6  # 3 real probe images per level
    refine = [b for b in at.button if b.key and b.key.startswith("start_syn_") and b.label.startswith("Refine")]
    assert len(refine) == 1 and "4 samples per level at 128 px, up to 192 steps" in refine[0].label


def test_bounded_activations_cap_the_reachable_levels():
    from torch import nn

    from neuroviz.models import create

    mobile_block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU6())
    assert S.activation_ceiling(mobile_block) == 6.0
    assert S.activation_ceiling(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())) is None
    resnet = create("torchvision:resnet18@random", image_size=64).module
    assert S.activation_ceiling(resnet.get_submodule("layer2")) is None


def test_progress_moves_at_every_step(tiny_workspace):
    ws = tiny_workspace
    request = _request(ws, levels=(0.5,), n_samples=2, config=dict(steps=12, min_steps=12, check_every=4))
    updates = []
    result = S.synthesize(ws["model"], request, ws["store"], ws["runs"]["layer2"], use_cache=False,
                          progress=lambda done, total, message: updates.append((done, total, message)))
    assert result.steps_run == 12
    assert [u[0] for u in updates[:-1]] == list(range(1, 13)) and {u[1] for u in updates} == {12}
    assert updates[0][2].startswith("step 1/12: no check yet") and "at the last check" in updates[4][2]
    assert updates[-1] == (12, 12, result.summary())


def test_first_pass_is_a_small_part_of_the_full_request_and_refines_to_it():
    first = S.first_pass_request("layer2", 3, seed=5)
    full = S.SynthesisRequest("layer2", 3, seed=5)

    def work(r):  # samples x pixels x steps: what one optimisation costs
        return r.n_samples * len(r.levels) * r.config.image_size ** 2 * r.config.steps

    assert work(first) * 6 < work(full)
    assert S.refined_request(first) == full
    assert S.refined_request(full) == full
    bigger = full.with_config(steps=400, image_size=160)
    assert S.refined_request(bigger) == bigger  # refining never shrinks what was asked
