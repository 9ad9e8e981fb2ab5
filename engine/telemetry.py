"""Run telemetry: GPU utilisation, memory, power and SM clock sampled in the background, and the
fraction of step time spent waiting for data.

    sampler = GpuSampler(interval_s=5).start()      # never raises for a missing GPU or NVML
    wait = DataWaitTimer()
    batches = wait.wrap(batches)                     # times each next(batches)
    for step in range(steps):
        with wait.step():
            images, tokens = next(batches)
            ...
    report["telemetry"] = {"gpu": sampler.stop(), "data": wait.summary()}

`MemoryPhases` records this process's peak resident memory per phase of a run (Linux /proc).

Without a GPU or without the NVML library the sampler logs once that GPU telemetry is off and
its summary is `{"available": False, "reason": ...}`.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence

__all__ = ["GpuSampler", "DataWaitTimer", "MemoryPhases", "METRICS", "proc_status", "tensorboard_writer"]

log = logging.getLogger("cliperase.telemetry")

# Sampled per GPU; a metric the device does not report (NVMLError_NotSupported) is None.
METRICS = ("util_pct", "mem_used_mib", "mem_total_mib", "power_w", "sm_clock_mhz")
_MIB = 1024 * 1024
_warned: set = set()  # reasons already logged: one line per process, not one per run or sampler


class _Stat:
    """Running mean and max of one metric: every sample counts, however few are kept raw."""

    __slots__ = ("n", "total", "max")

    def __init__(self):
        self.n, self.total, self.max = 0, 0.0, None

    def add(self, x: Optional[float]) -> None:
        if x is None:
            return
        self.n += 1
        self.total += x
        self.max = x if self.max is None else max(self.max, x)

    def summary(self) -> Dict[str, Optional[float]]:
        return {"mean": self.total / self.n if self.n else None, "max": self.max}


class GpuSampler:
    """Samples every GPU (or `devices`, NVML indices) every `interval_s` seconds on a daemon
    thread, from `start()` until `stop()`; also a context manager.

    Raw samples (dicts: `t_s` since start, `gpu`, and METRICS) are kept up to `max_samples`
    (the most recent ones); the summary's mean/max cover every sample taken. `nvml` is the
    pynvml module by default; tests pass a fake. Raises ValueError for `interval_s <= 0` or
    `max_samples < 1`; a missing NVML or GPU never raises (see `summary`).
    """

    def __init__(self, interval_s: float = 5.0, *, devices: Optional[Sequence[int]] = None,
                 max_samples: int = 10000, nvml: Any = None):
        if interval_s <= 0:
            raise ValueError(f"interval_s: expected > 0, got {interval_s}")
        if max_samples < 1:
            raise ValueError(f"max_samples: expected >= 1, got {max_samples}")
        self.interval_s, self.devices, self.max_samples = interval_s, devices, max_samples
        self._nvml, self._handles, self._reason = nvml, [], None
        self._samples: List[dict] = []
        self._stats: Dict[int, Dict[str, _Stat]] = {}
        self._names: Dict[int, str] = {}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self._t0 = 0.0
        self._errors = 0

    @property
    def available(self) -> bool:
        return bool(self._handles)

    def start(self) -> "GpuSampler":
        """Initialise NVML and start sampling; without NVML or a GPU, log once and do nothing."""
        if self._thread is not None:
            return self
        try:
            if self._nvml is None:
                import pynvml as nvml  # nvidia-ml-py; the import itself needs no driver
                self._nvml = nvml
            self._nvml.nvmlInit()
            count = self._nvml.nvmlDeviceGetCount()
            indices = list(range(count)) if self.devices is None else [i for i in self.devices if 0 <= i < count]
            self._handles = [(i, self._nvml.nvmlDeviceGetHandleByIndex(i)) for i in indices]
            for i, h in self._handles:
                name = self._nvml.nvmlDeviceGetName(h)
                self._names[i] = name.decode() if isinstance(name, bytes) else str(name)
                self._stats[i] = {m: _Stat() for m in METRICS}
        except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, _DriverNotLoaded, ...
            self._off(f"{type(exc).__name__}: {exc}")
            return self
        if not self._handles:
            self._off("no GPU found by NVML")
            self._shutdown()
            return self
        self._t0 = time.perf_counter()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="cliperase-gpu-telemetry", daemon=True)
        self._thread.start()
        return self

    def _off(self, reason: str) -> None:
        self._reason, self._handles = reason, []
        if reason not in _warned:
            _warned.add(reason)
            log.info("GPU telemetry off (%s)", reason)

    def _run(self) -> None:
        while True:
            self.sample_once()
            if self._stop.wait(self.interval_s):
                return

    def sample_once(self) -> List[dict]:
        """Take one sample of every GPU now (the thread calls this); returns the new rows."""
        t = time.perf_counter() - self._t0
        rows = [self._read(i, h, t) for i, h in self._handles]
        with self._lock:
            for row in rows:
                for m in METRICS:
                    self._stats[row["gpu"]][m].add(row[m])
            self._samples.extend(rows)
            if len(self._samples) > self.max_samples:
                del self._samples[: len(self._samples) - self.max_samples]
        return rows

    def _query(self, fn, *args):
        try:
            return fn(*args)
        except self._nvml.NVMLError:  # NotSupported on some boards (power on many consumer GPUs)
            self._errors += 1
            return None

    def _read(self, index: int, handle, t: float) -> dict:
        n = self._nvml
        util = self._query(n.nvmlDeviceGetUtilizationRates, handle)
        mem = self._query(n.nvmlDeviceGetMemoryInfo, handle)
        power_mw = self._query(n.nvmlDeviceGetPowerUsage, handle)
        clock = self._query(n.nvmlDeviceGetClockInfo, handle, n.NVML_CLOCK_SM)
        return {
            "t_s": round(t, 3),
            "gpu": index,
            "util_pct": None if util is None else float(util.gpu),
            "mem_used_mib": None if mem is None else mem.used / _MIB,
            "mem_total_mib": None if mem is None else mem.total / _MIB,
            "power_w": None if power_mw is None else power_mw / 1000.0,
            "sm_clock_mhz": None if clock is None else float(clock),
        }

    def stop(self) -> dict:
        """Stop sampling, release NVML and return `summary()`; safe to call more than once."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._shutdown()
        return self.summary()

    def _shutdown(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except Exception:  # nothing to release, or the driver went away: telemetry must not fail a run
            pass

    def samples(self) -> List[dict]:
        """The raw samples kept (a copy), oldest first."""
        with self._lock:
            return [dict(s) for s in self._samples]

    def summary(self) -> dict:
        """`{"available": False, "reason": ...}` without NVML/GPU; otherwise interval, sample
        count, per GPU its name and mean/max of each metric, and the query errors counted."""
        if self._reason is not None or not self._stats:
            return {"available": False, "reason": self._reason or "not started"}
        with self._lock:
            gpus = [{"gpu": i, "name": self._names[i], **{m: s.summary() for m, s in self._stats[i].items()}}
                    for i in sorted(self._stats)]
            n = max((s["util_pct"].n for s in self._stats.values()), default=0)
        return {"available": True, "interval_s": self.interval_s, "samples": n, "gpus": gpus,
                "query_errors": self._errors}

    def __enter__(self) -> "GpuSampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class DataWaitTimer:
    """Accumulates wall time spent waiting for data and wall time per step, for the fraction
    of step time the input pipeline costs.

    Use `wrap(iterator)` (or `with timer.waiting():` around a fetch) for the wait, and
    `with timer.step():` around the whole step, fetch included. With CUDA the step time is host
    time: kernels run asynchronously, but over many steps the host is held back to the GPU's
    pace by the queue, so the totals (not one step) are what to read.
    """

    def __init__(self):
        self.wait_s = 0.0  # total seconds inside waiting()/wrapped next()
        self.step_s = 0.0  # total seconds inside step()
        self.steps = 0
        self.fetches = 0

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.wait_s += time.perf_counter() - t
            self.fetches += 1

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.step_s += time.perf_counter() - t
            self.steps += 1

    def wrap(self, iterable: Iterable) -> Iterator:
        """Yield from `iterable`, timing each fetch as waiting."""
        it = iter(iterable)
        while True:
            t = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            finally:
                self.wait_s += time.perf_counter() - t
            self.fetches += 1
            yield item

    @property
    def fraction(self) -> Optional[float]:
        """wait_s / step_s; None before any step was timed."""
        return self.wait_s / self.step_s if self.step_s > 0 else None

    def summary(self) -> dict:
        return {"data_wait_s": round(self.wait_s, 6), "step_s": round(self.step_s, 6), "steps": self.steps,
                "fetches": self.fetches, "data_wait_fraction": self.fraction}

    def reset(self) -> None:
        self.wait_s = self.step_s = 0.0
        self.steps = self.fetches = 0


def tensorboard_writer(log_dir):
    """A SummaryWriter, or None (said once) when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if "tensorboard" not in _warned:
            _warned.add("tensorboard")
            log.warning("tensorboard is not installed: no TensorBoard curves (log.jsonl and eval.jsonl have them)")
        return None
    return SummaryWriter(str(log_dir))


def proc_status(pid="self") -> Dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile, RssShmem of process `pid` (this one by default) in bytes
    (Linux), else {} (also when the process is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


class MemoryPhases:
    """Peak resident memory (RSS) of this process per named phase: `end(phase)` records the peak
    since the previous `end` (or creation) and resets the kernel's high-water mark (writing 5 to
    /proc/self/clear_refs) so the next phase starts from the current RSS. Also recorded: RSS at
    the phase's end split into anonymous and file-backed pages (a memory-mapped checkpoint's pages
    are file-backed: the page cache's, shared between processes). Child processes (data workers)
    are not counted. Where /proc is missing (not Linux), `rows` stays empty."""

    def __init__(self):
        self.rows: List[Dict[str, Any]] = []
        self._t = time.perf_counter()
        self._reset()

    @staticmethod
    def _reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def end(self, phase: str, **extra) -> None:
        """Close `phase` (extra: e.g. step=3, kept in its row)."""
        st = proc_status()
        if not st:
            return
        now = time.perf_counter()
        self.rows.append({"phase": phase, **extra, "peak_rss_bytes": st.get("VmHWM"), "rss_bytes": st.get("VmRSS"),
                          "rss_anon_bytes": st.get("RssAnon"), "rss_file_bytes": st.get("RssFile"),
                          "seconds": round(now - self._t, 3), "peak_is_per_phase": self._reset()})
        self._t = now
