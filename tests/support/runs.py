"""What a run wrote: its ``metrics.jsonl`` lines."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(out: str | Path) -> list[dict]:
    """Every line of ``<out>/metrics.jsonl``, parsed, in order."""
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
