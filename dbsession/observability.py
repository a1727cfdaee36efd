"""Seeing every unit of work: slow-scope warnings, per-call-site statistics, OpenTelemetry.

dbsession owns the transaction boundaries, so it can say which unit of work held a
transaction open, where it was opened, and whether the time went to the database or
to something else (an HTTP call, a slow loop) while locks and a pooled connection
were held. Three layers, each independent:

- **Slow-scope warnings** (on by default, no dependency): a unit of work open longer
  than ``slow_scope_seconds`` (default 5 s) logs one WARNING on the ``dbsession``
  logger when it ends, with its duration, the ``file:line`` that opened it, and the
  time spent in the database (the driver's execute calls, timed by hooks of the dialect's
  ``do_execute*`` methods, ``_seam``) against the time outside it.
  ``configure(slow_scope_seconds=None)`` turns it off.
- **Statistics** (``configure(stats=True)``, or ``DBSESSION_STATS=1``): counts, outcomes
  and duration percentiles per call site, from ``stats()``; ``DBSESSION_STATS=1`` also
  prints the table when the process exits (handy in development).
- **OpenTelemetry** (``pip install 'sqlalchemy-dbsession[otel]'``, then
  ``configure(opentelemetry=True)``): one span per unit of work, SQLAlchemy's statement
  spans (``opentelemetry-instrumentation-sqlalchemy``) nested under it, and the metrics
  ``dbsession.unit.duration``, ``dbsession.commits``, ``dbsession.rollbacks``,
  ``dbsession.retries`` and ``dbsession.pool.wait``. Nothing of OpenTelemetry is
  imported otherwise.

Only outermost units of work are observed; a scope joined to one is part of it.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from types import CodeType, FrameType
from typing import Any

from sqlalchemy.engine import Engine

from ._context import call_site
from ._seam import set_hook

__all__ = ["ScopeStats", "configure", "format_stats", "reset_stats", "stats"]

logger: logging.Logger = logging.getLogger("dbsession")

DEFAULT_SLOW_SCOPE_SECONDS = 5.0
STATS_ENV = "DBSESSION_STATS"
_SAMPLES = 1000  # durations kept per call site for the percentiles


@dataclass(frozen=True)
class _Config:
    """What is observed. Never changed in place: ``configure`` swaps in a new one, and a
    unit of work ends under the one it began with (a span begun under OpenTelemetry is
    ended with the instruments of that same configuration)."""

    slow_scope_seconds: float | None = DEFAULT_SLOW_SCOPE_SECONDS
    stats: bool = False
    tracer: Any = None
    instruments: dict[str, Any] | None = None


_config = _Config(stats=os.environ.get(STATS_ENV, "") not in ("", "0"))


def configure(
    *,
    slow_scope_seconds: float | None = DEFAULT_SLOW_SCOPE_SECONDS,
    stats: bool | None = None,
    opentelemetry: bool = False,
    tracer_provider: Any = None,
    meter_provider: Any = None,
) -> None:
    """Set what dbsession observes, for every factory of the process.

    ``slow_scope_seconds``: warn about units of work open longer than this (None or 0:
    never). ``stats``: collect per-call-site statistics (``stats()``); None keeps the
    current setting. ``opentelemetry``: emit spans and metrics through the global
    providers, or the ``tracer_provider`` / ``meter_provider`` given. Raises
    ValueError for a negative threshold, MissingDriverError when OpenTelemetry is
    asked for but not installed.
    """
    global _config
    if slow_scope_seconds is not None and slow_scope_seconds < 0:
        raise ValueError(f"slow_scope_seconds must be positive or None, got {slow_scope_seconds!r}")
    tracer = instruments = None
    if opentelemetry:
        tracer, instruments = _make_otel(tracer_provider, meter_provider)
    _config = _Config(
        slow_scope_seconds=slow_scope_seconds or None,
        stats=_config.stats if stats is None else stats,
        tracer=tracer,
        instruments=instruments,
    )
    _update_listeners()


def _make_otel(tracer_provider: Any, meter_provider: Any) -> tuple[Any, dict[str, Any]]:
    try:
        from opentelemetry import metrics, trace
    except ImportError:
        from ._errors import MissingDriverError

        raise MissingDriverError(
            "OpenTelemetry is not installed. Install it: pip install 'sqlalchemy-dbsession[otel]'."
        ) from None
    tracer = (tracer_provider or trace.get_tracer_provider()).get_tracer("dbsession")
    meter = (meter_provider or metrics.get_meter_provider()).get_meter("dbsession")
    instruments = {
        "duration": meter.create_histogram(
            "dbsession.unit.duration", unit="s", description="Duration of a unit of work"
        ),
        "commits": meter.create_counter("dbsession.commits", description="Units committed"),
        "rollbacks": meter.create_counter("dbsession.rollbacks", description="Units rolled back"),
        "retries": meter.create_counter(
            "dbsession.retries", description="Units run again after a transient error"
        ),
        "pool_wait": meter.create_histogram(
            "dbsession.pool.wait", unit="s", description="Time waiting for a pooled connection"
        ),
    }
    return tracer, instruments


_engines: weakref.WeakSet[Engine] = weakref.WeakSet()
_timed: weakref.WeakSet[Engine] = weakref.WeakSet()


def _watch(engine: Engine) -> None:
    """Time the statements of ``engine`` whenever something is observed (called for every
    engine dbsession builds; the listeners are attached only while observing)."""
    _engines.add(engine)
    _update_listeners()


_listeners_lock = threading.Lock()


def _update_listeners() -> None:
    wanted = _enabled()
    with _listeners_lock:
        _update_engines(wanted)


#: The dialect methods that run a statement on the driver's cursor: what they take is
#: the unit of work's time in the database.
_EXECUTE_METHODS = ("do_execute", "do_execute_no_params", "do_executemany")


def _update_engines(wanted: bool) -> None:
    # Timed by hooks of the dialect's methods (``_seam``) rather than with
    # before/after_cursor_execute listeners: any such listener sends every statement of the
    # engine through SQLAlchemy's event dispatch (+10% instructions per one-query unit).
    for engine in list(_engines):
        if wanted != (engine in _timed):
            for name in _EXECUTE_METHODS:
                set_hook(engine, name, "statement_timer", _timed_execute if wanted else None)
            (_timed.add if wanted else _timed.discard)(engine)


def _timed_execute(execute: Callable[..., Any]) -> Callable[..., Any]:
    def timed(*args: Any) -> Any:  # SQLAlchemy passes them positionally
        observation = _observed.get()
        if observation is None:
            return execute(*args)
        began = time.perf_counter()
        try:
            return execute(*args)
        finally:
            observation.db_time += time.perf_counter() - began

    return timed


def _enabled() -> bool:
    """True if anything is observed (a unit of work then records its timings; ``begin``
    asks the same)."""
    config = _config
    return bool(config.slow_scope_seconds or config.stats or config.tracer)


# --- one unit of work -----------------------------------------------------------------


class Observation:
    """The timings of one unit of work in progress: ``entered_by`` is the Python frame that
    opened it (at bytecode offset ``lasti``) and ``owner`` its factory; the call site and
    the backend's name are worked out from them only when something needs them."""

    __slots__ = (
        "entered_by",
        "lasti",
        "owner",
        "started",
        "readonly",
        "isolation_level",
        "db_time",
        "pool_wait",
        "lock_wait",
        "span",
        "span_token",
        "_site",
        "outer",
        "config",
        "__weakref__",
    )
    entered_by: FrameType | None
    lasti: int
    owner: object
    started: float
    readonly: bool
    isolation_level: str | None
    db_time: float
    pool_wait: float
    lock_wait: float
    span: Any
    span_token: Any
    _site: str | None
    outer: Observation | None
    config: _Config

    def __init__(
        self,
        entered_by: FrameType | None,
        owner: object,
        started: float,
        readonly: bool,
        isolation_level: str | None,
    ) -> None:
        self.entered_by = entered_by
        # The offset, not f_lineno, which costs a walk of the function's line table.
        self.lasti = entered_by.f_lasti if entered_by is not None else -1
        self.owner = owner
        self.started = started
        self.readonly = readonly
        self.isolation_level = isolation_level
        self.db_time = 0.0
        self.pool_wait = 0.0
        self.lock_wait = 0.0
        self.span = None
        self.span_token = None
        self._site = None
        self.outer = None  # the one observed here before (an independent=True scope)
        self.config = _config

    @property
    def site(self) -> str:
        """``file:line`` of the code that opened the unit of work."""
        if self._site is None:
            entered_by = self.entered_by
            file, line = call_site(entered_by)
            if entered_by is not None and file == entered_by.f_code.co_filename:
                line = _line_at(entered_by.f_code, self.lasti)
            self._site = f"{file}:{line}"
        return self._site

    def backend(self) -> str:
        """The name of the backend (``sqlite``, ``postgresql``, ``mysql``)."""
        url = getattr(self.owner, "url", None)
        return url.get_backend_name() if url is not None else ""


_observed: ContextVar[Observation | None] = ContextVar("dbsession_observation", default=None)
_attempt_number: ContextVar[int] = ContextVar("dbsession_attempt", default=1)


def _line_at(code: CodeType, offset: int) -> int:
    """The source line of the bytecode at ``offset`` in ``code``."""
    for start, end, line in code.co_lines():
        if start <= offset < end and line is not None:
            return line
    return code.co_firstlineno


def _name_current(function: Any) -> None:
    """Report the unit of work observed here at ``function``'s definition (for
    integrations: the view or endpoint, rather than the framework code that runs it)."""
    observation = _observed.get()
    code = getattr(function, "__code__", None)
    if observation is not None and code is not None:
        observation._site = f"{code.co_filename}:{code.co_firstlineno}"


def _begin(
    entered_by: FrameType | None, owner: object, readonly: bool, isolation_level: str | None
) -> Observation | None:
    """Start observing a unit of work; None when nothing is observed. Never raises: if the
    tracer fails, that is logged and the unit of work goes on untraced."""
    config = _config
    if not (config.slow_scope_seconds or config.stats or config.tracer):
        return None
    observation = Observation(entered_by, owner, time.perf_counter(), readonly, isolation_level)
    if config.tracer is not None:
        try:
            _start_span(observation, config.tracer)
        except Exception:
            logger.exception("dbsession: observability could not start a span; not traced")
            observation.span = None
    observation.outer = _observed.get()
    _observed.set(observation)
    return observation


def _start_span(observation: Observation, tracer: Any) -> None:
    from opentelemetry import context, trace

    observation.span = tracer.start_span(
        "dbsession.unit_of_work",
        attributes={
            "db.system": observation.backend(),
            "dbsession.readonly": observation.readonly,
            "dbsession.isolation_level": observation.isolation_level or "default",
            "dbsession.nested": False,
            "dbsession.retry_attempt": _attempt_number.get(),
            "code.location": observation.site,
        },
    )
    observation.span_token = context.attach(trace.set_span_in_context(observation.span))


def _end(observation: Observation, outcome: str, error: BaseException | None) -> None:
    """Finish observing: ``outcome`` is ``"committed"`` or ``"rolled back"``, as the
    database decided. Never raises (a scope's outcome is the database's alone): a failure
    to report is logged on the ``dbsession`` logger. Reported under the configuration the
    unit of work began with, whatever ``configure`` did meanwhile."""
    duration = time.perf_counter() - observation.started
    if _observed.get() is observation:
        _observed.set(observation.outer)
    observation.outer = None
    config = observation.config
    try:
        threshold = config.slow_scope_seconds
        if threshold is not None and duration >= threshold:
            _warn_slow(observation, duration, outcome, threshold)
        if config.stats:
            _record(observation.site, duration, observation.db_time, outcome)
        if observation.span is not None:
            _end_span(observation, duration, outcome, error, config.instruments or {})
    except Exception:
        logger.exception("dbsession: observability failed to report a unit of work (%s)", outcome)
    finally:
        observation.entered_by = None  # do not keep the caller's frame (and its locals) alive


def _warn_slow(observation: Observation, duration: float, outcome: str, threshold: float) -> None:
    locked = observation.lock_wait
    outside = max(duration - observation.db_time - locked, 0.0)
    if locked > duration / 2:
        verdict = (
            "most of it WAITING FOR SQLite's WRITE LOCK, which other writers of this process "
            "held: keep writing units of work short"
        )
    elif outside > duration / 2:
        verdict = (
            "most of it OUTSIDE the database, with the transaction open: move that work "
            "(HTTP calls, slow loops, waiting on locks) out of the scope"
        )
    else:
        verdict = "most of it in the database: look at the statements"
    logger.warning(
        "dbsession: a unit of work opened at %s was open for %.2fs (%s): %.2fs in the "
        "database, %.2fs waiting for the write lock, %.2fs outside it, %.2fs waiting for "
        "a pooled connection; %s. "
        "(Threshold %.1fs: dbsession.observability.configure(slow_scope_seconds=...).)",
        observation.site,
        duration,
        outcome,
        observation.db_time,
        locked,
        outside,
        observation.pool_wait,
        verdict,
        threshold,
    )


def _end_span(
    observation: Observation,
    duration: float,
    outcome: str,
    error: BaseException | None,
    instruments: dict[str, Any],
) -> None:
    from opentelemetry import context, trace

    span = observation.span
    span.set_attribute("dbsession.outcome", outcome)
    span.set_attribute("dbsession.db_time", observation.db_time)
    span.set_attribute("dbsession.pool_wait", observation.pool_wait)
    if error is not None:
        span.set_attribute("exception.type", type(error).__qualname__)
        span.set_status(trace.Status(trace.StatusCode.ERROR, type(error).__qualname__))
    span.end()
    try:
        context.detach(observation.span_token)
    except ValueError:  # ended in another context (a generator finished elsewhere)
        pass
    attributes = {"db.system": observation.backend(), "dbsession.outcome": outcome}
    instruments["duration"].record(duration, attributes)
    instruments["commits" if outcome == "committed" else "rollbacks"].add(1, attributes)


def _current() -> Observation | None:
    """The unit of work observed in this context, if any."""
    return _observed.get()


def _lend(observation: Observation | None) -> Token[Observation | None] | None:
    """Make ``observation`` the unit of work observed in this context (for integrations
    that open a scope in one context and run the handler in another: its statements, pool
    waits and checkouts are then the scope's); ``unlend`` the token it returns when the
    scope has ended. A no-op (None) for a unit of work that is not observed."""
    return None if observation is None else _observed.set(observation)


def _unlend(token: Token[Observation | None] | None) -> None:
    """Undo ``lend`` (a no-op for None, or in another context than the one it was lent in)."""
    if token is not None:
        try:
            _observed.reset(token)
        except ValueError:
            pass


def _add_lock_wait(seconds: float) -> None:
    """Count ``seconds`` waited for SQLite's write lock against the unit of work here."""
    observation = _observed.get()
    if observation is not None:
        observation.lock_wait += seconds


def _add_pool_wait(seconds: float, backend: str) -> weakref.ReferenceType[Observation] | None:
    """Count ``seconds`` waited for a pooled connection against the unit of work here,
    and return a weak reference to that unit of work's observation (the connection's
    holder), or None outside an observed unit of work. Weak: an observation holds its
    caller's frame (and so the session and this very connection), and a strong
    reference would keep an abandoned unit of work alive."""
    instruments = _config.instruments
    if instruments is not None:
        instruments["pool_wait"].record(seconds, {"db.system": backend})
    observation = _observed.get()
    if observation is None:
        return None
    observation.pool_wait += seconds
    return weakref.ref(observation)


def _retried(reason: str, backend: str) -> None:
    """Count one retry of a unit of work (the metric ``dbsession.retries``)."""
    instruments = _config.instruments
    if instruments is not None:
        instruments["retries"].add(1, {"db.system": backend, "dbsession.reason": reason})


@contextmanager
def _attempt(number: int) -> Iterator[None]:
    """Mark the units of work opened in the block as attempt ``number`` of a retried unit."""
    token = _attempt_number.set(number)
    try:
        yield
    finally:
        _attempt_number.reset(token)


# --- statistics per call site ----------------------------------------------------------


@dataclass
class ScopeStats:
    """What one call site's units of work did: counts and durations in seconds."""

    site: str
    count: int = 0
    committed: int = 0
    rolled_back: int = 0
    db_time: float = 0.0
    durations: deque[float] = field(default_factory=lambda: deque(maxlen=_SAMPLES))

    def percentile(self, fraction: float) -> float:
        """The duration below which ``fraction`` of the recent units ended (0 < fraction <= 1)."""
        ordered = sorted(self.durations)
        if not ordered:
            return 0.0
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


_stats: dict[str, ScopeStats] = {}
_stats_lock = threading.Lock()


def _record(site: str, duration: float, db_time: float, outcome: str) -> None:
    with _stats_lock:
        entry = _stats.get(site)
        if entry is None:
            entry = _stats[site] = ScopeStats(site)
        entry.count += 1
        entry.db_time += db_time
        if outcome == "committed":
            entry.committed += 1
        else:
            entry.rolled_back += 1
        entry.durations.append(duration)


def stats() -> dict[str, ScopeStats]:
    """A snapshot of the statistics per call site (empty unless ``configure(stats=True)``)."""
    with _stats_lock:
        return {
            site: ScopeStats(
                s.site,
                s.count,
                s.committed,
                s.rolled_back,
                s.db_time,
                deque(s.durations, maxlen=_SAMPLES),
            )
            for site, s in _stats.items()
        }


def reset_stats() -> None:
    """Forget the statistics collected so far."""
    with _stats_lock:
        _stats.clear()


def format_stats() -> str:
    """The statistics as a text table, busiest call site first."""
    rows = sorted(stats().values(), key=lambda s: -s.count)
    lines = [
        f"{'units':>7} {'commit':>7} {'rollbk':>7} {'p50 ms':>8} {'p95 ms':>8} "
        f"{'p99 ms':>8} {'db %':>5}  call site"
    ]
    for s in rows:
        total = sum(s.durations) or 1.0
        lines.append(
            f"{s.count:>7} {s.committed:>7} {s.rolled_back:>7} "
            f"{s.percentile(0.5) * 1000:>8.2f} {s.percentile(0.95) * 1000:>8.2f} "
            f"{s.percentile(0.99) * 1000:>8.2f} {100 * min(s.db_time / total, 1):>5.0f}  {s.site}"
        )
    return "\n".join(lines)


def _print_at_exit() -> None:
    if _stats:
        print("dbsession: units of work per call site\n" + format_stats())


if _config.stats:
    atexit.register(_print_at_exit)
