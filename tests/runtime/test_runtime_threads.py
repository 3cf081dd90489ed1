"""Kernel thread names: what ``top -H`` and the bench's CPU split read."""

from __future__ import annotations

import asyncio
import sys
import threading
from pathlib import Path

import pytest

from runtime.batcher import DynamicBatcher
from runtime.threads import OS_NAME_BYTES, named_thread, os_thread_name

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
