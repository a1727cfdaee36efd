"""A web app under overload: dbsession's FastAPI and Flask integrations against bare sessions.

Run: ``python benchmarks/web_overload.py`` (a few minutes; ``--quick`` for a smoke run,
``--help`` for the knobs).

The app (benchmarks/web_apps.py: users and items, the shapes of the backend of
``fastapi/full-stack-fastapi-template``) is written with bare sessions the way the template
does it, and with dbsession's integration. Each variant is started on its own, against
PostgreSQL, with the same pool settings (``pool_size``, ``max_overflow``, ``pool_timeout``):

- FastAPI: ``uvicorn --workers 2`` (each worker has its own pool and anyio's default
  limit of 40 worker threads);
- Flask: Werkzeug's threaded WSGI server (one process, a thread per connection; waitress
  is not installed here).

N clients (100, then 30) each run a fixed mix of requests on keep-alive connections: list
a page of their items, get one, create one, update one (PUT), get it again, delete the one
they created. Variants run in alternating pairs (bare, dbsession, bare, dbsession) so the
machine's noise hits both alike. For each run the table shows the requests made, the pool
timeouts (503 with ``{"cause": "pool timeout"}``) and the other 5xx by cause, the p50/p99
latency per kind of request, the total time, and how long each request held a pooled
connection (checkout to checkin, summed over the server's processes).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from sqlalchemy import create_engine, insert, text
from sqlalchemy.pool import NullPool

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from web_apps import Base, Item, User  # noqa: E402

PG_URL = os.environ.get(
    "DBSESSION_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1/test"
)
KINDS = ("list", "get", "create", "update", "delete")
SEEDED_ITEMS = 10


@dataclass
class Run:
    """What one run of one variant measured."""

    variant: str
    clients: int
    seconds: float = 0.0
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    statuses: Counter[str] = field(default_factory=Counter)
    checkouts: int = 0
    held: float = 0.0
    longest: float = 0.0

    @property
    def requests(self) -> int:
        return sum(len(v) for v in self.latencies.values())

    @property
    def pool_timeouts(self) -> int:
        return self.statuses["pool timeout"]

    def other_errors(self) -> str:
        others = {k: v for k, v in self.statuses.items() if k not in ("ok", "pool timeout")}
        return ", ".join(f"{k} {v}" for k, v in sorted(others.items())) or "-"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def reset(url: str, users: int) -> None:
    """Empty tables with ``users`` users of SEEDED_ITEMS items each."""
    engine = create_engine(url, poolclass=NullPool)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            insert(User),
            [
                {"id": u, "email": f"u{u}@example.com", "full_name": f"User {u}"}
                for u in range(1, users + 1)
            ],
        )
        conn.execute(
            insert(Item),
            [
                {"title": f"item {n}", "description": "seeded", "owner_id": u}
                for u in range(1, users + 1)
                for n in range(SEEDED_ITEMS)
            ],
        )
        if engine.dialect.name == "postgresql":
            conn.execute(text("ANALYZE web_user; ANALYZE web_item"))
    engine.dispose()


def drop(url: str) -> None:
    engine = create_engine(url, poolclass=NullPool)
    Base.metadata.drop_all(engine)
    engine.dispose()


def start(variant: str, port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start the server of ``variant`` (e.g. ``fastapi_bare``) on ``port``."""
    if variant.startswith("fastapi"):
        command = [
            sys.executable, "-m", "uvicorn", "--factory", f"web_apps:{variant}",
            "--app-dir", str(HERE), "--workers", "2", "--port", str(port),
            "--log-level", "warning", "--no-access-log", "--timeout-keep-alive", "300",
        ]  # fmt: skip
    else:
        command = [sys.executable, str(HERE / "web_apps.py"), variant, str(port)]
    # From benchmarks/: the current directory (first on sys.path) holds no dbsession.
    return subprocess.Popen(command, env=env, cwd=HERE, stdout=subprocess.DEVNULL)


async def wait_ready(base: str, deadline: float = 30.0) -> None:
    async with httpx.AsyncClient(base_url=base) as client:
        end = time.monotonic() + deadline
        while True:
            try:
                await client.get("/items/", headers={"X-User": "1"})
                return
            except httpx.TransportError:
                if time.monotonic() > end:
                    raise
                await asyncio.sleep(0.2)


def cause(response: httpx.Response) -> str:
    if response.status_code < 400:
        return "ok"
    try:
        return str(response.json().get("cause", response.status_code))
    except ValueError:
        return str(response.status_code)


async def drive(base: str, run: Run, iterations: int) -> None:
    """``run.clients`` clients, each ``iterations`` times through the mix."""
    limits = httpx.Limits(max_connections=run.clients, max_keepalive_connections=run.clients)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=300) as client:

        async def call(
            kind: str, method: str, path: str, user: int, body: object = None
        ) -> httpx.Response | None:
            began = time.perf_counter()
            try:
                response = await client.request(
                    method, path, headers={"X-User": str(user)}, json=body
                )
            except httpx.TransportError as error:
                run.statuses[type(error).__name__] += 1
                return None
            run.latencies[kind].append(time.perf_counter() - began)
            run.statuses[cause(response)] += 1
            return response

        async def one(user: int) -> None:
            seeded = (user - 1) * SEEDED_ITEMS + 1
            for n in range(iterations):
                target = seeded + n % SEEDED_ITEMS
                await call("list", "GET", "/items/?limit=20", user)
                await call("get", "GET", f"/items/{target}", user)
                made = await call("create", "POST", "/items/", user, {"title": f"new {n}"})
                await call("update", "PUT", f"/items/{target}", user, {"title": f"edit {n}"})
                await call("get", "GET", f"/items/{target}", user)
                if made is not None and made.status_code == 200:
                    await call("delete", "DELETE", f"/items/{made.json()['id']}", user)

        began = time.perf_counter()
        await asyncio.gather(*(one(user) for user in range(1, run.clients + 1)))
        run.seconds = time.perf_counter() - began


def measure(variant: str, clients: int, iterations: int, args: argparse.Namespace) -> Run:
    reset(args.url, clients)
    port = free_port()
    stats = tempfile.mkdtemp(prefix="web_bench_")
    server = start(variant, port, server_env(args, stats))
    run = Run(variant, clients)
    try:
        base = f"http://127.0.0.1:{port}"
        asyncio.run(wait_ready(base))
        asyncio.run(drive(base, run, iterations))
    finally:
        server.terminate()
        server.wait(timeout=60)
    for path in Path(stats).glob("*.json"):
        held = json.loads(path.read_text())
        run.checkouts += int(held["checkouts"])
        run.held += held["held"]
        run.longest = max(run.longest, held["longest"])
        path.unlink()
    os.rmdir(stats)
    return run


def server_env(args: argparse.Namespace, stats: str) -> dict[str, str]:
    """The environment of a server: the app's settings, and dbsession from this checkout
    unless PYTHONPATH names another one (to measure before a change)."""
    return {
        **os.environ,
        "WEB_BENCH_URL": args.url,
        "WEB_BENCH_POOL_SIZE": str(args.pool_size),
        "WEB_BENCH_MAX_OVERFLOW": str(args.max_overflow),
        "WEB_BENCH_POOL_TIMEOUT": str(args.pool_timeout),
        "WEB_BENCH_STATS": stats,
        "WEB_BENCH_THREADS": str(args.threads or ""),
        "PYTHONPATH": os.pathsep.join([os.environ.get("PYTHONPATH", ""), str(HERE.parent)]),
    }


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def show(runs: list[Run]) -> None:
    header = (
        f"{'variant':<18} {'reqs':>5} {'pool t/o':>8} {'total s':>8} "
        + " ".join(f"{kind + ' p50/p99 s':>18}" for kind in KINDS)
        + f" {'held ms/req':>11} {'longest s':>9}  other errors"
    )
    print(header)
    for run in runs:
        cells = " ".join(
            f"{percentile(run.latencies[k], 0.5):>8.3f}/{percentile(run.latencies[k], 0.99):<9.3f}"
            for k in KINDS
        )
        held = 1000 * run.held / max(run.requests, 1)
        print(
            f"{run.variant:<18} {run.requests:>5} {run.pool_timeouts:>8} {run.seconds:>8.1f} "
            f"{cells} {held:>11.1f} {run.longest:>9.2f}  {run.other_errors()}"
        )
    by: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by[run.variant].append(run)
    variants = list(by)
    if len(variants) == 2:
        bare, ours = (by[v] for v in variants)
        ratio = statistics.median(r.seconds for r in ours) / statistics.median(
            r.seconds for r in bare
        )
        print(
            f"median total time {variants[1]} / {variants[0]}: {ratio:.2f}x; pool timeouts "
            f"{[r.pool_timeouts for r in ours]} against {[r.pool_timeouts for r in bare]}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--url", default=PG_URL, help="a PostgreSQL URL (tables web_user, web_item)"
    )
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 30])
    parser.add_argument(
        "--requests", type=int, default=1200, help="about how many requests a run makes"
    )
    parser.add_argument("--pairs", type=int, default=2, help="alternating (bare, dbsession) pairs")
    parser.add_argument("--frameworks", nargs="+", default=["fastapi", "flask"])
    parser.add_argument("--pool-size", type=int, default=10)
    parser.add_argument("--max-overflow", type=int, default=5)
    parser.add_argument("--pool-timeout", type=float, default=3.0)
    parser.add_argument(
        "--threads", type=int, help="FastAPI: anyio's thread limit per worker (default 40)"
    )
    parser.add_argument("--quick", action="store_true", help="one pair of 600 requests")
    args = parser.parse_args()
    if args.quick:
        args.pairs, args.requests = 1, 600
    where = subprocess.run(
        [sys.executable, "-c", "import dbsession; print(dbsession.__file__)"],
        env=server_env(args, ""), cwd=HERE, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    print(
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}, load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}, {os.cpu_count()} CPUs; pool_size="
        f"{args.pool_size}, max_overflow={args.max_overflow}, pool_timeout={args.pool_timeout:g}s, "
        f"FastAPI threads per worker {args.threads or 40}; "
        f"about {args.requests} requests per run (passes of 6 requests per client); "
        f"PostgreSQL {args.url.split('@')[-1]}; the servers import {where}"
    )
    try:
        for framework in args.frameworks:
            server = "uvicorn, 2 workers" if framework == "fastapi" else "Werkzeug threaded"
            for clients in args.clients:
                print(f"\n{framework} ({server}), {clients} concurrent clients")
                runs = []
                passes = max(1, round(args.requests / (6 * clients)))
                for _ in range(args.pairs):
                    for variant in ("bare", "dbsession"):
                        run = measure(f"{framework}_{variant}", clients, passes, args)
                        runs.append(run)
                show(runs)
    finally:
        drop(args.url)
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    random.seed(0)
    main()
