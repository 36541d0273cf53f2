"""Event-loop stalls at scale, measured in process: which callback held the loop, and for how long.

`bench/scale.py` probes the real server over HTTP, so its probe also queues behind the load
it creates (the burst's own 64 concurrent pings). This harness measures the loop itself:
the real `SessionManager` on a temporary SQLite store, the real `Sweeper` (the heap frozen
as the server does), the status page's close listener, a closer double that only queues the
DELETEs, and, beside the phases:

* a ticker task that sleeps 1 ms and records how late it wakes (the loop's lag);
* every callback the loop runs timed (`asyncio.Handle._run` wrapped): the longest ones are
  named by their task and the place their coroutine stopped at;
* a sampling thread that, while one callback has held the loop for over 2 ms, records the
  innermost sidecar frame of the main thread (what the loop was busy with);
* `gc.callbacks` timing every collection;
* for the ticker's longest wait of each phase, every callback that ran while it waited
  (`max lag was:` under the row): the lag is the sum of what ran back to back in the loop's
  turns, not the longest callback alone; and the wait with the most of the main thread's
  own CPU time in it (`max CPU lag`): on a shared, loaded machine the wall-time lag is mostly
  the process waiting for a CPU, the CPU lag is the sidecar's own work a request waited for;
* each callback's minor page faults and involuntary context switches (`getrusage` of the
  main thread) and the phase's steal time (`/proc/stat`): a virtual machine whose host takes
  the CPU away shows that time as the guest thread's own CPU time.

`--loop uvloop` runs it on the loop the server uses: uvloop's handles cannot be wrapped, so
only the ticker's lags, the collections and the sampler's findings are shown then.

Phases (N sessions): idle sweeps; a sweep with 1% expired; a flush of N dirty sessions; a
burst of touches while the flusher runs on its own timer; a mass expiry of all N; with
`--hibernate` (or by default), the same N hibernated at once on a second manager.

    .venv/bin/python bench/stalls.py [--sessions 100000] [--phases idle,expire1,...]
        [--loop asyncio|uvloop]

Prints one row a phase: max and p99 lag of the 1 ms ticker, the longest callback and what
it was, the collections and their longest, the phase's wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import logging
import os
import pstats
import resource
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sidecar import heap, log
from sidecar.admission import Limits
from sidecar.manager import SessionManager
from sidecar.metrics import Metrics
from sidecar.monitor import Monitor
from sidecar.sessions import Policy, ResumeState, Session, Transport
from sidecar.store import PendingClose
from sidecar.store.sqlite import SqliteStore
from sidecar.sweeper import Sweeper

T0 = 1_700_000_000.0
IDLE = 3600.0
STALL = 0.010  # the target: no callback holds the loop longer
SAMPLE_AFTER = 0.002  # the sampler looks at the main thread once a callback ran this long
CREATE_BATCH = 2000
PROFILE = os.environ.get("STALLS_PROFILE", "")  # a phase name's start: cProfile it
TOP = 5  # callbacks over STALL listed under each phase's row
NAMED = 0.0002  # callbacks that ran longer than this are named in the max lag's breakdown
RECENT = 256  # callbacks remembered to explain the ticker's longest wait


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@dataclass
class QueuingCloser:
    """Takes the DELETEs owed, as the real closer's `schedule` does, and sends none."""

    owed: int = 0

    def schedule(self, pending: PendingClose, credentials: Mapping[str, str]) -> None:
        self.owed += 1


# ---- what the loop does -----------------------------------------------------------------------


@dataclass
class Held:
    seconds: float
    cpu: float  # of that, the main thread's own CPU time (the rest: waiting for CPU, GIL, I/O)
    what: str
    where: str
    inside: str = ""  # what the sampler saw while this callback ran
    faults: int = 0  # minor page faults the main thread took in it
    switches: int = 0  # times the kernel took the CPU from it (involuntary context switches)


@dataclass
class Ran:
    """One callback in the window of the ticker's wait (named if it was not short)."""

    start: float
    seconds: float
    cpu: float
    what: str


@dataclass
class Wait:
    """The ticker's longest wait in a phase and the callbacks run meanwhile."""

    lag: float = 0.0
    ran: list[Ran] = field(default_factory=list)

    def describe(self) -> str:
        named = [r for r in self.ran if r.what]
        small = len(self.ran) - len(named)
        small_ms = sum(r.seconds for r in self.ran if not r.what) * 1000
        parts = [f"{r.seconds * 1000:.1f} (cpu {r.cpu * 1000:.1f}) {r.what}" for r in named]
        parts.append(f"{small} short ones {small_ms:.1f}")
        return f"{self.lag * 1000:.1f} ms = " + " + ".join(parts)


@dataclass
class Recorder:
    """Everything the loop ran since `reset`: callbacks over 1 ms, lags, collections."""

    lags: list[float] = field(default_factory=list)
    held: list[Held] = field(default_factory=list)
    collections: list[tuple[int, float]] = field(default_factory=list)
    samples: Counter[str] = field(default_factory=Counter)
    current_start: float = 0.0  # when the running callback began (0: none running)
    current_samples: list[str] = field(default_factory=list)
    recent: deque[Ran] = field(default_factory=lambda: deque(maxlen=RECENT))
    worst: Wait = field(default_factory=Wait)
    worst_cpu: Wait = field(default_factory=Wait)  # `lag` here: CPU time of what it waited for
    _gc_start: float = 0.0

    def reset(self) -> None:
        self.lags.clear()
        self.held.clear()
        self.collections.clear()
        self.samples.clear()
        self.worst = Wait()
        self.worst_cpu = Wait()

    def waited(self, since: float, lag: float) -> None:
        """The ticker woke `lag` late: if the phase's worst, keep what ran after it was due.
        Also the main thread's own CPU time in the callbacks it waited for: on a loaded
        machine the wall time is mostly waiting for a CPU, this part is the sidecar's work."""
        self.lags.append(lag)
        ran = []
        for r in reversed(self.recent):
            if r.start + r.seconds < since:
                break
            ran.append(r)
        cpu = sum(r.cpu for r in ran)
        if lag > self.worst.lag:
            self.worst = Wait(lag, ran[::-1])
        if cpu > self.worst_cpu.lag:
            self.worst_cpu = Wait(cpu, ran[::-1])

    def on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            self.collections.append((info["generation"], time.perf_counter() - self._gc_start))


RECORDER = Recorder()
MAIN_THREAD = threading.main_thread().ident
ASYNCIO_DIR = str(Path(asyncio.__file__).parent)
SIDECAR_DIR = str(Path(__file__).resolve().parent.parent / "sidecar")


def _describe(handle: asyncio.Handle) -> tuple[str, str]:
    """The task (or function) a callback ran, and where its coroutine is now suspended."""
    callback = getattr(handle, "_callback", None)
    owner = getattr(callback, "__self__", None)
    if isinstance(owner, asyncio.Task):
        coro = owner.get_coro()
        frame = getattr(coro, "cr_frame", None)
        where = "done"
        while frame is not None:
            # The innermost frame of our own code: asyncio's `sleep` says nothing.
            if not frame.f_code.co_filename.startswith(ASYNCIO_DIR) or where == "done":
                where = (
                    f"{Path(frame.f_code.co_filename).stem}.{frame.f_code.co_name}:{frame.f_lineno}"
                )
            awaited = getattr(coro, "cr_await", None)
            if awaited is None or not hasattr(awaited, "cr_frame"):
                break
            coro, frame = awaited, awaited.cr_frame
        return owner.get_name(), where
    return getattr(callback, "__qualname__", repr(callback)), ""


def _wrap_handles() -> None:
    run = asyncio.Handle._run

    def timed(handle: asyncio.Handle) -> None:
        RECORDER.current_samples = []
        usage = resource.getrusage(resource.RUSAGE_THREAD)
        start = RECORDER.current_start = time.perf_counter()
        cpu = time.thread_time()
        try:
            run(handle)
        finally:
            took = time.perf_counter() - start
            cpu = time.thread_time() - cpu
            RECORDER.current_start = 0.0
            what = ""
            if took > NAMED:
                task, where = _describe(handle)
                what = f"{task} @ {where}"
            RECORDER.recent.append(Ran(start, took, cpu, what))
            if took > 0.001:
                after = resource.getrusage(resource.RUSAGE_THREAD)
                seen = Counter(RECORDER.current_samples).most_common(3)
                inside = ", ".join(f"{k} x{n}" for k, n in seen)
                task, _, where = what.partition(" @ ")
                RECORDER.held.append(
                    Held(
                        took,
                        cpu,
                        task,
                        where,
                        inside,
                        after.ru_minflt - usage.ru_minflt,
                        after.ru_nivcsw - usage.ru_nivcsw,
                    )
                )

    asyncio.Handle._run = timed  # type: ignore[method-assign]


def _innermost_sidecar(frame: FrameType | None) -> str:
    found = ""
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(SIDECAR_DIR):
            found = f"{Path(name).stem}.{frame.f_code.co_name}:{frame.f_lineno}"
            break
        frame = frame.f_back
    return found or "(outside sidecar)"


def _sampler(stop: threading.Event) -> None:
    while not stop.wait(0.001):
        start = RECORDER.current_start
        if start and time.perf_counter() - start > SAMPLE_AFTER:
            frame = sys._current_frames().get(MAIN_THREAD)  # type: ignore[arg-type]
            found = _innermost_sidecar(frame)
            RECORDER.samples[found] += 1
            RECORDER.current_samples.append(found)


async def _ticker(stop: asyncio.Event) -> None:
    while not stop.is_set():
        before = time.perf_counter()
        await asyncio.sleep(0.001)
        RECORDER.waited(before + 0.001, time.perf_counter() - before - 0.001)


# ---- phases -----------------------------------------------------------------------------------


@dataclass
class Row:
    phase: str
    wall: float
    lags: list[float]
    held: list[Held]
    collections: list[tuple[int, float]]
    samples: Counter[str]
    worst: Wait
    worst_cpu: Wait
    steal: float

    def cells(self) -> list[str]:
        lags = sorted(self.lags) or [0.0]
        p99 = lags[min(len(lags) - 1, int(len(lags) * 0.99))]
        worst = max(self.held, key=lambda h: h.seconds, default=Held(0.0, 0.0, "-", ""))
        hungriest = max(self.held, key=lambda h: h.cpu, default=worst)
        over = sum(1 for h in self.held if h.seconds > STALL)
        gcs = f"{len(self.collections)}"
        if self.collections:
            gen, longest = max(self.collections, key=lambda c: c[1])
            gcs += f" (max gen{gen} {longest * 1000:.1f} ms)"
        top = ", ".join(f"{k} x{n}" for k, n in self.samples.most_common(2)) or "-"
        return [
            self.phase,
            f"{self.wall:.2f} s",
            f"{lags[-1] * 1000:.1f}",
            f"{p99 * 1000:.1f}",
            f"{worst.seconds * 1000:.1f} (cpu {worst.cpu * 1000:.1f})",
            f"{hungriest.cpu * 1000:.1f}",
            f"{worst.what} @ {worst.where} [{worst.inside}]",
            str(over),
            gcs,
            top,
            f"{self.steal * 1000:.0f}",
            f"{self.worst_cpu.lag * 1000:.1f}",
        ]


HEADER = [
    "phase",
    "wall",
    "max lag ms",
    "p99 lag ms",
    "longest callback ms",
    "most CPU in one callback ms",
    "that callback (task @ where it stopped)",
    "callbacks > 10 ms",
    "collections",
    "sampled while held > 2 ms",
    "steal ms",
    "max CPU lag ms",
]


def _steal() -> float:
    """Seconds of CPU the host took from this virtual machine so far (all its CPUs)."""
    with open("/proc/stat") as stat:
        fields = stat.readline().split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[8]) / ticks if len(fields) > 8 else 0.0


async def measure(phase: str, work: Callable[[], Awaitable[object]]) -> Row:
    await asyncio.sleep(0.05)  # the previous phase's tail out of this one's figures
    RECORDER.reset()
    profiler = cProfile.Profile() if PROFILE and phase.startswith(PROFILE) else None
    start = time.perf_counter()
    steal = _steal()
    if profiler is not None:
        profiler.enable()
    await work()
    wall = time.perf_counter() - start
    steal = _steal() - steal
    if profiler is not None:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
    await asyncio.sleep(0.02)  # the last lag of the phase recorded
    row = Row(
        phase,
        wall,
        list(RECORDER.lags),
        list(RECORDER.held),
        list(RECORDER.collections),
        Counter(RECORDER.samples),
        RECORDER.worst,
        RECORDER.worst_cpu,
        steal,
    )
    print(" | ".join(row.cells()), flush=True)
    if row.worst.ran:
        print(f"#   max lag was: {row.worst.describe()}")
    if row.worst_cpu.ran:
        print(f"#   max CPU lag (the main thread's CPU time) was: {row.worst_cpu.describe()}")
    for held in sorted(row.held, key=lambda h: -h.seconds)[:TOP]:
        if held.seconds > STALL:
            print(
                f"#   {held.seconds * 1000:.1f} ms (cpu {held.cpu * 1000:.1f}, "
                f"{held.faults} page faults, {held.switches} preempted) {held.what} "
                f"@ {held.where} [{held.inside}]"
            )
    return row


async def build(
    directory: str, name: str, policy: Policy, clock: Clock
) -> tuple[SessionManager, SqliteStore, QueuingCloser]:
    store = SqliteStore(os.path.join(directory, f"{name}.db"))
    await store.open()
    closer = QueuingCloser()
    metrics = Metrics()
    manager = SessionManager(
        store,
        closer,  # type: ignore[arg-type]
        metrics,
        policy=policy,
        limits=Limits(),
        tombstone_ttl=7 * 86400,
        clock=clock,
    )
    monitor = Monitor(lambda: (len(manager.live), 0), manager.live.values, clock)
    manager.close_listeners.append(monitor.record_close)
    manager.between_slices = heap.settle  # as the server wires it
    return manager, store, closer


async def populate(manager: SessionManager, count: int, prefix: str, resume: bool) -> None:
    """Sessions through `create` (group commit), `CREATE_BATCH` concurrent at a time."""
    setup = ResumeState({"protocolVersion": "2025-06-18", "capabilities": {}}) if resume else None
    for first in range(0, count, CREATE_BATCH):
        await asyncio.gather(
            *(
                manager.create(
                    f"{prefix}{i:08d}-{'x' * 20}",
                    Transport.STREAMABLE_HTTP,
                    "auth:bench",
                    protocol_version="2025-06-18",
                    user_agent="bench/1.0",
                    client_info="bench 1.0",
                    credentials={"Authorization": "Bearer t"},
                    resume=setup,
                )
                for i in range(first, min(count, first + CREATE_BATCH))
            )
        )
    heap.settle()


async def burst(manager: SessionManager, sessions: list[Session], clock: Clock) -> None:
    """Every session touched once, 64 at a time (a request each), while the flusher runs."""
    flusher = asyncio.create_task(run_flusher(manager))
    try:
        for first in range(0, len(sessions), 64):
            clock.now += 0.0001
            for session in sessions[first : first + 64]:
                manager.count_request(session)
                manager.touch(session)
            await asyncio.sleep(0)
        await manager.flush()
    finally:
        flusher.cancel()
        await asyncio.gather(flusher, return_exceptions=True)


async def run_flusher(manager: SessionManager) -> None:
    while True:
        await asyncio.sleep(0.25)
        await manager.flush()


def dirty_all(manager: SessionManager) -> None:
    """Every session touched (outside the measured phase: only the flush is measured)."""
    for session in manager.live.values():
        manager.touch(session)


async def main(count: int, phases: set[str], on_uvloop: bool) -> list[Row]:
    if not on_uvloop:
        _wrap_handles()  # uvloop's handles are compiled: not wrapped, not timed
    gc.callbacks.append(RECORDER.on_gc)
    # Every line formatted and written as the server's are (`log.configure`: its formatter,
    # and no caller lookup nor process and thread names per record), to /dev/null instead of
    # stderr, so a disk busy with the store's writes does not block the loop's writes here.
    log_file = open(os.devnull, "w")  # noqa: SIM115, ASYNC230 - open for the whole run
    log.configure("info", "text")
    for handler in logging.getLogger("sidecar").handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(log_file)
    stop_thread = threading.Event()
    sampler = threading.Thread(target=_sampler, args=(stop_thread,), daemon=True)
    sampler.start()
    stop_ticker = asyncio.Event()
    ticker = asyncio.create_task(_ticker(stop_ticker), name="ticker")
    rows: list[Row] = []
    print(" | ".join(HEADER), flush=True)
    try:
        with tempfile.TemporaryDirectory(prefix="stalls-") as directory:
            rows += await close_phases(directory, count, phases)
            if "hibernate" in phases:
                rows += await hibernate_phase(directory, count)
    finally:
        stop_ticker.set()
        await ticker
        stop_thread.set()
        sampler.join()
        log_file.close()
    return rows


async def close_phases(directory: str, count: int, phases: set[str]) -> list[Row]:
    clock = Clock()
    manager, store, _ = await build(directory, "close", Policy(idle_timeout=IDLE), clock)
    sweeper = Sweeper(manager, 1.0, 1.0, freeze_heap=True)
    rows: list[Row] = []
    try:
        early = count // 100
        started = time.perf_counter()
        await populate(manager, early, "a", resume=False)
        clock.now = T0 + 600
        await populate(manager, count - early, "b", resume=False)
        print(f"# {count} sessions created in {time.perf_counter() - started:.1f} s", flush=True)

        async def idle_sweeps() -> None:
            for _ in range(5):
                clock.now += 1
                await sweeper.sweep_once()

        if "idle" in phases:
            rows.append(await measure("idle sweeps (5)", idle_sweeps))
        clock.now = T0 + IDLE + 1  # the first 1% are past idle_timeout
        if "expire1" in phases:
            rows.append(await measure(f"sweep, 1% expired ({early})", sweeper.sweep_once))
        else:
            await sweeper.sweep_once()
        if "flush" in phases:
            dirty_all(manager)
            rows.append(await measure(f"flush of {len(manager.live)} dirty", manager.flush))
        if "burst" in phases:
            live = list(manager.live.values())
            # The load generator's own list of 100,000 sessions: young, every young collection
            # in the phase walked it whole and charged that to the sidecar's flush. Frozen as
            # the server's long-lived objects are.
            heap.settle()
            rows.append(
                await measure(
                    f"burst: {len(live)} touches + flusher", lambda: burst(manager, live, clock)
                )
            )
        if "expire" in phases:
            clock.now += IDLE + 600
            rows.append(await measure(f"mass expiry ({len(manager.live)})", sweeper.sweep_once))
    finally:
        await store.close()
    return rows


async def hibernate_phase(directory: str, count: int) -> list[Row]:
    clock = Clock()
    policy = Policy(idle_timeout=IDLE, idle_action="hibernate")
    manager, store, _ = await build(directory, "hibernate", policy, clock)
    sweeper = Sweeper(manager, 1.0, 1.0, freeze_heap=True)
    try:
        await populate(manager, count, "h", resume=True)
        clock.now = T0 + IDLE + 1
        return [await measure(f"hibernate all ({count})", sweeper.sweep_once)]
    finally:
        await store.close()


ALL_PHASES = "idle,expire1,flush,burst,expire,hibernate"

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=100_000)
    parser.add_argument("--phases", default=ALL_PHASES, help=f"comma-separated ({ALL_PHASES})")
    parser.add_argument(
        "--loop", choices=("asyncio", "uvloop"), default="asyncio", help="uvloop: as the server"
    )
    args = parser.parse_args()
    print(f"# load before: {os.getloadavg()} loop: {args.loop}", flush=True)
    phases = set(args.phases.split(","))
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(main(args.sessions, phases, True))
    else:
        asyncio.run(main(args.sessions, phases, False))
    print(f"# load after: {os.getloadavg()}", flush=True)
