"""The kernel pool (`merge/accel/kernel_pool.py`): tasks run, results come in order, errors propagate,
torch runs single-threaded inside and gets its threads back, and sums split as torch splits them."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from megatron_ext.merge.accel.kernel_pool import GRAIN, KernelPool, threaded_sum

GEN = torch.Generator().manual_seed(0)


@pytest.fixture
def three_threads():
    """torch at 3 intra-op threads for the test, restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(before)


def test_tasks_run_in_parallel_workers_and_results_come_in_order(three_threads) -> None:
    """Later items finish first (shorter sleeps), yet `map` returns results in item order; every item runs
    once, on up to `threads` workers, while torch runs single-threaded."""
    seen, workers = [], set()
    lock = threading.Lock()

    def task(i: int) -> tuple[int, int]:
        time.sleep(0.002 * (20 - i))
        with lock:
            seen.append(i)
            workers.add(threading.get_ident())
        return i * i, torch.get_num_threads()

    with KernelPool() as pool:
        assert pool.threads == 3 and torch.get_num_threads() == 1
        results = pool.map(task, range(20))
        assert pool.submit(lambda a, b: a - b, 7, 2).result() == 5
    assert [r for r, _ in results] == [i * i for i in range(20)]
    assert {n for _, n in results} == {1}  # kernels inside tasks are single-threaded
    assert sorted(seen) == list(range(20)) and seen != list(range(20))  # all ran, not in order
    assert 1 < len(workers) <= 3
    assert torch.get_num_threads() == 3


def test_an_error_in_a_task_propagates_and_torch_gets_its_threads_back(three_threads) -> None:
    def task(i: int) -> int:
        if i == 3:
            raise ValueError("task 3 failed")
        return i

    with pytest.raises(ValueError, match="task 3 failed"):
        with KernelPool() as pool:
            pool.map(task, range(6))
    assert torch.get_num_threads() == 3


def test_use_outside_its_with_block_is_refused() -> None:
    with pytest.raises(AssertionError, match="outside its `with` block"):
        KernelPool().submit(print)


@pytest.mark.parametrize("threads", [2, 3, 4])
def test_threaded_sum_has_the_bits_of_torchs_threaded_sum(threads: int) -> None:
    """Sizes around the split threshold and chunk sizes; a plain single-threaded sum differs for most."""
    before = torch.get_num_threads()
    differs = 0
    try:
        for n in (1000, GRAIN - 1, GRAIN, GRAIN + 1, 2 * GRAIN + 1, 100_003, 777_777, 1 << 20):
            x = torch.randn(n, generator=GEN) * torch.rand(n, generator=GEN).mul(8).exp2()  # mixed scales
            torch.set_num_threads(threads)
            reference = x.sum()
            torch.set_num_threads(1)
            assert torch.equal(threaded_sum(x, threads), reference), n
            differs += not torch.equal(x.sum(), reference)
    finally:
        torch.set_num_threads(before)
    assert differs >= 3  # the split matters, so the test can fail
