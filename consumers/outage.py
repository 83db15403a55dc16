"""Riding out a broker outage: the worker retries a Kafka step until the broker is back.

A step of the worker that talks to Kafka (sending a batch's recommendations, flushing them,
publishing the changelog, reading committed offsets, restoring a partition) either completes or
raises before changing anything the checkpoint relies on, so repeating it is safe: a repeated
send is one more copy of an at-least-once message, a repeated changelog publish writes the same
records again to a compacted topic. ``OutageGuard.run`` repeats a step whose failure is
transient (the broker unreachable, a timeout), backing off up to ``max_backoff_s``, logging one
line when the outage starts and one when it ends, and setting the worker's metrics; any other
error (a refused configuration, a full disk, a bug) propagates as before.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Protocol, TypeVar

from linrec_stream.clients.refusal import refusal

log = logging.getLogger("linrec.worker")
T = TypeVar("T")

# Exception classes (by name: kafka-python's, aiokafka's and ours differ) that mean "the broker
# is not reachable now". kafka-python and aiokafka also mark most transient errors `retriable`.
_TRANSIENT_NAMES = {"KafkaTimeoutError", "NoBrokersAvailable", "KafkaConnectionError", "NodeNotReadyError",
                    "RequestTimedOutError", "DeliveryError"}


def is_transient(exc: BaseException) -> bool:
    """True for an error that waiting can cure: a timeout, a lost connection, a Kafka error
    marked retriable, or one of those wrapped (``raise ... from``) by our own errors.

    A refusal by the cluster (authentication, authorization, TLS verification; see
    linrec_stream/clients/refusal.py) anywhere in the chain is never transient, even wrapped
    in an error that otherwise is (a DeliveryError of sends the broker refused)."""
    if refusal(exc) is not None:
        return False
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, (TimeoutError, ConnectionError)) or getattr(exc, "retriable", False) \
                or type(exc).__name__ in _TRANSIENT_NAMES:
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


class OutageSink(Protocol):
    def observe_outage(self, down: bool, seconds: float) -> None:
        """The broker became unreachable (down) or reachable again after ``seconds``."""


class OutageGuard:
    """Repeats a Kafka step until it succeeds while its failures are transient (module docstring).

    ``stop``: set to give up waiting (the worker is asked to stop); the last error is raised."""

    def __init__(self, metrics: OutageSink, stop: threading.Event | None = None, *, first_backoff_s: float = 0.5,
                 max_backoff_s: float = 30.0, sleep: Callable[[float], object] | None = None) -> None:
        self.metrics = metrics
        self.stop = stop or threading.Event()
        self.first_backoff_s, self.max_backoff_s = first_backoff_s, max_backoff_s
        self._sleep = sleep or self.stop.wait
        self.outages = 0

    def run(self, step: Callable[[], T], what: str) -> T:
        """``step()``, repeated while it raises a transient error."""
        backoff, started = self.first_backoff_s, None
        while True:
            try:
                out = step()
            except Exception as exc:
                if not is_transient(exc) or self.stop.is_set():
                    raise
                if started is None:
                    started = time.monotonic()
                    self.outages += 1
                    self.metrics.observe_outage(True, 0.0)
                    log.warning("worker: Kafka unreachable during %s (%s: %s); retrying until it is back",
                                what, type(exc).__name__, exc)
                self._sleep(backoff)
                backoff = min(self.max_backoff_s, backoff * 2)
                continue
            if started is not None:
                down = time.monotonic() - started
                self.metrics.observe_outage(False, down)
                log.warning("worker: Kafka reachable again after %.1fs; %s done", down, what)
            return out
