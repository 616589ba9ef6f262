"""Ctrl-C and SIGTERM that cannot be lost.

Python turns a signal into an exception wherever the main thread happens to be. When that is a
finalizer (``__del__``, e.g. a dataset being freed) or a callback whose exceptions a library
swallows, the KeyboardInterrupt is printed as "Exception ignored" and the run goes on as if
nothing was asked: the chaos test caught a SIGTERM lost this way, and the run trained to the
end. So the handler also arms a one-second timer that raises again until the interrupt is
acknowledged by the code that handles it (the pipeline's failure path, the CLI).
"""

from __future__ import annotations

import signal

_pending: dict[str, int | None] = {"signum": None}
REDELIVER_AFTER = 1.0  # seconds


def install() -> None:
    """Handle SIGINT and SIGTERM (main thread only) as an interrupt that is re-raised until
    :func:`acknowledge` is called."""
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGALRM, _redeliver)


def acknowledge() -> None:
    """The interrupt is being handled: stop re-raising it."""
    if _pending["signum"] is not None:
        _pending["signum"] = None
        signal.setitimer(signal.ITIMER_REAL, 0)


def _interrupt(signum, frame) -> None:
    _pending["signum"] = signum
    signal.setitimer(signal.ITIMER_REAL, REDELIVER_AFTER)
    raise KeyboardInterrupt


def _redeliver(signum, frame) -> None:
    if _pending["signum"] is not None:
        signal.setitimer(signal.ITIMER_REAL, REDELIVER_AFTER)
        raise KeyboardInterrupt
