"""Typed run configuration: one frozen dataclass per part, validated before any model is built.

Hydra composes the YAML groups in ``configs/`` (model, algo, rollout, data, trainer, experiment);
``load_config`` merges the result onto these dataclasses, so an unknown key or a value of the wrong
type is rejected with the key's full name, and ``validate`` rejects impossible values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from tempo_mega.algo.recipes import MODES, RECIPES, recipe
from tempo_mega.backends.megatron.config import MegatronConfig
from tempo_mega.rollout.sglang.config import SGLangConfig


@dataclass(frozen=True)
class ModelConfig:
    # A local HF checkpoint dir (safetensors). None builds a fresh Qwen3 of the shape below.
    path: str | None = None
    # Critic checkpoint (a dir saved by the critic's save_pretrained); None = copy of the actor's trunk.
    critic_path: str | None = None
    # Tokenizer dir; None = model.path, or the built-in synthetic tokenizer when model.path is None.
    tokenizer_path: str | None = None
    hidden_size: int = 64
    intermediate_size: int = 192
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    dtype: str = "float32"  # parameter dtype: float32 | bfloat16
    gradient_checkpointing: bool = False
    # mixture of experts (a fresh Qwen3-MoE; a checkpoint's own config says it): num_experts > 0 makes
    # every layer's MLP num_experts experts of moe_intermediate_size, num_experts_per_tok of them per token
    # (renormalised over the top k when norm_topk_prob), no shared expert, as Qwen3-30B-A3B / 235B-A22B
    num_experts: int = 0
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    norm_topk_prob: bool = True


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-6  # 0 freezes the model (no update; the loss is still computed for metrics)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_tokens_per_micro_batch: int = 16384
    epochs: int = 1


@dataclass(frozen=True)
class AlgoConfig:
    mode: str = "tempo"  # tempo | rlvr | ttrl | empo | supervised_continuation
    num_samples_per_prompt: int = 8
    # One step's train batch = labeled + unlabeled prompts (after the group filter).
    labeled_prompts_per_step: int = 128
    unlabeled_prompts_per_step: int = 128
    mini_batch_prompts: int = 64  # prompts per optimizer step (x num_samples_per_prompt rows)
    clip_low: float = 3e-4  # GSPO
    clip_high: float = 5e-4
    ppo_clip_low: float = 0.2  # Stage-1 PPO
    ppo_clip_high: float = 0.28
    clip_range_value: float = 0.1
    e_step_every: int = 1  # 1 = every step (released code), k > 1 periodic, 0 = frozen critic
    filter_groups: bool = True
    max_gen_batches: int = 10
    score_positive: float = 1.0  # critic targets: +-1 by default (the paper writes {0, 1})
    score_negative: float = -1.0
    lenient_grading: bool = False  # reproduce the published lenient grader (inflates scores)
    # math-verify grading and TTRL/EMPO clustering processes per trainer process; 0 = this node's cores
    # over its trainer processes (LOCAL_WORLD_SIZE), at most 8. 1 = in this process, one by one.
    grading_workers: int = 0
    adv_eps: float = 1e-8
    # Truncated importance sampling for the sampler/trainer mismatch (SGLang kernels, bf16): each token's
    # policy loss is weighted by min(exp(old_logp - rollout_logp), tis_cap). 0 = off.
    tis_cap: float = 0.0
    # A mixture of experts (backend=megatron): "r3" replays the experts the sampler routed each token to
    # when the actor recomputes log-probs and trains (rollout routing replay), so the routing mismatch of
    # sampler and trainer does not enter the ratio; the engine returns them (SGLang: its server runs with
    # --enable-return-routed-experts). "none": the trainer routes on its own.
    routing_replay: str = "none"
    actor: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6, weight_decay=0.0))
    critic: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6, weight_decay=0.01))


@dataclass(frozen=True)
class RolloutConfig:
    engine: str = "hf"  # hf | sglang
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_response_tokens: int = 16384
    max_batch_size: int = 64
    # one-step-off asynchronous steps: 1 = the rollout of step t+1 (its first generation round) runs while
    # step t trains, with the weights step t started from; the staleness is corrected by truncated
    # importance sampling (algo.tis_cap). Needs a sampler off the trainer's GPUs (rollout.sglang.urls:
    # separate placement; the HF engine is allowed for CPU runs). 0 = every step waits for its own rollout.
    async_steps: int = 0
    # where SGLang runs: colocated (on the training GPUs, launched by the trainer: rollout.sglang.launch_on)
    # or separate (on rollout_nodes nodes of their own at the end of the allocation; tempo-mega launch slurm
    # starts them and hands the run their URLs, rollout.sglang.urls)
    placement: str = "colocated"
    rollout_nodes: int = 0
    # rollout.engine=sglang: the SGLang engine (mode, urls, model_path, tp_size, mem_fraction_static,
    # weight_sync, bucket_bytes, probe, ...), typed and checked with the rest; a launch's model_path is
    # checked when the engine is built (sglang_config)
    sglang: SGLangConfig = field(default_factory=SGLangConfig)


@dataclass(frozen=True)
class DataConfig:
    source: str = "auto"  # auto (files when any are given, else synthetic) | synthetic | files
    train_files: list[str] = field(default_factory=list)  # labeled (jsonl, parquet, datasets dir)
    test_files: list[str] = field(default_factory=list)  # unlabeled; answers kept for evaluation only
    field_map: str = "default"  # default | dapo_math | aime | synthetic: where a row keeps prompt and answer
    test_field_map: str | None = None  # for test_files when their schema differs (e.g. aime); None = field_map
    prompt_key: str | None = None  # override the field map's prompt path
    answer_key: str | None = None
    synthetic_num_train: int = 2000
    synthetic_num_test: int = 64
    synthetic_seed: int = 1234
    synthetic_difficulty: str = "easy"  # small | easy | medium | hard (operand ranges, see data/synthetic.py)
    # arith (one mix for both splits, data/synthetic.py) | shift (labeled and unlabeled splits from
    # different mixes, a precedence trap; data/synthetic_shift.py; synthetic_difficulty does not apply)
    synthetic_task: str = "arith"
    max_prompt_tokens: int = 2048

    @property
    def uses_files(self) -> bool:
        return self.source == "files" or (self.source == "auto" and bool(self.train_files or self.test_files))


@dataclass(frozen=True)
class TrainerConfig:
    total_steps: int = 10
    seed: int = 0
    output_dir: str = "runs/default"
    # What to do with a run already in output_dir (its checkpoints/, metrics.jsonl, hf/, config.json):
    # auto = continue from its last complete checkpoint, or start fresh when there is none (what a SLURM
    # requeue needs); true = continue, an error when there is nothing to continue; false = a fresh run,
    # an error when the folder holds a run unless overwrite=true, which removes that run first.
    resume: str = "auto"
    overwrite: bool = False
    device: str = "auto"  # auto | cpu | cuda
    layout: str = "padded"  # padded | packed
    save_every: int = 1
    keep_last: int = 2
    eval_every: int = 0  # 0 = only before the first and after the last step
    eval_num_samples: int = 8
    eval_max_prompts: int = 64
    eval_temperature: float = 1.0
    loggers: list[str] = field(default_factory=lambda: ["jsonl", "progress"])  # jsonl | progress | wandb
    wandb_project: str = "tempo-mega"
    wandb_mode: str = "offline"
    # Supervised warm start (cross-entropy on reference solutions) before the first RL step; the
    # synthetic task needs it so that a randomly initialised model can produce boxed answers at all.
    gpu_peak: str = "h100_sxm_bf16"  # peak FLOP/s for MFU (a key of telemetry.flops.PEAK_FLOPS); CUDA runs only
    warm_start_steps: int = 0
    warm_start_lr: float = 3e-3
    warm_start_batch_size: int = 32
    # After SIGTERM / SIGUSR1 the run finishes its step, checkpoints and exits; if that takes longer than
    # this (a hung collective or write), or a second signal comes, it exits at once (code 128 + signal)
    preempt_grace_s: float = 600.0
    # retain: malloc keeps the step's large host buffers for the next step (no page faults per step; the
    # RSS stays at its peak, tempo_mega/hostmem.py); system: malloc as the C library sets it
    host_memory: str = "retain"
    # while the rollout engine generates, the trainer's GPU memory is the engine's: none | optimizer (Adam
    # moments and fp32 master weights to host memory) | all (also the weights; the gradient buffers are
    # freed). tempo_mega/offload.py; colocated SGLang then takes its KV cache back after the hand-over
    offload_during_rollout: str = "none"


@dataclass(frozen=True)
class ProfileConfig:
    steps: list[int] = field(default_factory=list)  # 0-based step indices: a torch profiler Chrome trace each
    dir: str | None = None  # default <trainer.output_dir>/profile


@dataclass(frozen=True)
class KernelsConfig:
    # auto: the Triton kernels where CUDA and Triton are present; true: always the fused paths (Triton on
    # CUDA, their chunked torch versions elsewhere); false: plain torch heads and losses.
    enable: str = "auto"


@dataclass(frozen=True)
class PrecisionConfig:
    # FP8 GEMMs through Transformer Engine (backend=megatron): none | e4m3 | hybrid, with one of the
    # recipes TE offers (delayed, tensorwise, blockwise, mxfp8). Weights stay bf16 with fp32 masters; the
    # rollout engine always gets bf16 weights. Sets megatron.fp8 / megatron.fp8_recipe.
    fp8: str = "none"
    fp8_recipe: str = "delayed"


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    backend: str = "torch"  # train backend of actor and critic: torch (one process) | megatron (TP/PP/DP)
    # backend=megatron: the parallel layout and numerics (tensor_parallel_size, pipeline_parallel_size,
    # params_dtype, ...); params_dtype null (the default) follows model.dtype, see megatron_config
    megatron: MegatronConfig = field(default_factory=MegatronConfig)
    experiment: str | None = None  # name of the experiment preset that was applied, for the record


BACKENDS = ("torch", "megatron")
ROUTING_REPLAY = ("none", "r3")
RESUME = ("auto", "true", "false")
# Which prompts each mode trains on is its recipe's (algo/recipes.py); the other count is derived as 0
# (see derive_prompt_split). tempo uses both, also with a frozen critic (algo.e_step_every=0): its M-step
# trains the actor on the labeled rows (verified rewards) as well as the unlabeled ones.


def megatron_config(cfg: TrainConfig) -> MegatronConfig:
    """``cfg.megatron`` as the backend takes it: ``params_dtype`` null follows ``model.dtype``, and FP8
    comes from ``precision.*`` (``megatron.fp8*`` may only agree with it). Raises ValueError naming the
    key (``megatron.<key>``)."""
    mc, p = cfg.megatron.resolved(cfg.model.dtype), cfg.precision
    changes: dict[str, Any] = {}
    if p.fp8 != "none":  # precision.* is the user-facing key; megatron.fp8* may only agree with it
        defaults = MegatronConfig()
        for key in ("fp8", "fp8_recipe"):
            mine = getattr(mc, key)
            _check(mine in (getattr(defaults, key), getattr(p, key)), f"megatron.{key}",
                   f"{mine!r} disagrees with precision.{key}={getattr(p, key)!r}; set one of them")
            changes[key] = getattr(p, key)
    try:
        return dataclasses.replace(mc, **changes)
    except ValueError as e:
        raise ValueError(f"config key '{field_of(str(e), 'megatron')}': {e}") from None


def sglang_config(cfg: TrainConfig) -> SGLangConfig:
    """``cfg.rollout.sglang``, checked for what a launch needs too (a ``model_path`` or ``urls``): what the
    engine is built from. Raises ValueError naming the key (``rollout.sglang.<key>``)."""
    sg = cfg.rollout.sglang
    if cfg.rollout.placement == "separate" and not sg.urls:
        raise ValueError("config key 'rollout.sglang.urls': rollout.placement=separate runs the SGLang servers on "
                         "nodes of their own, started outside the trainer: give their URLs (tempo-mega launch slurm "
                         "starts them and passes rollout.sglang.urls)")
    try:
        sg.check_launchable()
    except ValueError as e:
        raise ValueError(f"config key '{field_of(str(e), 'rollout.sglang')}': {e}") from None
    return sg


def field_of(message: str, prefix: str) -> str:
    """The dotted key an engine config's error names (``megatron.tensor_parallel_size must ...``,
    ``rollout.sglang.mode: ...``): the first ``prefix.<field>`` in ``message``, else ``prefix``."""
    import re

    keys = re.findall(re.escape(prefix) + r"\.\w+", message)
    return keys[0] if keys else prefix


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ValueError(f"config key '{key}': {msg}")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Reject impossible values, naming the key. Runs before any model or engine is built."""
    a, r, d, t, m = cfg.algo, cfg.rollout, cfg.data, cfg.trainer, cfg.model
    _check(a.mode in MODES, "algo.mode", f"must be one of {MODES}, got {a.mode!r}")
    rec = recipe(a.mode)
    _check(a.num_samples_per_prompt >= 1, "algo.num_samples_per_prompt", f"must be >= 1, got {a.num_samples_per_prompt}")
    _check(a.labeled_prompts_per_step >= 0, "algo.labeled_prompts_per_step", "must be >= 0")
    _check(a.unlabeled_prompts_per_step >= 0, "algo.unlabeled_prompts_per_step", "must be >= 0")
    total = a.labeled_prompts_per_step + a.unlabeled_prompts_per_step
    _check(total >= 1, "algo.labeled_prompts_per_step", "labeled + unlabeled prompts per step must be >= 1")
    if not rec.unlabeled_prompts:
        _check(a.labeled_prompts_per_step >= 1, "algo.labeled_prompts_per_step", f"mode {a.mode} trains on labeled prompts: must be >= 1")
        _check(a.unlabeled_prompts_per_step == 0, "algo.unlabeled_prompts_per_step",
               f"{a.unlabeled_prompts_per_step} contradicts algo.mode={a.mode}, which uses labeled prompts only "
               "(leave algo.unlabeled_prompts_per_step unset: the mode makes it 0)")
    if not rec.labeled_prompts:
        _check(a.unlabeled_prompts_per_step >= 1, "algo.unlabeled_prompts_per_step", f"mode {a.mode} trains on unlabeled prompts: must be >= 1")
        _check(a.labeled_prompts_per_step == 0, "algo.labeled_prompts_per_step",
               f"{a.labeled_prompts_per_step} contradicts algo.mode={a.mode}, which uses unlabeled prompts only "
               "(leave algo.labeled_prompts_per_step unset: the mode makes it 0)")
    if rec.needs_unlabeled:
        _check(a.unlabeled_prompts_per_step >= 1, "algo.unlabeled_prompts_per_step",
               f"mode {a.mode} needs unlabeled prompts: must be >= 1")
    _check(a.mini_batch_prompts >= 1, "algo.mini_batch_prompts", f"must be >= 1, got {a.mini_batch_prompts}")
    _check(0 <= a.clip_low < 1, "algo.clip_low", f"must be in [0, 1), got {a.clip_low}")
    _check(a.clip_high >= 0, "algo.clip_high", f"must be >= 0, got {a.clip_high}")
    _check(0 <= a.ppo_clip_low < 1, "algo.ppo_clip_low", f"must be in [0, 1), got {a.ppo_clip_low}")
    _check(a.ppo_clip_high >= 0, "algo.ppo_clip_high", f"must be >= 0, got {a.ppo_clip_high}")
    _check(a.clip_range_value > 0, "algo.clip_range_value", f"must be > 0, got {a.clip_range_value}")
    _check(a.e_step_every >= 0, "algo.e_step_every", f"must be >= 0 (0 = frozen critic), got {a.e_step_every}")
    _check(a.routing_replay in ROUTING_REPLAY, "algo.routing_replay",
           f"must be one of {ROUTING_REPLAY}, got {a.routing_replay!r}")
    if a.routing_replay != "none":
        _check(cfg.backend == "megatron", "algo.routing_replay",
               f"routing replay runs in the megatron backend's routers; got backend={cfg.backend}")
        _check(cfg.model.path is not None or cfg.model.num_experts > 0, "algo.routing_replay",
               "replays a mixture of experts' routing; model.num_experts is 0 (a dense model)")
    _check(a.grading_workers >= 0, "algo.grading_workers", f"must be >= 0 (0 = auto), got {a.grading_workers}")
    _check(a.max_gen_batches >= 1, "algo.max_gen_batches", f"must be >= 1, got {a.max_gen_batches}")
    _check(a.tis_cap == 0 or a.tis_cap >= 1, "algo.tis_cap", f"must be 0 (off) or >= 1, got {a.tis_cap}")
    _check(a.score_positive > a.score_negative, "algo.score_positive", "must be greater than algo.score_negative")
    for role in ("actor", "critic"):
        o: OptimConfig = getattr(a, role)
        _check(o.lr >= 0, f"algo.{role}.lr", f"must be >= 0, got {o.lr}")
        _check(o.weight_decay >= 0, f"algo.{role}.weight_decay", f"must be >= 0, got {o.weight_decay}")
        _check(o.grad_clip > 0, f"algo.{role}.grad_clip", f"must be > 0, got {o.grad_clip}")
        _check(o.max_tokens_per_micro_batch >= 1, f"algo.{role}.max_tokens_per_micro_batch", "must be >= 1")
        _check(o.epochs >= 1, f"algo.{role}.epochs", f"must be >= 1, got {o.epochs}")
    _check(r.engine in ("hf", "sglang"), "rollout.engine", f"must be 'hf' or 'sglang', got {r.engine!r}")
    # rollout.sglang.* is typed and was checked as it was read; a fresh model's missing checkpoint
    # (model_path) only matters to a launch, and is said when the engine is built (sglang_config)
    _check(r.placement in ("colocated", "separate"), "rollout.placement",
           f"must be colocated or separate, got {r.placement!r}")
    if r.placement == "separate":
        _check(r.engine == "sglang", "rollout.placement", "=separate runs SGLang servers on nodes of their own: "
               "set rollout.engine=sglang")
        _check(r.rollout_nodes >= 1, "rollout.rollout_nodes", f"=separate needs the nodes that serve SGLang, >= 1; "
               f"got {r.rollout_nodes}")
        _check(r.sglang.weight_sync != "tensor", "rollout.sglang.weight_sync",
               "tensor sync hands CUDA IPC handles to servers on the trainer's own node; rollout.placement=separate "
               "needs distributed (NCCL, bucketed) or disk")
    else:
        _check(r.rollout_nodes == 0, "rollout.rollout_nodes", "is for rollout.placement=separate")
    _check(r.async_steps in (0, 1), "rollout.async_steps", f"must be 0 or 1, got {r.async_steps}")
    if r.async_steps:
        _check(a.tis_cap >= 1, "algo.tis_cap", "rollout.async_steps=1 samples with the weights of the step before: "
               "set algo.tis_cap (e.g. 2.0) so that truncated importance sampling corrects the staleness")
        _check(r.engine != "sglang" or r.placement == "separate" or bool(r.sglang.urls), "rollout.async_steps",
               "=1 needs SGLang servers off the trainer's GPUs (separate placement: rollout.placement=separate "
               "with rollout.rollout_nodes, or servers given by rollout.sglang.urls); colocated servers share the "
               "GPUs the step trains on")
        _check(t.offload_during_rollout == "none", "trainer.offload_during_rollout",
               "hands the trainer's memory to a colocated sampler; rollout.async_steps=1 trains while sampling")
    _check(r.temperature > 0, "rollout.temperature", f"must be > 0, got {r.temperature}")
    _check(0 < r.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {r.top_p}")
    _check(r.top_k == -1 or r.top_k >= 1, "rollout.top_k", f"must be -1 (off) or >= 1, got {r.top_k}")
    _check(r.max_response_tokens >= 1, "rollout.max_response_tokens", f"must be >= 1, got {r.max_response_tokens}")
    _check(r.max_batch_size >= 1, "rollout.max_batch_size", f"must be >= 1, got {r.max_batch_size}")
    _check(d.source in ("auto", "synthetic", "files"), "data.source",
           f"must be 'auto', 'synthetic' or 'files', got {d.source!r}")
    if d.source == "synthetic":
        _check(not d.train_files and not d.test_files, "data.source",
               "data.source=synthetic ignores data.train_files / data.test_files: use data.source=files")
    if d.uses_files:
        _check(bool(d.train_files) or a.labeled_prompts_per_step == 0 or not rec.labeled_prompts, "data.train_files",
               f"no labeled files, but algo.labeled_prompts_per_step={a.labeled_prompts_per_step} needs labeled prompts")
        _check(bool(d.test_files) or a.unlabeled_prompts_per_step == 0 or not rec.unlabeled_prompts,
               "data.test_files",
               f"no unlabeled files, but algo.unlabeled_prompts_per_step={a.unlabeled_prompts_per_step} needs unlabeled prompts")
    from tempo_mega.data.datasets import FIELD_MAPS

    for key, name in (("data.field_map", d.field_map), ("data.test_field_map", d.test_field_map)):
        _check(name is None or name in FIELD_MAPS, key, f"unknown field map {name!r} ({' | '.join(FIELD_MAPS)})")
    from tempo_mega.data.synthetic import DIFFICULTIES, TASKS

    _check(d.synthetic_task in TASKS, "data.synthetic_task", f"must be one of {list(TASKS)}, got {d.synthetic_task!r}")

    _check(d.synthetic_difficulty in DIFFICULTIES, "data.synthetic_difficulty",
           f"must be one of {sorted(DIFFICULTIES)}, got {d.synthetic_difficulty!r}")
    _check(d.synthetic_num_train >= 1, "data.synthetic_num_train", "must be >= 1")
    _check(d.synthetic_num_test >= 1, "data.synthetic_num_test", "must be >= 1")
    _check(t.total_steps >= 0, "trainer.total_steps", f"must be >= 0, got {t.total_steps}")
    _check(bool(str(t.output_dir).strip()), "trainer.output_dir",
           "is empty: name the run's folder, e.g. trainer.output_dir=runs/my_run (an empty one would write "
           "checkpoints, metrics and exports into the current folder)")
    _check(t.resume in RESUME, "trainer.resume", f"must be auto, true or false, got {t.resume!r}")
    _check(not (t.overwrite and t.resume == "true"), "trainer.overwrite",
           "trainer.overwrite=true removes the run that trainer.resume=true would continue: set one of them")
    _check(t.device in ("auto", "cpu", "cuda"), "trainer.device", f"must be auto, cpu or cuda, got {t.device!r}")
    _check(t.layout in ("padded", "packed"), "trainer.layout", f"must be 'padded' or 'packed', got {t.layout!r}")
    _check(t.host_memory in ("retain", "system"), "trainer.host_memory",
           f"must be 'retain' or 'system', got {t.host_memory!r}")
    _check(t.offload_during_rollout in ("none", "optimizer", "all"), "trainer.offload_during_rollout",
           f"must be none, optimizer or all, got {t.offload_during_rollout!r}")
    _check(t.save_every >= 0, "trainer.save_every", "must be >= 0 (0 = only at the end)")
    _check(t.eval_every >= 0, "trainer.eval_every", "must be >= 0")
    _check(t.eval_num_samples >= 1, "trainer.eval_num_samples", "must be >= 1")
    _check(t.warm_start_steps >= 0, "trainer.warm_start_steps", "must be >= 0")
    _check(t.preempt_grace_s > 0, "trainer.preempt_grace_s", f"must be > 0 seconds, got {t.preempt_grace_s}")
    from tempo_mega.telemetry.flops import PEAK_FLOPS

    _check(t.gpu_peak in PEAK_FLOPS, "trainer.gpu_peak", f"unknown peak {t.gpu_peak!r} ({' | '.join(PEAK_FLOPS)})")
    for name in t.loggers:
        _check(name in ("jsonl", "progress", "wandb"), "trainer.loggers", f"unknown logger {name!r} (jsonl | progress | wandb)")
    _check(str(cfg.kernels.enable).lower() in ("auto", "true", "false"), "kernels.enable",
           f"must be auto, true or false, got {cfg.kernels.enable!r}")
    _check(m.dtype in ("float32", "bfloat16"), "model.dtype", f"must be float32 or bfloat16, got {m.dtype!r}")
    if m.path is None:
        _check(m.num_attention_heads % m.num_key_value_heads == 0, "model.num_key_value_heads",
               "must divide model.num_attention_heads")
        _check(m.num_experts >= 0, "model.num_experts", f"must be >= 0 (0: a dense model), got {m.num_experts}")
        if m.num_experts:
            _check(1 <= m.num_experts_per_tok <= m.num_experts, "model.num_experts_per_tok",
                   f"must be in 1..model.num_experts={m.num_experts}, got {m.num_experts_per_tok}")
            _check(m.moe_intermediate_size > 0, "model.moe_intermediate_size",
                   f"must be > 0, got {m.moe_intermediate_size}")
    _check(cfg.backend in BACKENDS, "backend", f"must be one of {BACKENDS}, got {cfg.backend!r}")
    if cfg.precision.fp8 != "none":
        from tempo_mega.backends.megatron.config import FP8, FP8_RECIPES

        pr = cfg.precision
        _check(pr.fp8 in FP8, "precision.fp8", f"must be one of {FP8}, got {pr.fp8!r}")
        _check(pr.fp8_recipe in FP8_RECIPES, "precision.fp8_recipe", f"must be one of {FP8_RECIPES}, got {pr.fp8_recipe!r}")
        _check(cfg.backend == "megatron", "precision.fp8",
               f"FP8 runs through Transformer Engine on backend=megatron; got backend={cfg.backend}")
    if cfg.backend == "megatron":
        mc = megatron_config(cfg)
        tp, pp = mc.tensor_parallel_size, mc.pipeline_parallel_size
        if m.path is None:  # the model's shape is known here; a checkpoint's is checked when it is loaded
            _check(m.num_attention_heads % tp == 0, "megatron.tensor_parallel_size",
                   f"{tp} does not divide model.num_attention_heads={m.num_attention_heads}")
            _check(m.num_key_value_heads % tp == 0, "megatron.tensor_parallel_size",
                   f"{tp} does not divide model.num_key_value_heads={m.num_key_value_heads}")
            if m.num_experts:
                ep = mc.expert_model_parallel_size
                _check(m.num_experts % ep == 0, "megatron.expert_model_parallel_size",
                       f"{ep} does not divide model.num_experts={m.num_experts}")
                _check(tp == 1 or mc.sequence_parallel, "megatron.sequence_parallel",
                       f"must be true for a mixture of experts with megatron.tensor_parallel_size={tp} "
                       "(megatron-core requires it)")
            vpp = mc.virtual_pipeline_parallel_size or 1
            _check(m.num_hidden_layers % (pp * vpp) == 0, "megatron.pipeline_parallel_size",
                   f"{pp} x megatron.virtual_pipeline_parallel_size={mc.virtual_pipeline_parallel_size} does not "
                   f"divide model.num_hidden_layers={m.num_hidden_layers}")
    return cfg


def derive_prompt_split(plain: dict[str, Any], explicit: set[str]) -> None:
    """The mode owns the prompt count it does not use: rlvr and supervised_continuation train on labeled
    prompts only, so ``algo.unlabeled_prompts_per_step`` becomes 0; ttrl and empo on unlabeled ones only,
    so ``algo.labeled_prompts_per_step`` becomes 0. This wins over a preset's counts (``experiment=debug_cpu
    algo=rlvr`` needs no hand-written zero); a count in ``explicit`` (the user's own keys) is kept, so a
    contradicting non-zero value reaches ``validate``, whose error names both keys. Edits ``plain``."""
    algo = plain.get("algo")
    if not isinstance(algo, dict):
        return
    mode = algo.get("mode", AlgoConfig.mode)
    unused = RECIPES[mode].unused_prompt_count() if mode in RECIPES else None
    if unused is not None and f"algo.{unused}" not in explicit:
        algo[unused] = 0


# loading: Hydra composition, overrides, unknown-key suggestions (compose.py); last, as it imports the above
from tempo_mega.config.compose import (  # noqa: E402
    GROUPS,
    check_overrides,
    from_dict,
    group_options,
    known_keys,
    load_config,
    to_dict,
    unknown_key_message,
)

__all__ = [
    "GROUPS", "AlgoConfig", "DataConfig", "KernelsConfig", "ModelConfig", "OptimConfig", "PrecisionConfig",
    "ProfileConfig", "RolloutConfig", "TrainConfig", "TrainerConfig", "check_overrides", "derive_prompt_split",
    "from_dict", "group_options", "known_keys", "load_config", "megatron_config", "sglang_config", "to_dict",
    "unknown_key_message", "validate",
]
