"""Telemetry: metric sinks (jsonl, wandb, progress bar) and per-phase wall-clock timing."""

from tempo_mega.telemetry.sinks import JsonlSink, MetricSink, MultiSink, ProgressSink, WandbSink
from tempo_mega.telemetry.timing import PhaseTimer

__all__ = ["JsonlSink", "MetricSink", "MultiSink", "PhaseTimer", "ProgressSink", "WandbSink"]
