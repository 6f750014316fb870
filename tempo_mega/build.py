"""The parts of a run, built from its config: device, actor and critic (keyed by ``backend``) and the
rollout engine (keyed by ``rollout.engine`` and ``backend``)."""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path

import torch

from tempo_mega.backends.base import OptimConfig as BackendOptim
from tempo_mega.backends.base import TrainBackend
from tempo_mega.backends.torch import build_actor, build_critic
from tempo_mega.config import TrainConfig, sglang_config
from tempo_mega.models import fresh_qwen3_config
from tempo_mega.rollout.hf import HFRolloutEngine
from tempo_mega.rollout.rank_zero import NodeGroupSGLang, RankZeroRollout, RankZeroSGLang

log = logging.getLogger("tempo_mega")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------------- models
def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.trainer.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.trainer.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("config key 'trainer.device': cuda requested but no CUDA device is available")
    return torch.device(cfg.trainer.device)


def kernels_enabled(cfg: TrainConfig, device: torch.device) -> bool:
    """kernels.enable: auto = on where CUDA and Triton are present. Says once which path runs."""
    from tempo_mega.kernels import triton_available

    choice = str(cfg.kernels.enable).lower()
    on = device.type == "cuda" and triton_available() if choice == "auto" else choice == "true"
    if on:
        impl = "Triton" if device.type == "cuda" and triton_available() else "chunked torch (no Triton on this device)"
        # backend=megatron keeps its vocab-parallel log-probs; the value head and the losses are the kernels'
        log.warning("kernels: fused value head and packed GSPO / value losses on (and the fused log-prob on "
                    "backend=torch), %s implementation", impl)
    else:
        log.info("kernels: off (kernels.enable=%s, device %s): plain torch heads and losses", choice, device.type)
    return on


def build_models(cfg: TrainConfig, tokenizer, device: torch.device) -> tuple[TrainBackend, TrainBackend]:
    """(actor, critic) for ``cfg.backend``, from model.path or a fresh Qwen3 config (seeded by trainer.seed)."""
    m, a = cfg.model, cfg.algo
    rows = a.mini_batch_prompts * a.num_samples_per_prompt
    optim = {role: BackendOptim(lr=o.lr, weight_decay=o.weight_decay, grad_clip=o.grad_clip, mini_batch_size=rows,
                                max_tokens_per_micro_batch=o.max_tokens_per_micro_batch, epochs=o.epochs)
             for role, o in (("actor", a.actor), ("critic", a.critic))}
    if m.path is not None:
        if not Path(m.path).is_dir():
            raise FileNotFoundError(f"config key 'model.path': no directory {m.path}")
        source = m.path
    else:
        torch.manual_seed(cfg.trainer.seed)
        source = fresh_qwen3_config(m, tokenizer)
    return MODEL_BUILDERS[cfg.backend](cfg, source, optim, use_kernels=kernels_enabled(cfg, device), device=device)


def build_torch_models(cfg: TrainConfig, source, optim: dict[str, BackendOptim], *, use_kernels: bool,
                       device: torch.device) -> tuple[TrainBackend, TrainBackend]:
    """backend=torch: one process, one device; the critic's trunk a copy of the actor's unless
    model.critic_path names its own."""
    m = cfg.model
    common = dict(device=device, layout=cfg.trainer.layout, gradient_checkpointing=m.gradient_checkpointing,
                  seed=cfg.trainer.seed, use_kernels=use_kernels)
    actor = build_actor(source, optim["actor"], dtype=DTYPES[m.dtype], temperature=cfg.rollout.temperature, **common)
    if m.critic_path is not None:
        critic = build_critic(m.critic_path, optim["critic"], dtype=DTYPES[m.dtype], **common)
    else:
        critic = build_critic(actor, optim["critic"], **common)
    return actor, critic


def build_megatron_models(cfg: TrainConfig, source, optim: dict[str, BackendOptim], *, use_kernels: bool = False,
                          device: torch.device | None = None) -> tuple[TrainBackend, TrainBackend]:
    """backend=megatron: actor and critic as ``MegatronBackend``s, started from the same HF weights the
    torch backend would use (``source``: a checkpoint dir, whose tensors each rank reads on demand for its
    own stage, or a fresh Qwen3 config, built from trainer.seed). torch.distributed and megatron's
    parallel state come up through the backend's own ``init_parallel`` where they are not up yet (world
    size from the torchrun environment, else 1; gloo on CPU, nccl on CUDA)."""
    import torch.distributed as dist

    from tempo_mega.backends.megatron.backend import MegatronBackend
    from tempo_mega.backends.megatron.model import init_parallel
    from tempo_mega.config import megatron_config
    from tempo_mega.models.critic import ValueHeadModel, load_causal_lm

    m, seed = cfg.model, cfg.trainer.seed
    mc = megatron_config(cfg)
    if isinstance(source, (str, Path)):
        # a checkpoint: each rank reads the tensors of its own stage from the safetensors files, on demand
        from transformers import AutoConfig

        from tempo_mega.backends.megatron.hf_weights import SafetensorsWeights, critic_weights

        hf_config = AutoConfig.from_pretrained(source)
        actor_sd = SafetensorsWeights(source, dtype=DTYPES[m.dtype])
        critic_sd = critic_weights(actor_sd, m.critic_path, hidden_size=hf_config.hidden_size, seed=seed,
                                   dtype=DTYPES[m.dtype])
    else:
        # a fresh config: the HF models exactly as the torch backend builds them (same init, same RNG use)
        hf_actor = load_causal_lm(source, DTYPES[m.dtype], "sdpa", seed)
        if m.critic_path is not None:
            hf_critic = ValueHeadModel.from_pretrained(m.critic_path, dtype=DTYPES[m.dtype], seed=seed)
        else:
            hf_critic = ValueHeadModel.from_actor(hf_actor, seed=seed)
        hf_config, actor_sd, critic_sd = hf_actor.config, hf_actor.state_dict(), hf_critic.state_dict()
    init_parallel(mc, seed=seed)
    try:
        mc.validate_for(num_attention_heads=hf_config.num_attention_heads,
                        num_key_value_heads=hf_config.num_key_value_heads,
                        num_layers=hf_config.num_hidden_layers, vocab_size=hf_config.vocab_size,
                        world_size=dist.get_world_size())
    except ValueError as e:
        raise ValueError(f"config key 'megatron': {e}") from None
    # no trainer.layout here: MegatronBackend packs every micro-batch (padded and packed give the same numbers)
    # use_kernels on both roles: the controller routes the GSPO and value losses through the packed kernels
    # by it (the actor's log-probs stay megatron's vocab-parallel ones, which no kernel here replaces)
    actor = MegatronBackend("actor", hf_config, mc, optim["actor"], hf_state_dict=actor_sd,
                            temperature=cfg.rollout.temperature, seed=seed, use_kernels=use_kernels,
                            routing_replay=cfg.algo.routing_replay != "none")
    critic = MegatronBackend("critic", hf_config, mc, optim["critic"], hf_state_dict=critic_sd,
                             seed=seed, use_kernels=use_kernels)
    log.info("backend=megatron: TP %d, PP %d (virtual %s), DP %d, params %s, distributed optimizer %s",
             actor.tp_size, actor.pp_size, mc.vpp or 1, actor.dp_size, mc.params_dtype, mc.use_distributed_optimizer)
    return actor, critic


def build_rollout(cfg: TrainConfig, actor: TrainBackend, pad_token_id: int, device: torch.device):
    """The sampler for ``rollout.engine`` on ``backend``: the HF engine (a copy of the actor) or SGLang
    (rollout.sglang.*, serving model.path until the controller's first ``sync_weights``). backend=megatron
    wraps either in ``RankZeroRollout`` (rank 0 samples for every rank), or launched SGLang servers in
    ``NodeGroupSGLang`` (every node's first rank owns its node's servers). Engines are given no model or
    closure of the trainer's: the controller pushes weights and runs the probe."""
    key = (cfg.rollout.engine, cfg.backend)
    if key not in ROLLOUT_BUILDERS:
        raise ValueError(f"config keys 'rollout.engine' / 'backend': no rollout engine {key[0]!r} for backend "
                         f"{key[1]!r} (known: {sorted(ROLLOUT_BUILDERS)})")
    return ROLLOUT_BUILDERS[key](cfg, actor, pad_token_id, device)


def _hf_on_torch(cfg: TrainConfig, actor: TrainBackend, pad_token_id: int, device: torch.device):
    return HFRolloutEngine(copy.deepcopy(actor.model), pad_token_id=pad_token_id, device=device,
                           max_batch_size=cfg.rollout.max_batch_size)


def _hf_on_megatron(cfg: TrainConfig, actor: TrainBackend, pad_token_id: int, device: torch.device):
    # an HF model from the actor's HF-named weights (hf_module is a collective), held and sampled from by
    # rank 0 alone
    model = actor.hf_module(rank0_only=True)
    return RankZeroRollout(lambda: HFRolloutEngine(model, pad_token_id=pad_token_id, device=device,
                                                   max_batch_size=cfg.rollout.max_batch_size),
                           weights_device=device)


def _sglang_config(cfg: TrainConfig, actor: TrainBackend):
    sg = sglang_config(cfg)
    if cfg.algo.routing_replay != "none":  # the servers must be able to return every token's experts
        sg = dataclasses.replace(sg, return_routed_experts=True)
    if cfg.trainer.offload_during_rollout != "none":  # the KV cache comes back after the trainer's hand-over
        sg = dataclasses.replace(sg, resume_after_push=False)
    if cfg.rollout.placement == "separate" or cfg.rollout.async_steps:
        # servers on GPUs of their own keep their memory: releasing it between rollouts frees nothing the
        # trainer could use (and one-step-off samples while the trainer trains)
        sg = dataclasses.replace(sg, release_during_training=False)
    # server logs under the run's output dir; the response budget checked against the servers' context;
    # a mixture of experts' shape, to read the routed experts of its responses
    hf = getattr(actor, "hf_config", None) or getattr(getattr(actor, "model", None), "config", None)
    moe = (hf.num_hidden_layers, hf.num_experts_per_tok, hf.num_experts) if getattr(hf, "num_experts", None) else None
    where = {"log_dir": Path(cfg.trainer.output_dir) / "sglang_logs",
             "max_response_tokens": cfg.rollout.max_response_tokens, "moe_shape": moe}
    return sg, where


def _sglang_on_torch(cfg: TrainConfig, actor: TrainBackend, pad_token_id: int, device: torch.device):
    from tempo_mega.rollout.sglang import build_sglang_engine

    sg, where = _sglang_config(cfg, actor)
    return build_sglang_engine(sg, pad_token_id=pad_token_id, **where)


def _sglang_on_megatron(cfg: TrainConfig, actor: TrainBackend, pad_token_id: int, device: torch.device):
    # servers launched here: on every node by its first rank (rollout.sglang.launch_on=every_node), or by
    # rank 0 alone; servers given by URL and the in-process engine are driven from rank 0
    sg, where = _sglang_config(cfg, actor)
    if sg.launch_on == "every_node" and not sg.urls and sg.mode == "server":
        return NodeGroupSGLang(sg, pad_token_id=pad_token_id, weights_dtype=DTYPES[cfg.model.dtype], **where)
    return RankZeroSGLang(sg, pad_token_id=pad_token_id, weights_dtype=DTYPES[cfg.model.dtype], **where)


# the builders, keyed by name: backend, and (rollout.engine, backend)
MODEL_BUILDERS = {"torch": build_torch_models, "megatron": build_megatron_models}
ROLLOUT_BUILDERS = {("hf", "torch"): _hf_on_torch, ("hf", "megatron"): _hf_on_megatron,
                    ("sglang", "torch"): _sglang_on_torch, ("sglang", "megatron"): _sglang_on_megatron}
