"""Opt-in SIGTERM/SIGINT handling: the first signal kills gracefully, the next escalates.

Nothing happens at import. ``install_signal_handlers()`` works from the main
thread only (elsewhere it warns and does nothing, as ``signal.signal`` would
raise). The handler itself only writes one byte to a pipe: a Python signal
handler runs between two bytecodes of the main thread, which may be holding any
lock termsafe uses, so taking one there could deadlock. A small listener
thread, started by ``install_signal_handlers()``, reads the pipe and does the
work.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import warnings
from collections.abc import Callable, Iterable
from types import FrameType
from typing import TYPE_CHECKING, Any

from ._exceptions import InvalidArgumentType

if TYPE_CHECKING:
    from ._terminator import Terminator

__all__ = ["SignalHandlers", "install_signal_handlers"]

_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


class SignalHandlers:
    """Installed handlers; ``uninstall()`` (or leaving the ``with`` block) restores the old ones.

    Attributes:
        terminator: The terminator the signals act on.
        signals: The signals handled.
        received: How many signals arrived so far.
    """

    def __init__(self, terminator: Terminator, signals: tuple[signal.Signals, ...]) -> None:
        self.terminator = terminator
        self.signals = signals
        self.received = 0
        self._previous: dict[signal.Signals, _Handler] = {}
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)
        self._installed = False
        self._listener = threading.Thread(target=self._listen, name="termsafe-signals", daemon=True)

    def _install(self) -> None:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        self._installed = True
        self._listener.start()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        previous = self._previous.get(signal.Signals(signum))
        if not self.terminator._live:
            # Nothing to terminate gracefully (none yet, or a first signal already
            # stopped them all): behave as if we were not here, so the process
            # never becomes unkillable by this signal.
            self._default(signum, frame, previous)
            return
        # Async-signal-safe: one non-blocking write, no locks.
        with contextlib.suppress(OSError):
            os.write(self._write_fd, bytes((signum,)))
        if callable(previous) and previous is not signal.default_int_handler:
            # Chain to a handler the host installed before us.
            previous(signum, frame)

    def _default(self, signum: int, frame: FrameType | None, previous: _Handler) -> None:
        if previous == signal.SIG_IGN:
            return
        if callable(previous):
            previous(signum, frame)  # e.g. Python's SIGINT handler: KeyboardInterrupt
            return
        # SIG_DFL (or unknown): restore it and let the OS act on the signal.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def _listen(self) -> None:
        while True:
            try:
                data = os.read(self._read_fd, 64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum == 0:
                    return
                self._on_signal(signal.Signals(signum))

    def _on_signal(self, sig: signal.Signals) -> None:
        self.received += 1
        term = self.terminator
        term._emit(
            "signal_received",
            None,
            reason=sig.name,
            details={"signal": sig.name, "count": self.received},
        )
        if self.received == 1:
            term.terminate_all(f"received {sig.name}")
        else:
            term.terminate_all(f"received {sig.name} again")
            term.escalate()

    def uninstall(self) -> None:
        """Restore each previous handler if ours is still the one installed.

        A handler someone installed after us is left alone.
        """
        if not self._installed:
            return
        self._installed = False
        if threading.current_thread() is threading.main_thread():
            for sig, previous in self._previous.items():
                if signal.getsignal(sig) == self._handle:
                    signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        with contextlib.suppress(OSError):
            os.write(self._write_fd, b"\0")
        self._listener.join(5.0)
        for fd in (self._read_fd, self._write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> SignalHandlers:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.uninstall()


def install_signal_handlers(
    terminator: Terminator | None = None,
    signals: Iterable[signal.Signals | int] = (signal.SIGTERM, signal.SIGINT),
) -> SignalHandlers | None:
    """Make SIGTERM/SIGINT start a graceful termination of every workflow.

    The first signal kills every live workflow of ``terminator`` gracefully;
    each further signal escalates the pending kills to the forced phase.
    A signal that arrives while no workflow is live gets the previous
    handler's behaviour (SIGINT raises ``KeyboardInterrupt``, SIGTERM ends the
    process), so the process never becomes unkillable by accident.
    Previously installed Python handlers are chained (called after ours),
    except Python's default SIGINT handler, whose ``KeyboardInterrupt`` would
    defeat the graceful phase.

    Args:
        terminator: Defaults to ``get_terminator()``.
        signals: The signals to handle.

    Returns:
        The installed ``SignalHandlers`` (call ``uninstall()`` to restore), or
        ``None`` when not called from the main thread (a ``RuntimeWarning`` says so).

    Raises:
        InvalidArgumentType: ``signals`` holds something that is not a signal.
    """
    from ._terminator import Terminator, get_terminator

    if terminator is None:
        terminator = get_terminator()
    elif not isinstance(terminator, Terminator):
        raise InvalidArgumentType(f"terminator must be a Terminator (got {terminator!r})")
    try:
        sigs = tuple(signal.Signals(s) for s in signals)
    except (ValueError, TypeError):
        raise InvalidArgumentType(f"signals must be signal numbers (got {signals!r})") from None
    if threading.current_thread() is not threading.main_thread():
        warnings.warn(
            "termsafe.install_signal_handlers() must be called from the main thread; "
            "no handler was installed",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    handlers = SignalHandlers(terminator, sigs)
    handlers._install()
    return handlers
