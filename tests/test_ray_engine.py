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


class CountingPixelBackend:
    """A tiny offline backend (mean colour + a constant, normalised) that appends a line to a file at
    every encode call, so calls made in Ray's actor processes are counted too."""

    id = "test:pixels"
    description = "mean colour (test)"
    offline = True

    def __init__(self, count_file: str):
        self.count_file = count_file

    def encode_images(self, images, batch_size: int = 32) -> np.ndarray:
        with open(self.count_file, "a") as fh:
            fh.write(f"{len(images)}\n")
        x = np.array([[*np.asarray(im.convert("RGB"), dtype=np.float32).mean(axis=(0, 1)) / 255.0, 0.5] for im in images],
                     dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)


def counting_pixel_backend(spec: str, backend_id: str) -> CountingPixelBackend:
    """Stands in for embeddings._backend_from_spec in the actors (the spec is the count file)."""
    return CountingPixelBackend(spec)


def encode_calls(count_file) -> int:
    return len(count_file.read_text().splitlines()) if count_file.exists() else 0


def private_store(tiny_workspace, tmp_path) -> Store:
    """A copy of the tiny workspace with a shared cache of its own: nothing embedded yet."""
    import shutil

    from neuroviz.store import SharedCache

    root = shutil.copytree(tiny_workspace["store"].root, tmp_path / "cache")
    shutil.rmtree(root / "arrays" / "image_emb", ignore_errors=True)  # embedded by other tests of the session
    return Store(root, shared=SharedCache(tmp_path / "shared"))


@pytest.mark.slow
def test_ray_image_embeddings_match_in_process(tiny_workspace, tmp_path):
    from neuroviz import embeddings
    from neuroviz.backends.multimodal import create_multimodal

    ps = tiny_workspace["probe_set"]
    spec = "conse:mobilenet_v2@3"  # the actors build it from this registry name
    backend = create_multimodal(spec)
    expected = np.array(embeddings.image_embeddings(backend, private_store(tiny_workspace, tmp_path / "a"), ps.id))
    on_ray = private_store(tiny_workspace, tmp_path / "b")
    messages: list[str] = []
    got = embeddings.image_embeddings(backend, on_ray, ps.id, engine="ray", backend_spec=spec,
                                      progress=lambda done, total, message: messages.append(message))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert messages[-1] == f"image embeddings ({backend.id})"
    ids = list(on_ray.probe_files(ps.id).image_ids)
    assert len(on_ray.shared.image_embeddings(embeddings.image_backend_key(backend), ids)) == len(ps)  # written by the driver


@pytest.mark.slow
def test_interrupted_ray_image_embeddings_resume_without_embedding_again(tiny_workspace, tmp_path, monkeypatch):
    import os
    import sys

    from neuroviz import embeddings

    ps = tiny_workspace["probe_set"]
    store = private_store(tiny_workspace, tmp_path)
    monkeypatch.setattr(embeddings, "IMAGE_CHUNK", 8)
    monkeypatch.setattr(embeddings, "_backend_from_spec", counting_pixel_backend)
    interrupted, resumed = tmp_path / "interrupted-calls.txt", tmp_path / "resumed-calls.txt"  # each run's actors count apart
    backend = CountingPixelBackend(str(tmp_path / "driver-calls.txt"))
    chunks = -(-len(ps) // 8)
    assert chunks >= 4

    def stop_after_two_chunks(done: int, total: int, message: str) -> None:
        if done >= 16:
            raise KeyboardInterrupt  # as if the job were cancelled once two chunks were saved

    # One cluster for both runs, so the interrupted run does not shut down a cluster of its own under
    # Ray Data's threads; the actors import this module (counting_pixel_backend) from the driver's path.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}})
    try:
        with pytest.raises(KeyboardInterrupt):
            embeddings.image_embeddings(backend, store, ps.id, batch_size=8, engine="ray", backend_spec=str(interrupted),
                                        progress=stop_after_two_chunks)
        assert not store.array_path("image_emb", embeddings.image_embeddings_key(backend, ps.id)).exists()
        emb = embeddings.image_embeddings(backend, store, ps.id, batch_size=8, engine="ray", backend_spec=str(resumed))
    finally:
        ray.shutdown()
    assert encode_calls(interrupted) >= 2
    assert encode_calls(resumed) == chunks - 2  # one call per chunk not saved before the interruption
    assert encode_calls(tmp_path / "driver-calls.txt") == 0  # everything was embedded on Ray
    rows = store.probe_files(ps.id).rows(range(len(ps)))
    expected = CountingPixelBackend(str(tmp_path / "direct.txt")).encode_images([datasets.load_rgb(r.path) for r in rows])
    np.testing.assert_allclose(emb, expected, atol=1e-6)


def test_ray_image_embeddings_refuse_a_name_that_builds_another_backend(tiny_workspace, tmp_path):
    from neuroviz import embeddings
    from neuroviz.backends.multimodal import create_multimodal

    store, ps = private_store(tiny_workspace, tmp_path), tiny_workspace["probe_set"]
    backend = create_multimodal("conse:mobilenet_v2")
    with pytest.raises(embeddings.EmbeddingError, match="builds the backend 'conse:efficientnet_lite0"):
        embeddings.image_embeddings(backend, store, ps.id, engine="ray", backend_spec="conse")
    with pytest.raises(embeddings.EmbeddingError, match="builds none"):  # its id is no registry name
        embeddings.image_embeddings(backend, store, ps.id, engine="ray")
    assert not ray.is_initialized()  # refused before any cluster starts
