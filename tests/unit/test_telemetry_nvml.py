"""NvmlSampler against a fake pynvml: aggregation, energy deltas, throttle reasons, the no-GPU path."""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
import types

import pytest

from tempo_mega.telemetry.nvml import (
    NvmlSampler,
    default_nvml_devices,
    throttle_reason_names,
    tokens_per_joule,
)


class FakeNVMLError(Exception):
    pass


class FakeLibraryNotFound(FakeNVMLError):
    pass


class FakeNotSupported(FakeNVMLError):
    pass


def fake_pynvml(readings=None, count=2, init_error=None, no_energy=(), energy_getter=None):
    """A module with pynvml's names. ``readings[device]`` is a list of dicts, one per sample, with
    util (%), mem (bytes), power (mW), energy (mJ), temp, clock, reasons; the last one repeats."""
    nv = types.ModuleType("pynvml")
    nv.NVMLError = FakeNVMLError
    nv.NVMLError_LibraryNotFound = FakeLibraryNotFound
    nv.NVMLError_NotSupported = FakeNotSupported
    nv.NVML_TEMPERATURE_GPU = 0
    nv.NVML_CLOCK_SM = 1
    nv.calls = {"init": 0, "shutdown": 0, "util": 0}
    readings = readings or {}
    position = {d: 0 for d in range(count)}

    def reading(h):
        rows = readings.get(h, [{}])
        return rows[min(position[h], len(rows) - 1)]

    def nvmlInit():
        nv.calls["init"] += 1
        if init_error is not None:
            raise init_error

    def nvmlShutdown():
        nv.calls["shutdown"] += 1

    def nvmlDeviceGetUtilizationRates(h):
        nv.calls["util"] += 1
        return types.SimpleNamespace(gpu=reading(h).get("util", 0), memory=0)

    def nvmlDeviceGetTotalEnergyConsumption(h):
        if h in no_energy:
            raise FakeNotSupported("Not Supported")
        return reading(h)["energy"]

    def nvmlDeviceGetCurrentClocksEventReasons(h):
        value = reading(h).get("reasons", 0)
        position[h] += 1  # the last query of a sample: the next sample reads the next row
        return value

    nv.nvmlInit = nvmlInit
    nv.nvmlShutdown = nvmlShutdown
    nv.nvmlDeviceGetCount = lambda: count
    nv.nvmlDeviceGetHandleByIndex = lambda i: i
    nv.nvmlDeviceGetUtilizationRates = nvmlDeviceGetUtilizationRates
    nv.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=reading(h).get("mem", 0), total=80 * 2**30)
    nv.nvmlDeviceGetPowerUsage = lambda h: reading(h).get("power", 0)
    nv.nvmlDeviceGetTotalEnergyConsumption = energy_getter or nvmlDeviceGetTotalEnergyConsumption
    nv.nvmlDeviceGetTemperature = lambda h, sensor: reading(h).get("temp", 40)
    nv.nvmlDeviceGetClockInfo = lambda h, kind: reading(h).get("clock", 1980)
    nv.nvmlDeviceGetCurrentClocksEventReasons = nvmlDeviceGetCurrentClocksEventReasons
    return nv


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


GIB = 2**30
SW_POWER_CAP, GPU_IDLE, HW_SLOWDOWN = 0x4, 0x1, 0x8


def test_values_flow_into_step_metrics_with_energy_deltas():
    # Two GPUs, three samples each in the first step: start() takes one, sample() one, and
    # step_metrics() one more at the step's end. The energy counter starts at 5e6 mJ on GPU 0.
    readings = {
        0: [dict(util=10, mem=10 * GIB, power=100_000, energy=5_000_000, temp=50, clock=1000, reasons=GPU_IDLE),
            dict(util=90, mem=20 * GIB, power=500_000, energy=5_300_000, temp=70, clock=1900, reasons=SW_POWER_CAP),
            dict(util=80, mem=30 * GIB, power=400_000, energy=5_700_000, temp=60, clock=1800, reasons=0),
            dict(util=50, mem=30 * GIB, power=300_000, energy=6_000_000, temp=55, clock=1700, reasons=0)],
        1: [dict(util=20, mem=1 * GIB, power=200_000, energy=1_000, temp=40, clock=1100, reasons=0),
            dict(util=40, mem=2 * GIB, power=300_000, energy=101_000, temp=45, clock=1200, reasons=HW_SLOWDOWN | SW_POWER_CAP),
            dict(util=60, mem=3 * GIB, power=600_000, energy=401_000, temp=80, clock=1300, reasons=0),
            dict(util=70, mem=3 * GIB, power=600_000, energy=501_000, temp=41, clock=1300, reasons=0)],
    }
    nv = fake_pynvml(readings, count=2)
    sampler = NvmlSampler(devices=[0, 1], interval_s=3600, pynvml_module=nv)
    with sampler:
        sampler.sample()
        m = sampler.step_metrics()
        # util: GPU0 10, 90, 80; GPU1 20, 40, 60 -> mean 300/6, max 90
        assert m["gpu/util_mean"] == pytest.approx(50.0)
        assert m["gpu/util_max"] == 90.0
        assert m["gpu/mem_used_gib_mean"] == pytest.approx((10 + 20 + 30 + 1 + 2 + 3) / 6)
        assert m["gpu/mem_used_gib_max"] == pytest.approx(30.0)
        assert m["gpu/power_w_mean"] == pytest.approx((100 + 500 + 400 + 200 + 300 + 600) / 6)
        assert m["gpu/power_w_max"] == pytest.approx(600.0)
        assert m["gpu/temp_c_max"] == 80.0
        assert m["gpu/sm_clock_mhz_mean"] == pytest.approx((1000 + 1900 + 1800 + 1100 + 1200 + 1300) / 6)
        # counter deltas since start(), in J, summed: (5.7e6 - 5e6 + 401e3 - 1e3) mJ = 1100 J
        assert m["gpu/energy_j"] == pytest.approx(700.0 + 400.0)
        # throttled (not just idle): GPU0 sample 2, GPU1 sample 2 -> 2 of 6
        assert m["gpu/throttle_frac"] == pytest.approx(2 / 6)
        assert m["gpu/throttle/sw_power_cap_frac"] == pytest.approx(2 / 6)
        assert m["gpu/throttle/hw_slowdown_frac"] == pytest.approx(1 / 6)
        assert m["gpu/throttle/gpu_idle_frac"] == pytest.approx(1 / 6)
        assert m["gpu/num_devices"] == 2.0 and m["gpu/num_samples"] == 3.0

        # the next step starts from where the last ended: only the boundary sample of step 2 is new
        m2 = sampler.step_metrics()
        assert m2["gpu/num_samples"] == 1.0
        assert m2["gpu/util_mean"] == pytest.approx(60.0)
        assert m2["gpu/energy_j"] == pytest.approx(300.0 + 100.0)
        assert m2["gpu/throttle_frac"] == 0.0
        assert not any(k.startswith("gpu/throttle/") for k in m2)
    assert nv.calls == {"init": 1, "shutdown": 1, "util": 8}
    assert sampler.step_metrics() == {}  # stopped, nothing new


def test_energy_falls_back_to_integrated_power():
    # GPU without the energy counter: power 100 W, then 300 W two seconds later, then 300 W one
    # second after that: trapezoids 0.5*(100+300)*2 + 0.5*(300+300)*1 = 400 + 300 = 700 J
    readings = {0: [dict(power=100_000), dict(power=300_000), dict(power=300_000)]}
    clock = FakeClock()
    nv = fake_pynvml(readings, count=1, no_energy=(0,))
    with NvmlSampler(devices=[0], interval_s=3600, pynvml_module=nv, clock=clock) as sampler:
        clock.t += 2.0
        sampler.sample()
        clock.t += 1.0
        m = sampler.step_metrics()
    assert m["gpu/energy_j"] == pytest.approx(700.0)
    assert m["gpu/power_w_mean"] == pytest.approx(700 / 3)


def test_unsupported_field_is_skipped_and_not_asked_again():
    calls = []

    def energy(h):
        calls.append(h)
        raise FakeNotSupported("Not Supported")

    nv = fake_pynvml({0: [dict(util=30, power=0)]}, count=1, energy_getter=energy)
    with NvmlSampler(devices=[0], interval_s=3600, pynvml_module=nv) as sampler:
        sampler.sample()
        m = sampler.step_metrics()
    assert calls == [0]
    assert m["gpu/util_mean"] == 30.0
    assert m["gpu/energy_j"] == 0.0  # power is reported (0 W) so the integral stands in


def test_throttle_reason_names():
    assert throttle_reason_names(0) == []
    assert throttle_reason_names(0x1) == ["gpu_idle"]
    assert throttle_reason_names(0x4 | 0x40) == ["sw_power_cap", "hw_thermal_slowdown"]
    assert throttle_reason_names(0x1000 | 0x8) == ["hw_slowdown", "unknown_0x1000"]


def test_older_pynvml_throttle_function_name():
    nv = fake_pynvml({0: [dict(reasons=0x20)]}, count=1)
    nv.nvmlDeviceGetCurrentClocksThrottleReasons = nv.nvmlDeviceGetCurrentClocksEventReasons
    del nv.nvmlDeviceGetCurrentClocksEventReasons
    with NvmlSampler(devices=[0], interval_s=3600, pynvml_module=nv) as sampler:
        m = sampler.step_metrics()
    assert m["gpu/throttle_frac"] == 1.0
    assert m["gpu/throttle/sw_thermal_slowdown_frac"] == 1.0


def _off_messages(caplog):
    return [r for r in caplog.records if "NVML telemetry off" in r.getMessage()]


def test_no_gpu_logs_once_and_returns_empty(caplog):
    nv = fake_pynvml(init_error=FakeLibraryNotFound("NVML Shared Library Not Found"))
    caplog.set_level(logging.INFO, logger="tempo_mega.telemetry.nvml")
    sampler = NvmlSampler(pynvml_module=nv)
    with sampler:
        sampler.sample()
        assert sampler.step_metrics() == {}
        assert sampler.step_metrics() == {}
        sampler.start()  # already started: no second attempt, no second message
    assert not sampler.enabled
    assert len(_off_messages(caplog)) == 1
    assert "NVML Shared Library Not Found" in _off_messages(caplog)[0].getMessage()
    assert nv.calls["shutdown"] == 0  # init failed: nothing to shut down


def test_without_pynvml_installed(caplog, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    caplog.set_level(logging.INFO, logger="tempo_mega.telemetry.nvml")
    with NvmlSampler() as sampler:
        assert sampler.step_metrics() == {}
    assert len(_off_messages(caplog)) == 1
    assert "pynvml is not installed" in _off_messages(caplog)[0].getMessage()


def test_fake_module_from_sys_modules(monkeypatch):
    # the default import path picks up whatever `pynvml` is: here the fake
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml({0: [dict(util=7)]}, count=1))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with NvmlSampler(interval_s=3600) as sampler:
        assert sampler.step_metrics()["gpu/util_mean"] == 7.0


def test_real_pynvml_without_gpu_does_not_raise(caplog):
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        pytest.skip("this machine has a working NVML")
    except pynvml.NVMLError:
        pass
    with NvmlSampler() as sampler:
        assert sampler.step_metrics() == {}
    assert len(_off_messages(caplog)) == 1


def test_background_thread_samples_and_stop_joins():
    nv = fake_pynvml({0: [dict(util=50, energy=0)]}, count=1)
    sampler = NvmlSampler(devices=[0], interval_s=0.01, pynvml_module=nv).start()
    deadline = time.monotonic() + 5
    while nv.calls["util"] < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert nv.calls["util"] >= 5  # start()'s sample plus the thread's
    thread = sampler._thread
    assert thread.daemon and thread.is_alive()
    started = time.monotonic()
    sampler.stop()
    assert time.monotonic() - started < 2.0
    assert not thread.is_alive()
    assert nv.calls["shutdown"] == 1
    sampler.stop()  # idempotent
    assert nv.calls["shutdown"] == 1
    with pytest.raises(RuntimeError):
        sampler.start()


def test_step_metrics_concurrent_with_sampling():
    nv = fake_pynvml({0: [dict(util=50, energy=0)], 1: [dict(util=50, energy=0)]}, count=2)
    errors = []
    with NvmlSampler(devices=[0, 1], interval_s=0.001, pynvml_module=nv) as sampler:
        def reader():
            try:
                for _ in range(200):
                    m = sampler.step_metrics()
                    assert m["gpu/util_mean"] == 50.0
            except Exception as e:  # pragma: no cover - the failure is reported below
                errors.append(e)

        threads = [threading.Thread(target=reader) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


def test_sampling_error_turns_telemetry_off_once(caplog):
    nv = fake_pynvml({0: [dict(util=50)]}, count=1)
    caplog.set_level(logging.INFO, logger="tempo_mega.telemetry.nvml")
    sampler = NvmlSampler(devices=[0], interval_s=0.01, pynvml_module=nv).start()
    with sampler._lock:  # make the next round blow up outside the per-field guards
        sampler._window = None
    deadline = time.monotonic() + 5
    while sampler.enabled and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not sampler.enabled
    sampler.stop()
    assert len(_off_messages(caplog)) == 1
    assert nv.calls["shutdown"] == 1


@pytest.mark.parametrize(
    "env, want",
    [
        ({}, None),
        ({"LOCAL_RANK": "3"}, [3]),
        ({"CUDA_VISIBLE_DEVICES": "2,3"}, [2, 3]),
        ({"CUDA_VISIBLE_DEVICES": "2,3", "LOCAL_RANK": "1"}, [3]),
        ({"CUDA_VISIBLE_DEVICES": "5", "LOCAL_RANK": "1"}, [5]),  # one GPU bound per task
        ({"CUDA_VISIBLE_DEVICES": "GPU-abc,GPU-def", "LOCAL_RANK": "0"}, ["GPU-abc"]),
        ({"CUDA_VISIBLE_DEVICES": ""}, []),
        ({"CUDA_VISIBLE_DEVICES": "1,-1,2"}, [1]),
    ],
)
def test_default_devices(env, want):
    assert default_nvml_devices(env) == want


def test_device_by_uuid_and_empty_visible_devices(monkeypatch, caplog):
    nv = fake_pynvml({0: [dict(util=11)]}, count=1)
    nv.nvmlDeviceGetHandleByUUID = lambda uuid: {"GPU-abc": 0}[uuid]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-abc")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with NvmlSampler(interval_s=3600, pynvml_module=nv) as sampler:
        assert sampler.step_metrics()["gpu/util_mean"] == 11.0

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    nv = fake_pynvml(count=1)
    with NvmlSampler(interval_s=3600, pynvml_module=nv) as sampler:
        assert sampler.step_metrics() == {}
    assert nv.calls == {"init": 1, "shutdown": 1, "util": 0}
    assert len(_off_messages(caplog)) == 1


def test_tokens_per_joule():
    assert tokens_per_joule(1000, 250.0) == 4.0
    assert math.isnan(tokens_per_joule(1000, 0.0))
