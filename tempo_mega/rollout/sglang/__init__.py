"""The RolloutEngine over SGLang, in parts:

- ``config``: ``SGLangConfig`` (what ``rollout.sglang.*`` may say), ``MEMORY_TAGS``, ``sync_device``;
  standard library only, read by the run's config before any engine is built.
- ``transport``: JSON over HTTP with the job's API key, daemon request threads, the error types.
- ``handles``: one server behind one interface, HTTP (``_Server``) or in-process ``sglang.Engine``
  (``_InProcessServer``): SGLang's routes, server info, abort, stop, and the state kept per server.
- ``servers``: the hang watchdog, launch / connect / restart, memory release.
- ``weight_push``: one class per transport of the weights (disk, tensor, NCCL broadcast).
- ``weights``: weight sync through the transport, its sessions and failures, the re-push to servers
  that came back, the log-probs of the post-sync probe.
- ``engine``: ``SGLangRolloutEngine`` (generation, routing, retries, abort) and ``build_sglang_engine``.

The names below load on first use, so that ``tempo_mega.rollout.sglang.config`` imports without torch.
"""

from __future__ import annotations

from tempo_mega._lazy import lazy_getattr

_NAMES = {
    "MEMORY_TAGS": "config", "SGLangConfig": "config", "sync_device": "config",
    "SGLangServerError": "transport",
    "redact_command": "servers", "server_process_kwargs": "servers",
    "bucket_named_tensors": "weight_push",
    "SGLangRolloutEngine": "engine", "build_sglang_engine": "engine",
}
__all__ = sorted(_NAMES)

__getattr__ = lazy_getattr(__name__, _NAMES)
