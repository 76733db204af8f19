"""Sharded extraction: shards reduce to what one pass stores, finished shards are never
redone, a reduce that dies loses nothing, and crash leftovers are cleared on the next run."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import torch
from torch import nn

from neuroviz import datasets, extract, shards
from neuroviz.models import Preprocessing, ProbedModel
from neuroviz.store import Store


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


LAYERS = ["conv1", "conv2", "fc"]


@pytest.fixture(scope="module")
def setup(image_folder, tmp_path_factory):
    model = ProbedModel("custom:test-shards-net", _Net().eval(), Preprocessing(image_size=40, resize_size=40))
    ps = datasets.from_folder(image_folder, cache_dir=tmp_path_factory.mktemp("scan"))
    single = Store(tmp_path_factory.mktemp("single"))
    runs = extract.extract(model, ps, LAYERS, single, k=6, batch_size=4, chunk_size=8)
    return {"model": model, "ps": ps, "single": single, "runs": runs}


def assert_same_runs(a: Store, b: Store, keys) -> None:
    for key in keys:
        assert a.get_run(key) is not None and b.get_run(key) is not None
        np.testing.assert_array_equal(a.top_k(key).image_idx, b.top_k(key).image_idx)
        np.testing.assert_allclose(a.top_k(key).activation, b.top_k(key).activation, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(a.activations(key), b.activations(key), rtol=1e-6, atol=1e-6)
        sa, sb = a.neuron_stats(key), b.neuron_stats(key)
        for column in ("mean", "std", "min", "max", "q99", "q995"):
            np.testing.assert_allclose(sa[column], sb[column], rtol=1e-5, atol=1e-6)
        run = a.get_run(key)
        for n in range(run.n_neurons):
            np.testing.assert_array_equal(a.histogram(key, n)[0], b.histogram(key, n)[0])
            if run.map_shape:
                np.testing.assert_allclose(a.top_maps(key, n), b.top_maps(key, n), rtol=1e-3, atol=1e-3)
        la, lb = a.mask_levels(key, 0.99), b.mask_levels(key, 0.99)
        assert (la is None) == (run.map_shape is None)
        if la is not None:  # conv1 has 40 x 32 x 32 cells, past k: another merge order, another
            np.testing.assert_allclose(la, lb, rtol=0.03)  # estimate (test_sketches measures its error)


def test_shards_reduce_to_the_single_pass_result(setup, tmp_path):
    store = Store(tmp_path)
    runs = extract.extract(setup["model"], setup["ps"], LAYERS, store, k=6, batch_size=4, chunk_size=8, shard_size=12)
    assert [r.run_key for r in runs] == [r.run_key for r in setup["runs"]]  # sharding does not change the run key
    assert_same_runs(setup["single"], store, [r.run_key for r in runs])
    acts = np.asarray(store.activations(runs[0].run_key))
    order = np.argsort(-acts, axis=0, kind="stable")[:6].T  # ties by image index, as one pass orders them
    np.testing.assert_array_equal(store.top_indices(runs[0].run_key), order)
    assert not store.partial_dir(runs[0].run_key).exists()  # shards removed once the run is committed
    assert not list(store.runs_dir().glob("*/.writer.lock"))  # the writer deleted its lock file when it ended


def test_finished_shards_are_not_redone(setup, tmp_path, monkeypatch):
    store = Store(tmp_path)
    kwargs = {"k": 6, "batch_size": 4, "chunk_size": 4, "shard_size": 12}
    assert extract.extract(setup["model"], setup["ps"], LAYERS, store, stop_after_chunks=7, **kwargs) == []
    assert store.find_runs() == []
    plan_dir = store.partial_dir(setup["runs"][0].run_key)
    finished = sorted(p.name for p in plan_dir.glob("shard-*"))
    assert finished == ["shard-00000", "shard-00001"]  # 3 chunks each; the third shard stopped mid-way
    assert list(plan_dir.glob("work-00002/state-*.npz"))
    from neuroviz import engines

    job = shards.ShardJob((shards.LayerPlan("conv1", "mean", setup["runs"][0].run_key, 6, str(plan_dir)),), (), 4, 4)
    # what the Ray driver reports between shards: 2 finished shards of 12 and 1 chunk of 4 images
    assert engines.images_written(job, shards.plan_shards(len(setup["ps"]), 12)) == 28
    stamps = {p: p.stat().st_mtime_ns for p in plan_dir.glob("shard-*/*")}
    seen: list[tuple[int, int]] = []
    real = shards.extract_shard

    def spy(model, job, shard, *args, **kw):
        seen.append((shard.index, shards._latest_state(shards.work_dir(job.plans[0], shard.index))))
        return real(model, job, shard, *args, **kw)

    monkeypatch.setattr("neuroviz.engines.extract_shard", spy)
    extract.extract(setup["model"], setup["ps"], LAYERS, store, **kwargs)
    assert [s for s, _ in seen] == [2, 3]  # only the unfinished shards ran
    assert seen[0][1] >= 0  # and the interrupted one resumed from its last chunk
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p.exists())
    assert_same_runs(setup["single"], store, [r.run_key for r in setup["runs"]])


def test_a_reduce_that_dies_loses_nothing(setup, tmp_path, monkeypatch):
    store = Store(tmp_path)
    kwargs = {"k": 6, "batch_size": 4, "chunk_size": 8, "shard_size": 16}
    real_write = Store.write_run
    calls = {"n": 0}

    def dies_on_second_layer(self, info, *args, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed during the reduce")
        return real_write(self, info, *args, **kw)

    monkeypatch.setattr(Store, "write_run", dies_on_second_layer)
    with pytest.raises(KeyboardInterrupt):
        extract.extract(setup["model"], setup["ps"], LAYERS, store, **kwargs)
    monkeypatch.setattr(Store, "write_run", real_write)
    assert len(store.find_runs()) == 1
    ran: list[int] = []
    real = shards.extract_shard
    monkeypatch.setattr("neuroviz.engines.extract_shard", lambda m, j, s, *a, **kw: ran.append(s.index) or real(m, j, s, *a, **kw))
    extract.extract(setup["model"], setup["ps"], LAYERS, store, **kwargs)
    assert ran == []  # every shard was kept: only the reduce ran again
    assert_same_runs(setup["single"], store, [r.run_key for r in setup["runs"]])


def test_crash_leftovers_are_cleared_and_files_are_readable(setup, tmp_path):
    store = Store(tmp_path)
    (run,) = extract.extract(setup["model"], setup["ps"], ["conv2"], store, k=6, batch_size=4)
    run_dir = store.run_dir(run.run_key)
    for name in ("acts.npy", "maps.npy", "topk.parquet", "sketches.npz", "run.json"):
        mode = stat.S_IMODE((run_dir / name).stat().st_mode)
        assert mode == 0o666 & ~_umask(), f"{name} has mode {oct(mode)}"
    # a kill during the acts.npy write leaves its temporary file; a kill between the commit and
    # the clean-up leaves partial/ behind
    leftover = run_dir / ".acts.npy.k1ll3d.tmp"
    leftover.write_bytes(b"\x93NUMPY half")
    (store.partial_dir(run.run_key) / "shard-00000").mkdir(parents=True)
    (store.partial_dir(run.run_key) / "shard-00000" / "acts.npy").write_bytes(b"x")
    again = extract.extract(setup["model"], setup["ps"], ["conv2"], store, k=6, batch_size=4)
    assert again[0].run_key == run.run_key
    assert not leftover.exists()
    assert not store.partial_dir(run.run_key).exists()


def test_writer_lock_is_exclusive_and_leaves_no_file(tmp_path, monkeypatch):
    import builtins
    import contextlib

    store = Store(tmp_path)
    path = store.run_dir("run") / ".writer.lock"
    with store.run_writer_lock("run") as first:
        assert first and path.exists()
        with store.run_writer_lock("run") as second:
            assert not second  # one writer at a time
    assert not path.exists()  # no empty file stays behind

    # the race the deletion opens: B opens the file, then the holder A deletes it and lets go, then
    # B locks what it opened (a deleted file). B must end up holding the file the path names, or a
    # third process C would create a fresh file, lock it too, and write at the same time as B.
    holder = contextlib.ExitStack()
    assert holder.enter_context(store.run_writer_lock("run"))
    real_open = builtins.open

    def open_then_holder_lets_go(*args, **kwargs):
        fh = real_open(*args, **kwargs)
        holder.close()
        return fh

    monkeypatch.setattr("neuroviz.store.open", open_then_holder_lets_go, raising=False)
    with store.run_writer_lock("run") as b:
        monkeypatch.undo()
        assert b and path.exists()
        with store.run_writer_lock("run") as c:
            assert not c
    assert not path.exists()


def test_one_shard_links_its_files_into_the_run(setup, tmp_path, monkeypatch):
    import neuroviz.store

    linked: list[str] = []
    real_link = neuroviz.store.atomic_link
    monkeypatch.setattr(neuroviz.store, "atomic_link", lambda src, dst: linked.append(f"{src.name}->{dst.name}") or real_link(src, dst))
    store = Store(tmp_path)
    runs = extract.extract(setup["model"], setup["ps"], LAYERS, store, k=6, batch_size=4, chunk_size=8)
    assert sorted(linked) == sorted(["acts.npy->acts.npy"] * 3 + ["maps.npy->maps.npy"] * 2)  # fc has no maps
    assert_same_runs(setup["single"], store, [r.run_key for r in runs])
    assert not store.partial_dir(runs[0].run_key).exists()  # the shard's names are gone, the run's files stay


def test_atomic_link_copies_where_links_fail(tmp_path, monkeypatch):
    from neuroviz.files import atomic_link

    source = tmp_path / "a.npy"
    source.write_bytes(b"activations")
    atomic_link(source, tmp_path / "run" / "linked.npy")
    assert (tmp_path / "run" / "linked.npy").stat().st_ino == source.stat().st_ino

    def no_links(*args, **kwargs):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr("os.link", no_links)
    atomic_link(source, tmp_path / "run" / "copied.npy")
    assert (tmp_path / "run" / "copied.npy").read_bytes() == b"activations"
    assert (tmp_path / "run" / "copied.npy").stat().st_ino != source.stat().st_ino
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["copied.npy", "linked.npy"]  # no temporaries left


def test_npy_row_blocks_stream_the_rows_of_several_files(tmp_path):
    from neuroviz.files import npy_header, npy_row_blocks

    parts = [np.arange(n * 3, dtype=np.float32).reshape(n, 3) + i for i, n in enumerate((10, 1, 7))]
    for i, part in enumerate(parts):
        np.save(tmp_path / f"{i}.npy", part)
    files = [tmp_path / f"{i}.npy" for i in range(3)]
    assert npy_header(files[0])[0] == (10, 3)
    blocks = list(npy_row_blocks(files, rows=4))
    assert [len(b) for b in blocks] == [4, 4, 2, 1, 4, 3]
    np.testing.assert_array_equal(np.concatenate(blocks), np.concatenate(parts))
    files[2].write_bytes(files[2].read_bytes()[:-4])  # a truncated file is an error, not short rows
    with pytest.raises(ValueError, match="shorter"):
        list(npy_row_blocks(files[2:], rows=4))


def test_thumbnails_get_normal_modes(setup, tmp_path):
    from neuroviz import images

    paths = [im.path for im in setup["ps"].images[:2]]
    images.warm_thumbnails(tmp_path, paths)
    written = [p for p in (tmp_path / "thumbs").rglob("*") if p.is_file()]
    assert written
    assert {stat.S_IMODE(p.stat().st_mode) for p in written} == {0o666 & ~_umask()}


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_sketch_threads_per_layer_give_the_single_thread_result(setup, tmp_path, monkeypatch):
    """On a many-core machine each layer's sketches get their own thread; the run is the same."""
    assert shards.sketch_threads(5, cpu_count=2) == 1 and shards.sketch_threads(5, cpu_count=16) == 5
    assert shards.sketch_threads(3, cpu_count=16) == 3 and shards.sketch_threads(1, cpu_count=1) == 1
    monkeypatch.setattr(shards, "sketch_threads", lambda n_layers, cpu_count=None: n_layers)
    threaded = Store(tmp_path)
    runs = extract.extract(setup["model"], setup["ps"], LAYERS, threaded, k=6, batch_size=4, chunk_size=8)
    assert_same_runs(setup["single"], threaded, [r.run_key for r in runs])
