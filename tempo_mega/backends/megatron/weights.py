"""Weights into and out of ``MegatronBackend`` (``_Weights``, a mixin: the state is the backend's): HF-named
weights loaded into this rank's chunks (each reads only its stage's names and keeps its TP slice), the
critic's trunk copied from the actor, HF-named tensors streamed from the local shards (``export_weights``,
gathered over TP and PP, and a mixture of experts' over expert TP and EP), and an HF module or directory
on one rank."""

from __future__ import annotations

import collections
import itertools
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import Tensor

from tempo_mega.backends.megatron.convert import hf_to_mcore_state_dict, layer_offset, mcore_to_hf_tensors
from tempo_mega.models.moe_names import to_module_names

log = logging.getLogger(__name__)


def _no_init_weights():
    """transformers' context that allocates a model without its random init (it moved in 5.x)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def _gather(t: Tensor, size: int, group: Any) -> list[Tensor]:
    """``t`` of every rank of ``group`` (``size`` ranks), in rank order."""
    if size == 1:
        return [t]
    shards = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(shards, t.contiguous(), group=group)
    return shards


class _Weights:
    """HF weights in and out of ``MegatronBackend``."""

    def load_hf_state_dict(self, hf_state_dict: dict[str, Tensor]) -> None:
        """Replace the weights with HF-named ones (a fresh value head when the critic's are absent)."""
        self._load_hf_into_chunks(hf_state_dict)
        self.optimizer.reload_model_params()  # the fp32 master copies follow

    def _load_hf_into_chunks(self, hf_state_dict: Mapping[str, Tensor]) -> None:
        """Each chunk reads only the names of its stage from ``hf_state_dict`` (which may read them from
        disk on access: ``hf_weights.SafetensorsWeights``) and keeps its TP slice."""
        sd: Mapping[str, Tensor] = hf_state_dict
        last = self.chunks[-1]
        if self.role == "critic" and "value_head.weight" not in sd:
            if last.post_process:
                log.info("MegatronBackend: no value_head.* in the HF weights, value head freshly initialized")
                head = {"value_head.weight": last.output_layer.weight.detach().cpu(),
                        "value_head.bias": last.output_layer.bias.detach().cpu()}
            else:  # not used on this stage, only marks the weights as a critic's
                head = {"value_head.weight": torch.zeros(1, self.hf_config.hidden_size),
                        "value_head.bias": torch.zeros(1)}
            sd = collections.ChainMap(head, sd)
        vpp = self.megatron_config.vpp
        for v, chunk in enumerate(self.chunks):
            mc = hf_to_mcore_state_dict(sd, self.hf_config, self.tp_rank, self.tp_size, pp_rank=self.pp_rank,
                                        pp_size=self.pp_size, te_layout=self.te_layout, vp_stage=v if vpp else 0,
                                        vp_size=vpp or 1, ep_rank=self.ep_rank, ep_size=self.ep_size,
                                        expert_tp=self.megatron_config.etp == self.tp_size,
                                        grouped_gemm=self.megatron_config.moe_grouped_gemm)
            missing, unexpected = chunk.load_state_dict(mc, strict=False)
            missing = [k for k in missing if not k.endswith("_extra_state")]
            if missing or unexpected:
                raise ValueError(f"MegatronBackend: HF weights do not fit the model: missing {missing}, "
                                 f"unexpected {unexpected}")

    def _local_hf_tensors(self, dtype: torch.dtype | None) -> Iterator[tuple[str, Tensor]]:
        """This PP stage's HF-named tensors, TP shards gathered (a collective over the TP group)."""
        critic = self.role == "critic"
        vpp = self.megatron_config.vpp
        for v, chunk in enumerate(self.chunks):
            offset = layer_offset(self.hf_config, self.pp_rank, self.pp_size, v if vpp else 0, vpp or 1)
            params = dict(chunk.named_parameters())
            for name, t in chunk.state_dict().items():
                if name.endswith("_extra_state"):
                    continue
                if name == "output_layer.weight" and not critic and not chunk.pre_process and \
                        chunk.share_embeddings_and_output_weights:
                    continue  # the last stage's copy of the tied embedding
                param = params.get(name)
                for hf_name, hf_t in self._hf_tensors_of(name, t.detach(), param, critic, offset):
                    # the value head goes out in float32 (as the torch backend's), the rest in ``dtype``
                    to = torch.float32 if hf_name.startswith("value_head.") else (dtype or hf_t.dtype)
                    yield hf_name, hf_t.to(dtype=to).contiguous()

    def _hf_tensors_of(self, name: str, t: Tensor, param: Any, critic: bool, offset: int) -> list[tuple[str, Tensor]]:
        """The HF tensors of one local tensor: its TP shards gathered (a collective over the TP group); an
        expert weight's (megatron marks them ``allreduce=False``) over the expert-TP group, then every EP
        rank's copy of the same local expert gathered (a collective over the EP group), each named by
        its global expert."""
        split = param is not None and getattr(param, "tensor_model_parallel", False)
        if param is None or getattr(param, "allreduce", True):  # dense (the router too: replicated)
            shards = _gather(t, self.tp_size, parallel_state.get_tensor_model_parallel_group()) if split else [t]
            return mcore_to_hf_tensors(name, shards, self.hf_config, critic=critic, layer_offset=offset)
        etp = parallel_state.get_expert_tensor_parallel_world_size()
        shards = _gather(t, etp, parallel_state.get_expert_tensor_parallel_group()) if split else [t]
        per_rank = [_gather(s, self.ep_size, parallel_state.get_expert_model_parallel_group()) for s in shards]
        out = []
        for ep_rank in range(self.ep_size):
            out += mcore_to_hf_tensors(name, [r[ep_rank] for r in per_rank], self.hf_config, critic=critic,
                                       layer_offset=offset, ep_rank=ep_rank, ep_size=self.ep_size)
        return out

    def load_trunk_from(self, other) -> None:
        """This critic's trunk := ``other``'s (the actor's, after the warm start), through HF names (a
        collective: ``other.export_weights`` gathers over TP and PP); the value head is kept."""
        self.load_hf_state_dict({n: t for n, t in other.export_weights(dtype=None) if n.startswith("model.")})

    def export_weights(self, dtype: torch.dtype | None = None,
                       device: str | torch.device | None = "cpu") -> Iterator[tuple[str, Tensor]]:
        """HF-named (name, tensor) pairs on ``device`` (None: the model's, e.g. for SGLang's CUDA-IPC sync,
        which would otherwise take every tensor through host memory and back), streamed one tensor at a
        time: TP shards gathered, PP stages broadcast to the whole pipeline (a collective: every rank must
        iterate to the end). ``dtype`` None (default) keeps the model dtype, like
        ``TorchBackend.export_weights``; pass ``torch.bfloat16`` for a bf16 inference server. The critic's
        value head stays float32. Every tensor is a copy, never a view of a live parameter."""
        device = self.device if device is None else device
        if self.pp_size == 1:
            for name, t in self._local_hf_tensors(dtype):
                yield name, t.to(device, copy=True)
            return
        group = parallel_state.get_pipeline_model_parallel_group()
        for src in range(self.pp_size):
            src_global = dist.get_global_rank(group, src)
            local = self._local_hf_tensors(dtype) if src == self.pp_rank else None
            while True:
                item = next(local, None) if local is not None else None
                meta: list[Any] = [None if item is None else (item[0], tuple(item[1].shape), item[1].dtype)]
                dist.broadcast_object_list(meta, src=src_global, group=group)
                if meta[0] is None:
                    break
                name, shape, dt = meta[0]
                t = item[1].to(self.device) if item is not None else torch.empty(shape, dtype=dt, device=self.device)
                dist.broadcast(t, src=src_global, group=group)
                yield name, t.to(device, copy=True)

    def hf_module(self, *, rank0_only: bool = False) -> torch.nn.Module | None:
        """This role as a transformers module on CPU, from ``export_weights`` (a collective): a
        ``Qwen3ForCausalLM`` for the actor, a ``ValueHeadModel`` (torch backend's critic) for the critic.

        The module is allocated without its random init and filled one exported tensor at a time, so a
        rank holds the model once (not the model plus a dict of its weights). ``rank0_only``: the other
        ranks take part in the export and return None, so that a node of 8 ranks does not hold 8 copies.
        Built under a forked RNG, so the caller's random stream does not move."""
        from transformers import AutoModel, AutoModelForCausalLM

        from tempo_mega.models.critic import ValueHeadModel

        stream = self.export_weights(dtype=None)
        if rank0_only and dist.is_initialized() and dist.get_rank() != 0:
            for _ in stream:  # the export is a collective
                pass
            return None
        ahead: list[tuple[str, Tensor]] = []  # the model dtype is the first non-value-head tensor's
        for name, t in stream:
            ahead.append((name, t))
            if not name.startswith("value_head."):
                break
        dtype = ahead[-1][1].dtype
        with torch.random.fork_rng(devices=[]), _no_init_weights():
            if self.role == "actor":
                module = AutoModelForCausalLM.from_config(self.hf_config, dtype=dtype)
            else:
                module = ValueHeadModel(AutoModel.from_config(self.hf_config, dtype=dtype), seed=self.seed)
        targets = module.state_dict(keep_vars=True)
        loaded, unexpected = set(), []
        with torch.no_grad():
            for name, t in to_module_names(itertools.chain(ahead, stream), targets):
                if name not in targets or targets[name].shape != t.shape:
                    unexpected.append(name if name not in targets else f"{name} {tuple(t.shape)}")
                    continue
                targets[name].copy_(t)
                loaded.add(name)
        tied = bool(getattr(self.hf_config, "tie_word_embeddings", False))
        missing = [k for k in targets if k not in loaded and not (tied and k == "lm_head.weight")]
        if missing or unexpected:
            raise RuntimeError(f"MegatronBackend.hf_module: exported weights do not fit the HF model: "
                               f"missing {missing}, unexpected {unexpected}")
        if tied and self.role == "actor":
            module.tie_weights()
        return module.eval()

    def export_hf(self, directory: str | Path) -> None:
        """An HF directory (safetensors), as ``TorchBackend.export_hf`` writes it:
        ``AutoModelForCausalLM.from_pretrained`` for the actor, ``ValueHeadModel.from_pretrained`` for the
        critic. A collective (shards and stages are gathered); rank 0 alone builds the module and writes."""
        module = self.hf_module(rank0_only=True)
        if module is not None:
            Path(directory).mkdir(parents=True, exist_ok=True)
            module.save_pretrained(directory)
        if dist.is_initialized():
            dist.barrier()
