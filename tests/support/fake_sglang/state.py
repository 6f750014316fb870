"""The fake server's model and weights (``_FakeState``: a real tiny causal LM, deterministic sampling, the
fault knobs) and ``FakeTensorSerializer``, the stand-in for SGLang's tensor serializer on a CPU machine."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import torch


class _FakeState:
    def __init__(
        self,
        model_path: str,
        *,
        slow_s: float = 0.0,
        crash_after_requests: int | None = None,
        crash_once_file: str | None = None,
        hang: bool = False,
        in_process: bool = True,
        abort_requests: int = 0,
        fail_updates: int = 0,
        context_length: int | None = None,
        api_key: str | None = None,
        request_fields: dict[str, list[str] | set[str] | tuple[str, ...]] | None = None,
        missing_routes: tuple[str, ...] = (),
        return_routed_experts: bool = False,
        token_latency_s: float = 0.0,
        max_running: int = 0,
    ) -> None:
        from transformers import AutoModelForCausalLM

        self.model_path = model_path
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        self.vocab_size = self.model.get_input_embeddings().num_embeddings
        self.model_lock = threading.Lock()  # weights swap vs forward
        self.stats_lock = threading.Lock()
        self.slow_s = slow_s
        self.crash_after_requests = crash_after_requests
        self.crash_once_file = crash_once_file
        self.hang = hang
        self.in_process = in_process
        self.abort_requests = abort_requests
        self.fail_updates = fail_updates
        self.api_key = api_key
        self.request_fields = {k: frozenset(v) for k, v in (request_fields or {}).items()}
        self.unknown_fields: list[str] = []  # "path: key" of each refused body key
        self.missing_routes = frozenset(missing_routes)  # answered 404, as an older SGLang has no such route
        self.return_routed_experts = return_routed_experts  # --enable-return-routed-experts
        # a latency model instead of the model's forward (benchmarks): a request takes max_new_tokens x
        # token_latency_s in one of max_running slots (0: unbounded), as a server decoding a batch of at most
        # max_running requests at a fixed time per token
        self.token_latency_s = token_latency_s
        self.slots = threading.BoundedSemaphore(max_running) if max_running > 0 else None
        self.context_length_arg = context_length  # --context-length; /server_info reports it as given
        self.context_len = context_length or int(self.model.config.max_position_embeddings)
        self.session_open = False  # a /begin_weight_update not yet ended
        self.weight_groups: dict[str, dict] = {}  # /init_weights_update_group's groups, by name (their bodies)
        self.unhang = threading.Event()
        self.abort_event = threading.Event()
        self.released: set[str] = set()  # memory tags released, as SGLang's scheduler tracks them
        self.weight_version = "default"
        self.generate_requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.counts: dict[str, int] = {}

    # ------------------------------------------------------------------ model
    @torch.inference_mode()
    def _logprobs_all(self, ids: list[int], temperature: float) -> torch.Tensor:
        """[L, V] float32: log_softmax(logits / temperature) after each prefix."""
        with self.model_lock:
            logits = self.model(input_ids=torch.tensor([ids])).logits[0].float()
        return torch.log_softmax(logits / temperature, dim=-1)

    @torch.inference_mode()
    def routed_experts(self, seq: list[int]) -> str:
        """SGLang's ``meta_info["routed_experts"]``: base64 of int32 [len(seq) - 1, layers, top-k], the
        experts of every token the server ran (all but the last), from the model's router logits."""
        import base64

        with self.model_lock:
            out = self.model.model(input_ids=torch.tensor([seq[:-1]]), output_router_logits=True)
        k = self.model.config.num_experts_per_tok
        ids = torch.stack([x.topk(k, dim=-1).indices for x in out.router_logits], dim=1).to(torch.int32)
        return base64.b64encode(ids.contiguous().numpy().tobytes()).decode("ascii")

    def timed_one(self, ids: list[int], sp: dict, j: int) -> dict:
        """One sample of the latency model: ``max_new_tokens`` tokens drawn from (prompt ids, j), each of
        log-prob -log(vocab), finished by length (the caller waits the time)."""
        import math

        max_new = int(sp.get("max_new_tokens", 128))
        digest = hashlib.sha256(json.dumps([ids, j]).encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
        out_ids = torch.randint(0, self.vocab_size, (max_new,), generator=gen).tolist()
        lp = -math.log(self.vocab_size)
        return {"meta_info": {"id": "", "finish_reason": {"type": "length", "length": max_new},
                              "prompt_tokens": len(ids), "completion_tokens": max_new, "cached_tokens": 0,
                              "weight_version": self.weight_version,
                              "output_token_logprobs": [[lp, t, None] for t in out_ids]}}

    def generate_one(
        self, ids: list[int], sp: dict, j: int, return_logprob: bool, logprob_start_len: int,
        return_routed_experts: bool = False,
    ) -> dict:
        from tempo_mega.rollout.base import SamplingParams
        from tempo_mega.rollout.hf import sample_from_logits

        temperature = float(sp.get("temperature", 1.0))
        max_new = int(sp.get("max_new_tokens", 128))
        stop_ids = set(sp.get("stop_token_ids") or [])
        sampling = SamplingParams(
            temperature=max(temperature, 1e-5),
            top_p=float(sp.get("top_p", 1.0)),
            top_k=int(sp.get("top_k", -1)),
        )
        digest = hashlib.sha256(json.dumps([ids, j, sp.get("sampling_seed")]).encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
        seq = list(ids)
        out_ids: list[int] = []
        out_lps: list[float] = []
        finish = {"type": "length", "length": max_new}
        for _ in range(max_new):
            if self.abort_event.is_set():
                finish = {"type": "abort", "message": "Abort in waiting queue", "status_code": 200}
                break
            with torch.inference_mode(), self.model_lock:
                logits = self.model(input_ids=torch.tensor([seq])).logits[:, -1].float()
            u = torch.rand(1, generator=gen, dtype=torch.float64)
            tok, lp = sample_from_logits(logits, sampling, u)
            t = int(tok[0])
            seq.append(t)
            out_ids.append(t)
            out_lps.append(float(lp[0]))
            if t in stop_ids:
                finish = {"type": "stop", "matched": t}
                break
        meta: dict = {
            "id": "",
            "finish_reason": finish,
            "prompt_tokens": len(ids),
            "completion_tokens": len(out_ids),
            "cached_tokens": 0,
            "weight_version": self.weight_version,
        }
        if return_logprob:
            meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(out_lps, out_ids)]
            start = max(logprob_start_len, 0) if logprob_start_len != -1 else len(ids)
            if start < len(ids):
                full = self._logprobs_all(ids, 1.0)
                entries = []
                for pos in range(start, len(ids)):
                    lp = None if pos == 0 else float(full[pos - 1, ids[pos]])
                    entries.append([lp, ids[pos], None])
                meta["input_token_logprobs"] = entries
            else:
                meta["input_token_logprobs"] = []
        if return_routed_experts:
            meta["routed_experts"] = self.routed_experts(seq)
        return {"text": "", "output_ids": out_ids, "meta_info": meta}

    def load_from_disk(self, model_path: str) -> None:
        from safetensors.torch import load_file

        files = sorted(Path(model_path).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {model_path}")
        self.load_tensors([item for f in files for item in load_file(str(f)).items()])
        self.model_path = model_path

    def load_tensors(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        """Replace the named weights (all checked before any is written)."""
        targets = self.model.state_dict()
        for name, t in named_tensors:
            if name not in targets:
                raise ValueError(f"unknown tensor {name!r}")
            if tuple(t.shape) != tuple(targets[name].shape):
                raise ValueError(
                    f"tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(targets[name].shape)}"
                )
        with self.model_lock, torch.no_grad():
            for name, t in named_tensors:
                targets[name].copy_(t.to(targets[name].dtype))


class FakeTensorSerializer:
    """Stands in for ``sglang.srt.utils.MultiprocessingSerializer`` on a machine without SGLang: the same
    ``serialize(obj, output_str=...)`` / ``deserialize(data)`` calls, with the tensors' bytes in the payload
    (SGLang's own passes CUDA IPC handles, which only a GPU has). ``install_fake_serializer`` puts it where
    the client imports it from, so the fake server's ``/update_weights_from_tensor`` can be exercised."""

    @staticmethod
    def serialize(obj, output_str: bool = False):
        import base64
        import io

        buf = io.BytesIO()
        torch.save(obj, buf)
        return base64.b64encode(buf.getvalue()).decode() if output_str else buf.getvalue()

    @staticmethod
    def deserialize(data):
        import base64
        import io

        raw = base64.b64decode(data) if isinstance(data, str) else data
        return torch.load(io.BytesIO(raw), weights_only=True)


_FAKE_MODULES = ("sglang", "sglang.srt", "sglang.srt.utils")


def install_fake_serializer() -> list[str]:
    """Make ``from sglang.srt.utils import MultiprocessingSerializer`` give ``FakeTensorSerializer`` in this
    process (only where SGLang itself is not installed: tests of the tensor sync path on CPU). Returns the
    ``sys.modules`` names it added (``uninstall_fake_serializer`` removes them)."""
    import importlib.util
    import sys
    import types

    if "sglang" not in sys.modules and importlib.util.find_spec("sglang") is not None:
        raise RuntimeError("install_fake_serializer: sglang is installed here; test against it instead")
    added = [name for name in _FAKE_MODULES if name not in sys.modules]
    for name in added:
        sys.modules[name] = types.ModuleType(name)
    sys.modules["sglang.srt.utils"].MultiprocessingSerializer = FakeTensorSerializer
    return added


def uninstall_fake_serializer(added: list[str]) -> None:
    import sys

    for name in added:
        sys.modules.pop(name, None)
