"""Ctrl-C and SIGTERM that always stop the command, with status 130.

Python raises ``KeyboardInterrupt`` wherever the main thread happens to be, and where that is a ``__del__``
method or a callback run from C (tokenizers, regex and torch run such code) the exception is printed as
"ignored" and the run goes on: an interrupt is lost. So the handler also starts a watchdog that interrupts the
main thread again every second until the command has stopped. Once it has, both signals are ignored and the
process ends with ``os._exit(130)`` after flushing its output: interpreter shutdown would otherwise re-deliver
a SIGINT that a C extension saw (exit status -2 instead of 130).
"""

from __future__ import annotations

import _thread
import os
import signal
import sys
import threading

_state = {"signals": 0, "stopped": False}


def _handler(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    _state["signals"] += 1
    if _state["signals"] == 1:
        threading.Thread(target=_watchdog, name="trace-interrupt-watchdog", daemon=True).start()
    raise KeyboardInterrupt


def _watchdog() -> None:
    stop = threading.Event()
    while not stop.wait(1.0):
        if _state["stopped"]:
            return
        _thread.interrupt_main(signal.SIGINT)  # runs _handler in the main thread: a fresh KeyboardInterrupt


def _unraisable(hook):
    """An interrupt swallowed in a ``__del__`` is not news (the watchdog raises it again): print nothing."""

    def quiet(unraisable) -> None:
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            hook(unraisable)

    return quiet


def install() -> None:
    """Route SIGINT and SIGTERM to :func:`_handler` (main thread only; elsewhere leave the host's handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return
    sys.unraisablehook = _unraisable(sys.unraisablehook)
    for sig in (signal.SIGINT, getattr(signal, "SIGTERM", None)):
        if sig is not None:
            signal.signal(sig, _handler)


def stop_and_exit(message: str, console, hard: bool) -> None:
    """The command has stopped: ignore further signals, say so, and exit with 130 (``hard``: ``os._exit``)."""
    _state["stopped"] = True
    for sig in (signal.SIGINT, getattr(signal, "SIGTERM", None)):
        if sig is not None and threading.current_thread() is threading.main_thread():
            signal.signal(sig, signal.SIG_IGN)
    console.print(message, highlight=False)
    if hard:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    sys.exit(130)
