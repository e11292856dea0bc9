"""A workflow in plain trio code (``trio.run``, a nursery), killed from a sibling task.

``examples/async_workflow.py`` runs one workflow on asyncio and on trio through
anyio. This one is trio-native: no anyio in sight. A nursery runs the
workflow and an operator task. The operator waits until the workflow is inside
its ``db`` critical section, asks for the kill (``kill()`` never blocks, so it
is safe to call from the event loop) and awaits the outcome with
``handle.wait_async()``. The kill is deferred until the section's batch is
done, then cancels the workflow at its next ``await``; the async cleanup hook
is awaited in the workflow's task, and the workflow ends ``terminated``.

Run it: ``python examples/async_trio.py``.
"""

from __future__ import annotations

import trio

import termsafe as ts

OPERATOR = ts.Principal("ops", roles=["admin"])


async def sync_users(term: ts.Terminator, in_section: trio.Event, log: list[str]) -> None:
    """The workflow: an async cleanup hook, a batch in a ``db`` section, then more work."""
    async with term.workflow("sync-users", owner="alice") as wf:

        async def close_connection() -> None:
            await trio.sleep(0)  # an async close, awaited in the workflow's task
            log.append("connection closed")

        ts.on_cleanup(close_connection)
        async with ts.critical_section("db"):
            in_section.set()
            for _ in range(5):
                await trio.sleep(0.02)  # shielded: the kill waits for the batch
            log.append("batch committed")
        while True:
            await trio.sleep(0.01)  # the kill lands at the first await after the section
    log.append(f"workflow ended {wf.state}")


async def operator(term: ts.Terminator, in_section: trio.Event, log: list[str]) -> None:
    """Wait for the section, ask for the kill, await the final state."""
    await in_section.wait()
    handle = term.kill("sync-users", by=OPERATOR, reason="schema change")
    log.append(f"kill requested, deferred={handle.deferred}")
    final = await handle.wait_async(10)
    log.append(f"kill finished: {final}")


async def main() -> None:
    """Run the workflow and the operator in one nursery."""
    log: list[str] = []
    with ts.Terminator(phases=ts.Phases(graceful=5, forced=5)) as term:
        in_section = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sync_users, term, in_section, log)
            nursery.start_soon(operator, term, in_section, log)
    for line in log:
        print(line)
    assert log[:3] == ["kill requested, deferred=True", "batch committed", "connection closed"]
    # The workflow's task and the operator's may resume in either order at the end.
    assert sorted(log[3:]) == ["kill finished: terminated", "workflow ended terminated"], log


if __name__ == "__main__":
    trio.run(main)
