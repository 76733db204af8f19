"""The Ray Data engine on a real local cluster (2 CPUs): the same runs as in process."""

from __future__ import annotations

import numpy as np
import pytest

from neuroviz import datasets, engines, extract, models
from neuroviz.store import Store

ray = pytest.importorskip("ray", reason="the Ray engine is an optional extra (requirements-ray.txt)")


@pytest.mark.slow
def test_ray_engine_matches_in_process(image_folder, tmp_path):
    model = models.create("torchvision:resnet18@random", image_size=32)
    ps = datasets.from_folder(image_folder, cache_dir=tmp_path)
    local = Store(tmp_path / "local")
    on_ray = Store(tmp_path / "ray")
    kwargs = {"k": 5, "batch_size": 8, "chunk_size": 8}
    expected = extract.extract(model, ps, ["layer1", "fc"], local, **kwargs)
    messages: list[str] = []
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never a cluster left on the machine
    try:
        got = extract.extract(model, ps, ["layer1", "fc"], on_ray, engine="ray", shard_size=16,
                              progress=lambda done, total, message: messages.append(message), **kwargs)
    finally:
        ray.shutdown()
    assert [r.run_key for r in got] == [r.run_key for r in expected]
    for run in got:
        np.testing.assert_array_equal(local.top_k(run.run_key).image_idx, on_ray.top_k(run.run_key).image_idx)
        np.testing.assert_allclose(local.activations(run.run_key), on_ray.activations(run.run_key), rtol=1e-5, atol=1e-5)
    assert any("shard 3/3" in m for m in messages)


def test_unknown_engine_and_missing_ray_say_what_to_do(monkeypatch):
    with pytest.raises(engines.EngineError, match="inprocess, ray"):
        engines.check_engine("spark")
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(engines.EngineError, match="pip install -r requirements-ray.txt"):
        engines.check_engine("ray")


def test_extract_request_carries_the_engine():
    from neuroviz.requests import ExtractRequest

    plain = ExtractRequest("torchvision:resnet18@random", "demo").argv()
    assert "--engine" not in plain and "--shard-size" not in plain
    argv = ExtractRequest("torchvision:resnet18@random", "demo", engine="ray", shard_size=1024, address="auto").argv()
    assert argv[argv.index("--engine") + 1] == "ray"
    assert argv[argv.index("--shard-size") + 1] == "1024"
    assert argv[argv.index("--address") + 1] == "auto"
