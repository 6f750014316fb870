"""GPU telemetry from NVML: a background thread samples each GPU about once a second, and
``step_metrics()`` turns the samples taken since its last call into ``gpu/*`` metrics for one step.

    with NvmlSampler() as gpu:          # the GPU of this process (LOCAL_RANK / CUDA_VISIBLE_DEVICES)
        for step in range(num_steps):
            metrics = ctrl.step(step)
            metrics.update(gpu.step_metrics())

NVML comes from ``nvidia-ml-py`` (``import pynvml``), an optional dependency (``tempo-mega[nvml]``).
Without it, or without a GPU or driver (``nvmlInit`` raises ``NVMLError_LibraryNotFound``), the
sampler logs one warning, ``NVML telemetry off: <why>``, and ``step_metrics()`` returns ``{}``: a
run never fails for want of telemetry.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

__all__ = [
    "NvmlSampler",
    "default_nvml_devices",
    "throttle_reason_names",
    "tokens_per_joule",
]

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 2.0

# nvmlClocksEventReason* bits (named nvmlClocksThrottleReason* before CUDA 12.2); the values are part
# of NVML's ABI, so they are spelled out here rather than read from whichever pynvml is installed.
THROTTLE_REASONS: tuple[tuple[int, str], ...] = (
    (0x001, "gpu_idle"),
    (0x002, "applications_clocks_setting"),
    (0x004, "sw_power_cap"),
    (0x008, "hw_slowdown"),
    (0x010, "sync_boost"),
    (0x020, "sw_thermal_slowdown"),
    (0x040, "hw_thermal_slowdown"),
    (0x080, "hw_power_brake_slowdown"),
    (0x100, "display_clock_setting"),
    (0x200, "board_limit"),
    (0x400, "reliability"),
)
GPU_IDLE = 0x001


def throttle_reason_names(mask: int) -> list[str]:
    """Names of the reasons set in an NVML clocks-event (throttle) bitmask, lowest bit first.
    Bits this table does not know come out as ``unknown_0x...``."""
    names = [name for bit, name in THROTTLE_REASONS if mask & bit]
    known = 0
    for bit, _ in THROTTLE_REASONS:
        known |= bit
    rest = mask & ~known
    bit = 1
    while rest:
        if rest & bit:
            names.append(f"unknown_0x{bit:x}")
            rest &= ~bit
        bit <<= 1
    return names


def tokens_per_joule(tokens: float, energy_j: float) -> float:
    """Tokens processed per joule of GPU energy; NaN when no energy was measured (``energy_j <= 0``)."""
    if not energy_j > 0:
        return math.nan
    return float(tokens) / float(energy_j)


def default_nvml_devices(env: Mapping[str, str] | None = None) -> list[int | str] | None:
    """The NVML devices this process computes on, from the launcher's environment; None means all.

    NVML numbers GPUs physically and ignores ``CUDA_VISIBLE_DEVICES``, so the process's CUDA device
    is mapped back: ``CUDA_VISIBLE_DEVICES=2,3`` with ``LOCAL_RANK=1`` is NVML device 3; with one
    visible entry that entry is the device whatever ``LOCAL_RANK`` says (launchers that bind one GPU
    per task); without ``LOCAL_RANK`` every visible entry is. Entries may be indices or UUIDs
    (``GPU-...``/``MIG-...``, returned as strings). Only ``LOCAL_RANK`` set means device ``LOCAL_RANK``.
    The mapping assumes CUDA enumerates GPUs in NVML's (PCI bus) order, true on the usual nodes of
    identical GPUs; set ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` to make it true everywhere.
    """
    env = os.environ if env is None else env
    visible = env.get("CUDA_VISIBLE_DEVICES")
    local_rank = env.get("LOCAL_RANK")
    rank = int(local_rank) if local_rank not in (None, "") else None
    if visible is not None:
        entries: list[int | str] = []
        for entry in (e.strip() for e in visible.split(",")):
            if not entry:
                continue
            if entry.lstrip("-").isdigit():
                if int(entry) < 0:  # CUDA ignores this entry and every one after it
                    break
                entries.append(int(entry))
            else:
                entries.append(entry)
        if rank is not None and rank < len(entries):
            return [entries[rank]]
        return entries
    if rank is not None:
        return [rank]
    return None


@dataclass
class _Stat:
    """Running count / sum / max of one field over a step's samples (all devices together)."""

    n: int = 0
    total: float = 0.0
    max: float = -math.inf

    def add(self, value: float) -> None:
        self.n += 1
        self.total += value
        self.max = max(self.max, value)

    @property
    def mean(self) -> float:
        return self.total / self.n


@dataclass
class _Window:
    """What the samples since the last ``step_metrics()`` add up to."""

    rounds: int = 0  # sampling rounds (each reads every device once)
    stats: dict[str, _Stat] = field(default_factory=dict)
    throttle_samples: int = 0  # device samples that reported their reasons
    throttled_samples: int = 0  # ... with any reason other than gpu_idle
    reason_counts: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, value: float) -> None:
        self.stats.setdefault(name, _Stat()).add(value)


@dataclass
class _Device:
    label: int | str
    handle: Any
    unsupported: set[str] = field(default_factory=set)  # fields whose query failed once: not asked again
    energy_base_mj: float | None = None  # counter at the start of the window
    energy_last_mj: float | None = None  # counter at the latest sample
    last_power: tuple[float, float] | None = None  # (time s, watts) of the latest sample
    power_energy_j: float = 0.0  # power integrated over the window (trapezoids between samples)


class NvmlSampler:
    """Samples utilization, memory, power, energy, temperature, SM clock and throttle reasons of
    ``devices`` (NVML indices; None: ``default_nvml_devices()``, else every GPU) every ``interval_s``
    seconds on a daemon thread.

    ``step_metrics()`` returns and resets the aggregate since its previous call (or ``start()``);
    while running it first takes one sample itself, so each step ends on a fresh reading and the
    energy of consecutive steps adds up exactly. Means and maxima are over all (device, sample)
    readings, i.e. per GPU; ``gpu/energy_j`` is summed over devices: the delta of NVML's total-energy
    counter, or, on GPUs without the counter (pre-Volta, some MIG and vGPU setups), sampled power
    integrated over time with the trapezoid rule. A field a GPU cannot report (``NVMLError`` on its
    first query) is skipped from then on.

    ``pynvml_module`` replaces ``import pynvml`` (tests pass a fake); ``clock`` (seconds, monotonic)
    too. All methods are thread-safe; ``stop()`` returns within about 2 s and calls ``nvmlShutdown``.
    A sampler runs once: ``start()`` after ``stop()`` is an error.
    """

    def __init__(
        self,
        devices: Sequence[int | str] | None = None,
        interval_s: float = 1.0,
        pynvml_module: ModuleType | Any | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not interval_s > 0:
            raise ValueError(f"NvmlSampler: interval_s must be > 0, got {interval_s}")
        self.interval_s = float(interval_s)
        self.requested_devices = list(devices) if devices is not None else None
        self._nvml = pynvml_module
        self._clock = clock
        self._lock = threading.Lock()
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None
        self._devices: list[_Device] = []
        self._initialized = False  # nvmlInit succeeded and nvmlShutdown is still owed
        self._started = False
        self._stopped = False
        self.off_reason: str | None = None
        self._window = _Window()

    # ------------------------------------------------------------------ lifecycle
    @property
    def enabled(self) -> bool:
        """True while NVML is up and at least one GPU is being sampled."""
        return self._initialized and self.off_reason is None

    def start(self) -> NvmlSampler:
        with self._lock:
            if self._stopped:
                raise RuntimeError("NvmlSampler.start(): this sampler was stopped; make a new one")
            if self._started:
                return self
            self._started = True
            if not self._init_locked():
                return self
            self._sample_locked()  # the baseline: energy counters at the start of the first step
            self._thread = threading.Thread(target=self._run, name="nvml-sampler", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling (joining the thread for at most 2 s) and shut NVML down. Idempotent."""
        self._stopped = True
        self._stop_event.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout=STOP_TIMEOUT_S)
            if thread.is_alive():
                # stuck inside an NVML call: shutting NVML down under it could crash the process
                logger.warning("NVML sampler thread did not stop within %.0f s; not calling nvmlShutdown",
                               STOP_TIMEOUT_S)
                return
        with self._lock:
            if self._initialized:
                self._initialized = False
                try:
                    self._nvml.nvmlShutdown()
                except Exception as e:  # telemetry never fails a run
                    logger.warning("nvmlShutdown failed: %s: %s", type(e).__name__, e)

    def __enter__(self) -> NvmlSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _turn_off(self, reason: str) -> None:
        if self.off_reason is None:
            self.off_reason = reason
            logger.warning("NVML telemetry off: %s", reason)

    def _init_locked(self) -> bool:
        if self._nvml is None:
            try:
                self._nvml = importlib.import_module("pynvml")
            except ImportError as e:
                self._turn_off(f"pynvml is not installed ({e}); pip install 'tempo-mega[nvml]'")
                return False
        nv = self._nvml
        try:
            nv.nvmlInit()
        except Exception as e:  # NVMLError_LibraryNotFound without a driver, DriverNotLoaded, ...
            self._turn_off(f"nvmlInit failed: {type(e).__name__}: {e}")
            return False
        self._initialized = True
        labels = self.requested_devices
        if labels is None:
            labels = default_nvml_devices()
        try:
            if labels is None:
                labels = list(range(int(nv.nvmlDeviceGetCount())))
            for label in labels:
                if isinstance(label, str):
                    handle = nv.nvmlDeviceGetHandleByUUID(label)
                else:
                    handle = nv.nvmlDeviceGetHandleByIndex(int(label))
                self._devices.append(_Device(label=label, handle=handle))
        except Exception as e:
            self._devices.clear()
            self._turn_off(f"cannot open GPU {label!r}: {type(e).__name__}: {e}")
        else:
            if not self._devices:
                self._turn_off("no GPU to sample (CUDA_VISIBLE_DEVICES is empty or NVML sees none)")
        if self.off_reason is not None:
            self._initialized = False
            try:
                nv.nvmlShutdown()
            except Exception:
                pass
            return False
        return True

    def _run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            try:
                self.sample()
            except Exception as e:  # e.g. the GPU fell off the bus: keep the run going without telemetry
                self._turn_off(f"sampling failed: {type(e).__name__}: {e}")
                return

    # ------------------------------------------------------------------ sampling
    def sample(self) -> None:
        """Read every device once into the current window (the thread calls this every interval)."""
        with self._lock:
            if self.enabled:
                self._sample_locked()

    def _query(self, dev: _Device, name: str, fn: Callable[[], Any]) -> Any:
        if name in dev.unsupported:
            return None
        try:
            return fn()
        except Exception as e:  # NVMLError_NotSupported and friends
            dev.unsupported.add(name)
            logger.info("GPU %s: NVML cannot report %s (%s: %s); skipping it", dev.label, name,
                        type(e).__name__, e)
            return None

    def _sample_locked(self) -> None:
        nv, w = self._nvml, self._window
        now = self._clock()
        w.rounds += 1
        temperature_gpu = getattr(nv, "NVML_TEMPERATURE_GPU", 0)
        clock_sm = getattr(nv, "NVML_CLOCK_SM", 1)
        reasons_fn = (getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None)
                      or getattr(nv, "nvmlDeviceGetCurrentClocksThrottleReasons", None))
        for dev in self._devices:
            h = dev.handle
            util = self._query(dev, "utilization", lambda h=h: nv.nvmlDeviceGetUtilizationRates(h).gpu)
            if util is not None:
                w.add("util", float(util))
            mem = self._query(dev, "memory", lambda h=h: nv.nvmlDeviceGetMemoryInfo(h).used)
            if mem is not None:
                w.add("mem_used_gib", mem / 2**30)
            power_mw = self._query(dev, "power", lambda h=h: nv.nvmlDeviceGetPowerUsage(h))
            if power_mw is not None:
                watts = power_mw / 1000.0
                w.add("power_w", watts)
                if dev.last_power is not None:
                    t0, w0 = dev.last_power
                    dev.power_energy_j += 0.5 * (w0 + watts) * max(now - t0, 0.0)
                dev.last_power = (now, watts)
            energy = self._query(dev, "energy", lambda h=h: nv.nvmlDeviceGetTotalEnergyConsumption(h))
            if energy is not None:
                dev.energy_last_mj = float(energy)
                if dev.energy_base_mj is None:
                    dev.energy_base_mj = float(energy)
            else:
                dev.energy_last_mj = None
            temp = self._query(dev, "temperature", lambda h=h: nv.nvmlDeviceGetTemperature(h, temperature_gpu))
            if temp is not None:
                w.add("temp_c", float(temp))
            sm_clock = self._query(dev, "sm_clock", lambda h=h: nv.nvmlDeviceGetClockInfo(h, clock_sm))
            if sm_clock is not None:
                w.add("sm_clock_mhz", float(sm_clock))
            mask = None if reasons_fn is None else self._query(dev, "throttle_reasons", lambda h=h: reasons_fn(h))
            if mask is not None:
                mask = int(mask)
                w.throttle_samples += 1
                if mask & ~GPU_IDLE:
                    w.throttled_samples += 1
                for name in throttle_reason_names(mask):
                    w.reason_counts[name] = w.reason_counts.get(name, 0) + 1

    # ------------------------------------------------------------------ per-step metrics
    def step_metrics(self) -> dict[str, float]:
        """``gpu/*`` metrics over the samples since the previous call, then reset; ``{}`` when off.

        Keys (each present when some GPU reports it): ``gpu/util_mean``, ``gpu/util_max`` (%),
        ``gpu/mem_used_gib_mean``, ``gpu/mem_used_gib_max``, ``gpu/power_w_mean``, ``gpu/power_w_max``
        (per GPU), ``gpu/temp_c_max``, ``gpu/sm_clock_mhz_mean``, ``gpu/energy_j`` (all GPUs together),
        ``gpu/throttle_frac`` (share of samples with a throttle reason other than ``gpu_idle``),
        ``gpu/throttle/<reason>_frac`` for each reason seen, ``gpu/num_devices``, ``gpu/num_samples``.
        """
        with self._lock:
            if not self._devices:
                return {}
            if self.enabled and not self._stop_event.is_set():
                self._sample_locked()
            w = self._window
            if w.rounds == 0:
                return {}
            m: dict[str, float] = {"gpu/num_devices": float(len(self._devices)),
                                   "gpu/num_samples": float(w.rounds)}
            wanted = (("util", ("mean", "max")), ("mem_used_gib", ("mean", "max")),
                      ("power_w", ("mean", "max")), ("temp_c", ("max",)), ("sm_clock_mhz", ("mean",)))
            for name, kinds in wanted:
                stat = w.stats.get(name)
                if stat is None or stat.n == 0:
                    continue
                for kind in kinds:
                    m[f"gpu/{name}_{kind}"] = stat.mean if kind == "mean" else stat.max
            energy_j, measured = 0.0, False
            for dev in self._devices:
                base, last = dev.energy_base_mj, dev.energy_last_mj
                if base is not None and last is not None and last >= base:
                    energy_j += (last - base) / 1000.0
                    measured = True
                elif dev.last_power is not None:
                    energy_j += dev.power_energy_j
                    measured = True
                dev.energy_base_mj = last
                dev.power_energy_j = 0.0
            if measured:
                m["gpu/energy_j"] = energy_j
            if w.throttle_samples:
                m["gpu/throttle_frac"] = w.throttled_samples / w.throttle_samples
                for name, count in sorted(w.reason_counts.items()):
                    m[f"gpu/throttle/{name}_frac"] = count / w.throttle_samples
            self._window = _Window()
            return m
