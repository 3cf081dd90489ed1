"""Kernel thread names: what ``top -H`` and the bench's CPU split read."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from runtime.batcher import DynamicBatcher
from runtime.threads import OS_NAME_BYTES, ThreadCpu, named_thread, os_thread_name, thread_cpu, thread_kind

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="kernel thread names are read from /proc")


def _comm(native_id: int) -> str:
    return Path(f"/proc/self/task/{native_id}/comm").read_text().strip()


def test_os_thread_name_keeps_the_suffix_and_fits_the_kernel() -> None:
    assert os_thread_name("audit-writer") == "audit-writer"
    assert os_thread_name("infer-minilm", "-0") == "infer-minilm-0"
    long = os_thread_name("infer-a-very-long-model-name", "-12")
    assert long == "infer-a-very-12"
    assert len(long.encode()) == OS_NAME_BYTES
    # never cut inside a multi-byte character
    assert os_thread_name("infer-modèèèè", "-12") == "infer-modè-12"
    assert len(os_thread_name("é" * 20).encode()) <= OS_NAME_BYTES


@linux
def test_named_thread_carries_its_name_into_the_kernel() -> None:
    seen: dict[str, object] = {}

    def work(tag: str) -> None:
        seen["tag"] = tag
        seen["comm"] = _comm(threading.get_native_id())
        seen["python"] = threading.current_thread().name

    thread = named_thread(work, name="static-shape", daemon=True, args=("x",))
    thread.start()
    thread.join(10)
    assert seen == {"tag": "x", "comm": "static-shape", "python": "static-shape"}
    assert _comm(threading.get_native_id()) != "static-shape"  # only the new thread was renamed


@linux
def test_inference_threads_are_named_per_model_and_worker() -> None:
    names: set[str] = set()
    lock = threading.Lock()
    both = threading.Barrier(2, timeout=10)

    def run_batch(items: list[object]) -> list[object]:
        with lock:
            names.add(_comm(threading.get_native_id()))
        both.wait()  # both workers hold a batch at once: each records its own name
        return items

    async def main() -> None:
        b: DynamicBatcher[object, object] = DynamicBatcher(
            run_batch, max_batch_size=1, max_delay_s=0.0, queue_limit=8, timeout_s=10.0, name="minilm", workers=2
        )
        b.start()
        assert list(await asyncio.gather(b.submit(1), b.submit(2))) == [1, 2]
        assert sorted(t.name for t in b._threads) == ["batcher-minilm-0", "batcher-minilm-1"]
        await b.stop()

    asyncio.run(asyncio.wait_for(main(), 20))
    assert names == {"infer-minilm-0", "infer-minilm-1"}


def test_thread_kinds() -> None:
    assert [thread_kind(7, 7, "inferbox"), thread_kind(8, 7, "infer-minilm-0"), thread_kind(9, 7, "audit-writer")] == [
        "loop",
        "inference",
        "audit",
    ]
    assert thread_kind(10, 7, "static-shape") == "other"
    assert thread_kind(11, 7, "inferbox") == "other"  # only the main thread is the loop


@linux
def test_thread_cpu_reads_this_process_by_kernel_name() -> None:
    spun = threading.Event()
    done = threading.Event()

    def spin() -> None:
        end = time.thread_time() + 0.3
        while time.thread_time() < end:
            pass
        spun.set()
        done.wait(10)  # stay alive to be read

    thread = named_thread(spin, name="batcher-x", os_name="infer-x-0", daemon=True)
    thread.start()
    try:
        assert spun.wait(10)
        threads = thread_cpu()
        kind, seconds = threads[thread.native_id or 0]
        assert kind == "inference" and seconds >= 0.2
        assert threads[os.getpid()][0] == "loop"
        assert thread_cpu(2**22 + 12345) == {}  # no such process
    finally:
        done.set()


def test_thread_cpu_totals_never_decrease() -> None:
    readings = [
        {1: ("loop", 100), 2: ("inference", 500), 3: ("other", 50)},
        {1: ("loop", 150), 2: ("inference", 600)},  # thread 3 ended: its 0.5 s still count
        {1: ("loop", 200), 2: ("inference", 700), 3: ("audit", 10)},  # id 3 reused by a new thread
        {},  # nothing readable (not Linux): no series
    ]
    cpu = ThreadCpu(lambda: readings.pop(0), tick=100)
    assert cpu.totals() == {"loop": 1.0, "inference": 5.0, "audit": 0.0, "other": 0.5}
    assert cpu.totals() == {"loop": 1.5, "inference": 6.0, "audit": 0.0, "other": 0.5}
    assert cpu.totals() == {"loop": 2.0, "inference": 7.0, "audit": 0.1, "other": 0.5}
    assert cpu.totals() == {}


def test_a_reused_thread_id_of_the_same_kind_keeps_both_threads_time() -> None:
    readings = [{5: ("other", 300)}, {5: ("other", 20)}]  # the first thread ended; a new one got id 5
    cpu = ThreadCpu(lambda: readings.pop(0), tick=100)
    assert cpu.totals()["other"] == 3.0
    assert cpu.totals()["other"] == 3.2


def test_a_renamed_thread_is_counted_once() -> None:
    # a new thread carries its creator's name until it names itself
    readings = [{2: ("other", 40)}, {2: ("inference", 50)}, {2: ("inference", 90)}]
    cpu = ThreadCpu(lambda: readings.pop(0), tick=100)
    assert cpu.totals() == {"loop": 0.0, "inference": 0.0, "audit": 0.0, "other": 0.4}
    assert cpu.totals() == {"loop": 0.0, "inference": 0.1, "audit": 0.0, "other": 0.4}
    assert cpu.totals() == {"loop": 0.0, "inference": 0.5, "audit": 0.0, "other": 0.4}


@linux
def test_thread_cpu_reads_odd_kernel_names() -> None:
    """A name with spaces, parentheses or bytes that are not UTF-8 (the kernel cuts names at 15
    bytes, inside a character) is still read, not an error."""
    from runtime.threads import _prctl

    prctl = _prctl()
    assert prctl is not None
    done = threading.Event()
    named = threading.Event()

    def odd() -> None:
        import ctypes

        zero = ctypes.c_ulong(0)
        prctl(15, ctypes.c_char_p(b"a (b) \xe9\xff"), zero, zero, zero)
        named.set()
        done.wait(10)

    thread = threading.Thread(target=odd, daemon=True)
    thread.start()
    try:
        assert named.wait(10)
        kind, seconds = thread_cpu()[thread.native_id or 0]
        assert kind == "other" and seconds >= 0
    finally:
        done.set()
