"""The README example, runnable on its own (the test suite runs it)."""

import threading

import termsafe as ts

term = ts.Terminator(phases=ts.Phases(graceful=5, forced=5), sink=ts.MemorySink())
started = threading.Event()


def nightly_export() -> None:
    with term.workflow("export-2026-11-28", owner="alice", team="data"):
        ts.on_cleanup(lambda: print("connections closed"))
        started.set()
        for batch in range(1_000_000):
            ts.checkpoint({"batch": batch})  # a kill lands here...
            with ts.critical_section("db"):  # ...never in here (10 s grace)
                ts.sleep(0.01)  # write the batch


worker = threading.Thread(target=nightly_export)
worker.start()
started.wait()
handle = term.kill("export-2026-11-28", by=ts.Principal("alice"), reason="deploy")
print(handle.wait())  # terminated
worker.join()
term.close()
