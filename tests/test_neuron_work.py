"""Thread choice for commands and the time-left estimate of job progress."""

from __future__ import annotations

import pytest

from neuroviz.progress import RemainingTime, remaining_text
from neuroviz.threads import compute_threads, limit_compute_threads


@pytest.mark.parametrize("cpus, load, expected", [(2, 0.0, 1), (2, 3.0, 1), (16, 0.2, 15), (16, 4.5, 11), (1, 9.0, 1)])
def test_commands_leave_a_core_and_the_load_to_the_rest_of_the_machine(cpus, load, expected):
    assert compute_threads(cpus, load) == expected


def test_the_thread_override_reaches_torch_and_numpys_blas(monkeypatch):
    import torch
    from threadpoolctl import ThreadpoolController

    blas = ThreadpoolController().select(user_api="blas")
    before, blas_before = torch.get_num_threads(), blas.info()
    monkeypatch.setenv("NEUROVIZ_THREADS", "1")
    try:
        assert limit_compute_threads() == 1 and torch.get_num_threads() == 1
        assert blas.info() and all(pool["num_threads"] == 1 for pool in ThreadpoolController().select(user_api="blas").info())
    finally:
        torch.set_num_threads(before)
        for pool, info in zip(blas.lib_controllers, blas_before):
            pool.set_num_threads(info["num_threads"])


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_time_left_comes_from_the_rate_measured_in_the_current_stage():
    clock = Clock()
    left = RemainingTime(min_elapsed=2.0, clock=clock)
    assert left(0, 10) is None  # the stage starts: nothing measured yet
    clock.now += 1
    assert left(1, 10) is None  # too early to say
    clock.now += 3
    assert left(4, 10) == pytest.approx(6 * 1.0)  # 4 steps in 4 s, 6 to go
    clock.now += 1
    assert left(0, 3) is None  # a new stage (another total) is measured afresh
    clock.now += 4
    assert left(2, 3) == pytest.approx(2.0)
    assert left(1, 3) is None  # a count going back starts again too


def test_time_left_reads_naturally():
    assert remaining_text(0.2) == "about 1 s left"
    assert remaining_text(42) == "about 42 s left"
    assert remaining_text(185) == "about 3 min left"
    assert remaining_text(3 * 3600) == "about 3.0 h left"


def test_job_messages_end_with_the_time_left(tmp_path):
    from neuroviz import jobs
    from neuroviz.store import Store

    store = Store(tmp_path / "cache")
    clock = Clock()
    reporter = jobs.JobReporter(store, "job-1", min_interval=0.0)
    reporter._remaining = RemainingTime(clock=clock)
    reporter(0, 20, "neuron 3: crops")
    clock.now += 10
    reporter(5, 20, "neuron 3: simplifying caption 2/10")
    assert jobs.read_job(store, "job-1").message == "neuron 3: simplifying caption 2/10 · about 30 s left"
    reporter(20, 20, "done")
    assert jobs.read_job(store, "job-1").message == "done"


def test_scoring_batches_are_cut_by_the_size_of_their_logits():
    from neuroviz.backends.language import _budget_batches

    lengths = [3, 3, 4, 10, 10, 30]
    assert _budget_batches(list(range(6)), lengths, max_count=16, max_tokens=20) == [[0, 1, 2], [3, 4], [5]]
    assert _budget_batches(list(range(6)), lengths, max_count=2, max_tokens=1000) == [[0, 1], [2, 3], [4, 5]]
    assert _budget_batches([], lengths, 16, 20) == []


def test_log_likelihoods_do_not_depend_on_the_batching(tmp_path):
    import numpy as np

    from neuroviz.backends.language import TransformersLM
    from tests.conftest import make_tiny_llama

    words = ["red", "blue", "square", "circle", "dog", "cat", "on", "the", "a", "grass"]
    lm = TransformersLM(str(make_tiny_llama(tmp_path / "lm", words)))
    texts = ["a red square", "the dog on the grass", "cat", "a blue circle on a red square on the grass"]
    together = lm.log_likelihood(texts)
    lm.MAX_LOGITS_BYTES = 1  # every text in a batch of its own
    np.testing.assert_allclose(lm.log_likelihood(texts), together, rtol=1e-5)


def test_milan_prior_reports_progress_while_it_scores(tmp_path):
    """MILAN's p(d) scores hundreds of strings on a new workspace: the bar moves per batch."""
    from neuroviz.backends.language import TransformersLM
    from neuroviz.methods.milan import conditional_log_likelihood
    from neuroviz.store import Store
    from tests.conftest import make_tiny_llama

    words = ["red", "blue", "square", "circle", "dog", "cat", "tags", ":"]
    lm = TransformersLM(str(make_tiny_llama(tmp_path / "lm", words)))
    texts = [f"{a} {b}" for a in words[:6] for b in words[:6]]  # 36 strings
    updates = []
    conditional_log_likelihood(Store(tmp_path / "cache"), lm, texts, "tags :",
                               progress=lambda done, total, message: updates.append((done, total)))
    assert [u[0] for u in updates] == [16, 32, 37] and {u[1] for u in updates} == {37}  # 36 texts + the context
