"""An async workflow on asyncio and on trio, killed from another thread mid-run.

The kill is deferred while the workflow is inside its ``db`` critical section
(shielded from cancellation), then cancels the workflow's scope at the next
await; the async cleanup hook is awaited, and the workflow ends ``terminated``.
"""

from __future__ import annotations

import threading

import anyio

import termsafe as ts

ALICE = ts.Principal("alice")


async def sync_users(term: ts.Terminator, backend: str, in_section: threading.Event) -> None:
    async with term.workflow(f"sync-users-{backend}", owner="alice") as wf:
        log: list[str] = []

        async def close_connection() -> None:
            await anyio.sleep(0)  # an async close, awaited in the workflow's task
            log.append("connection closed")

        ts.on_cleanup(close_connection)
        async with ts.critical_section("db"):
            in_section.set()
            for _ in range(5):
                await anyio.sleep(0.02)  # shielded: the kill waits for the batch
            log.append("batch committed")
        while True:
            await anyio.sleep(0.01)  # the kill lands at the first await after the section
    print(f"{backend}: {wf.state}; {log}")


def killer(term: ts.Terminator, backend: str, in_section: threading.Event) -> None:
    in_section.wait(10)
    handle = term.kill(f"sync-users-{backend}", by=ALICE, reason="deploy")
    print(f"{backend}: kill deferred={handle.deferred}, final={handle.wait(10)}")


def main() -> None:
    for backend in ("asyncio", "trio"):
        with ts.Terminator(phases=ts.Phases(graceful=5, forced=5)) as term:
            in_section = threading.Event()

            thread = threading.Thread(target=killer, args=(term, backend, in_section))
            thread.start()
            anyio.run(sync_users, term, backend, in_section, backend=backend)
            thread.join()


if __name__ == "__main__":
    main()
