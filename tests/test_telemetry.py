"""GPU telemetry against a fake NVML with known readings, the real no-NVML path, and the
data-wait timer on a fake clock."""
import logging
import os
import sys
import time
from types import SimpleNamespace

import pytest

from cliperase.engine import telemetry
from cliperase.engine.telemetry import METRICS, DataWaitTimer, GpuSampler


class FakeNVML:
    """Two GPUs: gpu 0 reads 40 % then 60 %, gpu 1 reports no power (NotSupported)."""

    NVML_CLOCK_SM = 1

    class NVMLError(Exception):
        pass

    def __init__(self, *, count=2, init_error=None):
        self.count, self.init_error = count, init_error
        self.calls = {"init": 0, "shutdown": 0}
        self._util = {0: iter([40, 60] + [60] * 1000), 1: iter([10] * 1000)}

    def nvmlInit(self):
        self.calls["init"] += 1
        if self.init_error:
            raise self.init_error

    def nvmlShutdown(self):
        self.calls["shutdown"] += 1

    def nvmlDeviceGetCount(self):
        return self.count

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, h):
        return b"Fake H100" if h == 0 else "Fake L4"

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=next(self._util[h]), memory=5)

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(used=(h + 1) * 1024 ** 3, total=80 * 1024 ** 3, free=0)

    def nvmlDeviceGetPowerUsage(self, h):
        if h == 1:
            raise self.NVMLError("Not Supported")
        return 350_500  # milliwatts

    def nvmlDeviceGetClockInfo(self, h, clock):
        assert clock == self.NVML_CLOCK_SM
        return 1980


def test_fake_nvml_readings_and_summary():
    nvml = FakeNVML()
    sampler = GpuSampler(interval_s=3600, nvml=nvml).start()  # one sample at start, then the long wait
    deadline = time.monotonic() + 10
    while len(sampler.samples()) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    sampler.sample_once()  # a second sample, taken now
    summary = sampler.stop()
    rows = sampler.samples()
    assert len(rows) == 4 and [r["gpu"] for r in rows] == [0, 1, 0, 1]
    first = rows[0]
    assert set(first) == {"t_s", "gpu", *METRICS}
    assert first["util_pct"] == 40 and first["mem_used_mib"] == 1024 and first["mem_total_mib"] == 80 * 1024
    assert first["power_w"] == pytest.approx(350.5) and first["sm_clock_mhz"] == 1980
    assert rows[1]["power_w"] is None and rows[1]["mem_used_mib"] == 2048
    assert summary["available"] is True and summary["samples"] == 2 and summary["query_errors"] == 2
    g0, g1 = summary["gpus"]
    assert g0["name"] == "Fake H100" and g1["name"] == "Fake L4"
    assert g0["util_pct"] == {"mean": 50.0, "max": 60.0}
    assert g0["power_w"]["max"] == pytest.approx(350.5)
    assert g1["power_w"] == {"mean": None, "max": None}
    assert nvml.calls == {"init": 1, "shutdown": 1}
    assert sampler.stop() == summary  # stopping twice is harmless


def test_thread_samples_on_its_interval_and_keeps_the_latest():
    sampler = GpuSampler(interval_s=0.01, nvml=FakeNVML(count=1), max_samples=3)
    with sampler:
        deadline = time.monotonic() + 10
        while sampler.summary()["samples"] < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
    summary = sampler.summary()
    assert summary["samples"] >= 5  # the statistics count every sample ...
    rows = sampler.samples()
    assert len(rows) == 3  # ... the raw list keeps the most recent
    assert rows == sorted(rows, key=lambda r: r["t_s"])


def test_default_imports_pynvml(monkeypatch):
    fake = FakeNVML(count=1)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    sampler = GpuSampler(interval_s=3600).start()
    assert sampler.available
    assert sampler.stop()["gpus"][0]["sm_clock_mhz"]["max"] == 1980


def test_devices_subset_and_no_gpu(monkeypatch):
    monkeypatch.setattr(telemetry, "_warned", set())
    s = GpuSampler(interval_s=3600, devices=[1, 7], nvml=FakeNVML()).start()
    assert [g["gpu"] for g in s.stop()["gpus"]] == [1]
    none = FakeNVML(count=0)
    assert GpuSampler(nvml=none).start().stop() == {"available": False, "reason": "no GPU found by NVML"}
    assert none.calls["shutdown"] == 1


def test_without_nvml_for_real(monkeypatch, caplog):
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("NVML works on this machine; the no-NVML path is tested where it does not")
    monkeypatch.setattr(telemetry, "_warned", set())
    caplog.set_level(logging.INFO, logger="cliperase.telemetry")
    for _ in range(3):
        sampler = GpuSampler(interval_s=0.01).start()
        assert not sampler.available and sampler.samples() == []
        summary = sampler.stop()
        assert summary["available"] is False and "NVMLError" in summary["reason"]
    assert len([r for r in caplog.records if "telemetry off" in r.getMessage()]) == 1  # logged once


def test_init_failure_of_a_fake_is_reported(monkeypatch):
    monkeypatch.setattr(telemetry, "_warned", set())
    nvml = FakeNVML(init_error=FakeNVML.NVMLError("Driver Not Loaded"))
    summary = GpuSampler(nvml=nvml).start().stop()
    assert summary == {"available": False, "reason": "NVMLError: Driver Not Loaded"}


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="interval_s"):
        GpuSampler(interval_s=0)
    with pytest.raises(ValueError, match="max_samples"):
        GpuSampler(max_samples=0)


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_data_wait_fraction_on_a_fake_clock(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(telemetry.time, "perf_counter", clock)

    def batches():
        for i in range(3):
            clock.now += 2.0  # the loader takes 2 s per batch
            yield i

    timer = DataWaitTimer()
    assert timer.fraction is None
    it = timer.wrap(batches())
    for _ in range(3):
        with timer.step():
            next(it)
            clock.now += 3.0  # compute takes 3 s
    assert list(it) == []  # exhaustion is not a fetch
    assert timer.summary() == {"data_wait_s": 6.0, "step_s": 15.0, "steps": 3, "fetches": 3,
                               "data_wait_fraction": pytest.approx(0.4)}
    with timer.waiting():
        clock.now += 1.0
    assert timer.wait_s == 7.0 and timer.fetches == 4
    timer.reset()
    assert timer.summary()["steps"] == 0 and timer.fraction is None


@pytest.mark.skipif(not os.path.isfile("/proc/self/status"), reason="reads Linux /proc")
def test_memory_phases_peak_is_per_phase():
    """A phase's peak counts its own allocations: 256 MiB allocated and freed inside the first
    phase raise its peak, not the second's (the kernel's high-water mark is reset between)."""
    import mmap

    from cliperase.engine.telemetry import MemoryPhases

    phases = MemoryPhases()
    # An anonymous map: always new pages. (A tensor may reuse memory the allocator kept resident
    # from earlier tests in the same worker, and then no RSS moves.)
    big = mmap.mmap(-1, 256 * 2**20)
    for at in range(0, len(big), 4096):
        big[at] = 1  # touched, so resident
    big.close()
    phases.end("spike")
    phases.end("quiet", step=2)
    spike, quiet = phases.rows
    assert spike["phase"] == "spike" and quiet["phase"] == "quiet" and quiet["step"] == 2
    assert spike["peak_is_per_phase"]
    assert spike["peak_rss_bytes"] > spike["rss_bytes"] + 200 * 2**20  # the spike, gone by the phase's end
    assert quiet["peak_rss_bytes"] < spike["peak_rss_bytes"] - 200 * 2**20  # not carried into the next phase
