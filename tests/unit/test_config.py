"""Config composition and validation: errors name the key, before any model is built."""

import dataclasses

import pytest

from tempo_mega.backends.megatron.config import MegatronConfig
from tempo_mega.config import TrainConfig, from_dict, load_config, megatron_config


def test_presets_compose():
    dbg = load_config(["experiment=debug_cpu"])
    assert dbg.experiment == "debug_cpu" and dbg.trainer.device == "cpu"
    demo = load_config(["experiment=demo"])
    assert demo.trainer.warm_start_steps > 0
    q8 = load_config(["experiment=qwen3_8b_tempo", "model.path=/ckpt"])
    assert (q8.algo.labeled_prompts_per_step + q8.algo.unlabeled_prompts_per_step, q8.algo.mini_batch_prompts) == (256, 64)
    assert q8.algo.num_samples_per_prompt == 8 and q8.rollout.max_response_tokens == 16384
    assert (q8.algo.clip_low, q8.algo.clip_high, q8.algo.actor.lr) == (3e-4, 5e-4, 1e-6)
    q14 = load_config(["experiment=qwen3_14b_tempo", "model.path=/ckpt"])
    assert (q14.algo.labeled_prompts_per_step + q14.algo.unlabeled_prompts_per_step, q14.algo.mini_batch_prompts) == (128, 32)
    assert q14.algo.critic.lr == 1e-6
    q32 = load_config(["experiment=qwen3_32b_tempo", "model.path=/ckpt"])  # no released run: the 14B's settings
    assert (q32.algo.labeled_prompts_per_step + q32.algo.unlabeled_prompts_per_step, q32.algo.mini_batch_prompts) == (128, 32)
    assert (q32.algo.clip_low, q32.algo.clip_high, q32.algo.actor.lr, q32.algo.critic.lr) == (3e-4, 5e-4, 1e-6, 1e-6)
    assert q32.algo.num_samples_per_prompt == 8 and q32.rollout.max_response_tokens == 16384


# The Qwen3 presets on Megatron: (preset, world size the layout is meant for, TP, PP, VPP, DP there).
# The model shapes are the real HF config.json numbers (configs/model/qwen3_*.yaml); the vocabulary
# (151936) is not a ModelConfig key.
QWEN3_VOCAB = 151936
MEGATRON_PRESETS = [
    ("qwen3_8b_tempo", 8, 4, 1, None, 2),  # one 8xH100 node
    ("qwen3_14b_tempo", 8, 8, 1, None, 1),  # one 8xH100 node
    ("qwen3_32b_tempo", 16, 8, 2, 4, 1),  # two nodes (DP grows with more)
]
QWEN3_SHAPES = {  # HF config.json: hidden, intermediate, layers, heads, KV heads, head_dim, tied
    "qwen3_8b_tempo": (4096, 12288, 36, 32, 8, 128, False),
    "qwen3_14b_tempo": (5120, 17408, 40, 40, 8, 128, False),
    "qwen3_32b_tempo": (5120, 25600, 64, 64, 8, 128, False),
}


@pytest.mark.parametrize("preset,world,tp,pp,vpp,dp", MEGATRON_PRESETS)
def test_qwen3_presets_select_megatron_with_a_layout_that_fits(preset, world, tp, pp, vpp, dp):
    cfg = load_config([f"experiment={preset}", "model.path=/ckpt"])  # composes and validates
    assert cfg.backend == "megatron" and cfg.rollout.engine == "sglang" and cfg.trainer.layout == "packed"
    m = cfg.model
    shape = (m.hidden_size, m.intermediate_size, m.num_hidden_layers, m.num_attention_heads,
             m.num_key_value_heads, m.head_dim, m.tie_word_embeddings)
    assert shape == QWEN3_SHAPES[preset] and m.rope_theta == 1e6 and m.dtype == "bfloat16"
    mc = megatron_config(cfg)
    assert isinstance(mc, MegatronConfig)
    assert (mc.tensor_parallel_size, mc.pipeline_parallel_size, mc.virtual_pipeline_parallel_size) == (tp, pp, vpp)
    assert mc.context_parallel_size == 1  # 16K responses fit without CP (see the presets' comments)
    assert mc.sequence_parallel and mc.use_distributed_optimizer and mc.recompute == "full"
    assert mc.params_dtype == "bfloat16"
    # TP divides the heads, KV heads and vocabulary, PP x VPP the layers, and the node(s) hold whole replicas
    mc.validate_for(num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_key_value_heads,
                    num_layers=m.num_hidden_layers, vocab_size=QWEN3_VOCAB, world_size=world)
    assert mc.data_parallel_size(world) == dp
    assert mc.data_parallel_size(2 * world) == 2 * dp  # more nodes: more DP
    with pytest.raises(ValueError, match="not divisible by megatron.tensor_parallel_size"):
        mc.validate_for(num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_key_value_heads,
                        num_layers=m.num_hidden_layers, vocab_size=QWEN3_VOCAB, world_size=world - 2)
    # a fresh model of the preset's shape (model.path=null) goes through the config-time shape checks
    fresh = load_config([f"experiment={preset}", "model.path=null"])
    assert megatron_config(fresh) == mc


def test_config_is_frozen():
    cfg = load_config([])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.trainer.seed = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "override,match",
    [
        (["+algo.not_a_key=1"], "algo.not_a_key"),
        (["algo.clip_lo=2"], "algo.clip_lo"),
        (["trainer.total_steps=abc"], "trainer.total_steps"),
        (["algo.clip_low=2"], "algo.clip_low"),
        (["algo.mode=grpo"], "algo.mode"),
        (["rollout.temperature=0"], "rollout.temperature"),
        (["rollout.top_p=1.5"], "rollout.top_p"),
        (["algo.e_step_every=-1"], "algo.e_step_every"),
        (["algo.actor.lr=-1"], "algo.actor.lr"),
        (["algo.critic.grad_clip=0"], "algo.critic.grad_clip"),
        (["trainer.layout=ragged"], "trainer.layout"),
        (["trainer.loggers=[jsonl,tensorboard]"], "trainer.loggers"),
        (["experiment=no_such_preset"], "experiment/no_such_preset"),
        (["experiment=qwen3_8b_tempo"], "model.path"),
        (["data.source=files"], "data.train_files"),
        (["algo=rlvr", "algo.unlabeled_prompts_per_step=4"], "algo.unlabeled_prompts_per_step"),
        (["algo.unlabeled_prompts_per_step=0"], "algo.unlabeled_prompts_per_step"),
        (["model.num_key_value_heads=3"], "model.num_key_value_heads"),
        # backend=megatron (model: tiny, 4 heads, 2 KV heads, 2 layers)
        (["backend=megatron", "megatron.context_parallel_size=0"], "megatron.context_parallel_size"),
        (["backend=megatron", "megatron.tensor_parallel_size=4"], "megatron.tensor_parallel_size"),  # 2 KV heads
        (["backend=megatron", "megatron.pipeline_parallel_size=4"], "megatron.pipeline_parallel_size"),  # 2 layers
        (["backend=megatron", "megatron.pipeline_parallel_size=2", "megatron.virtual_pipeline_parallel_size=2"],
         "megatron.pipeline_parallel_size"),
        (["backend=megatron", "megatron.virtual_pipeline_parallel_size=2"], "megatron.virtual_pipeline_parallel_size"),
        (["backend=megatron", "megatron.sequence_parallel=true"], "megatron.sequence_parallel"),
        (["backend=megatron", "megatron.recompute=some"], "megatron.recompute"),
        (["backend=megatron", "+megatron.pipeline_size=2"], "megatron.pipeline_size"),
        (["experiment=qwen3_32b_tempo", "model.path=/ckpt", "megatron.context_parallel_size=0"],
         "megatron.context_parallel_size"),
        (["experiment=qwen3_8b_tempo", "model.path=null", "megatron.tensor_parallel_size=16"],
         "megatron.tensor_parallel_size"),  # 8 KV heads
        (["experiment=qwen3_32b_tempo", "model.path=null", "megatron.virtual_pipeline_parallel_size=3"],
         "megatron.pipeline_parallel_size"),  # 2 x 3 does not divide 64 layers
        (["precision.fp8=e4m3"], "precision.fp8"),  # the torch backend has no FP8
        (["backend=megatron", "precision.fp8=fp4"], "precision.fp8"),
        (["backend=megatron", "precision.fp8=hybrid", "precision.fp8_recipe=nvfp4"], "precision.fp8_recipe"),
        (["backend=megatron", "model.dtype=bfloat16", "precision.fp8=e4m3", "megatron.fp8=hybrid"], "megatron.fp8"),
        # mixture-of-experts keys
        (["backend=megatron", "megatron.expert_model_parallel_size=0"], "megatron.expert_model_parallel_size"),
        (["backend=megatron", "megatron.tensor_parallel_size=2", "megatron.expert_tensor_parallel_size=3"],
         "megatron.expert_tensor_parallel_size"),
        (["backend=megatron", "megatron.moe_token_dispatcher=deepep"], "megatron.moe_token_dispatcher"),
        (["backend=megatron", "megatron.moe_aux_loss_type=sinkhorn"], "megatron.moe_aux_loss_type"),
        (["backend=megatron", "megatron.moe_aux_loss_coeff=-0.1"], "megatron.moe_aux_loss_coeff"),
        (["backend=megatron", "megatron.moe_z_loss_coeff=-1"], "megatron.moe_z_loss_coeff"),
        (["backend=megatron", "megatron.moe_expert_capacity_factor=0"], "megatron.moe_expert_capacity_factor"),
        (["model.num_experts=-1"], "model.num_experts"),
        (["model.num_experts=4", "model.num_experts_per_tok=5"], "model.num_experts_per_tok"),
        (["backend=megatron", "model.num_experts=4", "model.num_experts_per_tok=2",
          "megatron.expert_model_parallel_size=3"], "megatron.expert_model_parallel_size"),
        (["backend=megatron", "model.num_experts=4", "model.num_experts_per_tok=2", "megatron.tensor_parallel_size=2"],
         "megatron.sequence_parallel"),
        (["algo.routing_replay=r2"], "algo.routing_replay"),
        (["algo.routing_replay=r3", "model.num_experts=4", "model.num_experts_per_tok=2"],
         "algo.routing_replay"),  # backend=torch
        (["algo.routing_replay=r3", "backend=megatron"], "algo.routing_replay"),  # a dense model
    ],
)
def test_bad_values_name_the_key(override, match):
    with pytest.raises(ValueError, match=match.replace(".", r"\.")):
        load_config(override)


@pytest.mark.parametrize(
    "override",
    [
        ["megatron.pipeline_parallel_size=2"],
        ["megatron.pipeline_parallel_size=2", "megatron.virtual_pipeline_parallel_size=1"],
        ["megatron.use_distributed_optimizer=true"],
        ["trainer.layout=packed"],
        ["rollout.engine=sglang", "rollout.sglang.urls=[http://127.0.0.1:30000]"],
    ],
)
def test_megatron_accepts_pipeline_distributed_optimizer_packed_and_sglang(override):
    cfg = load_config(["backend=megatron", *override])
    assert cfg.backend == "megatron"


def test_from_dict_rejects_unknown_nested_key():
    with pytest.raises(ValueError, match=r"algo\.actor\.momentum"):
        from_dict({"algo": {"actor": {"momentum": 0.9}}})
    assert isinstance(from_dict({}), TrainConfig)


def test_precision_fp8_sets_the_megatron_layers():
    """precision.fp8 / precision.fp8_recipe (the issue's key) reach MegatronConfig; FP8 off by default."""
    from tempo_mega.config import megatron_config

    assert megatron_config(load_config(["backend=megatron"])).fp8 == "none"
    cfg = load_config(["experiment=qwen3_8b_tempo", "model.path=/ckpt", "precision.fp8=hybrid",
                       "precision.fp8_recipe=tensorwise"])
    mc = megatron_config(cfg)
    assert (mc.fp8, mc.fp8_recipe, mc.params_dtype) == ("hybrid", "tensorwise", "bfloat16")


@pytest.mark.parametrize("mode, split", [("rlvr", (2, 0)), ("supervised_continuation", (2, 0)), ("ttrl", (0, 2)),
                                         ("empo", (0, 2)), ("tempo", (2, 2))])
def test_each_mode_sets_its_prompt_split_over_the_preset(mode, split):
    for choice in (f"algo={mode}", f"algo.mode={mode}"):
        a = load_config(["experiment=debug_cpu", choice]).algo
        assert (a.labeled_prompts_per_step, a.unlabeled_prompts_per_step) == split, choice
    # the frozen critic keeps the labeled prompts: TEMPO's M-step trains on them too
    a = load_config(["experiment=debug_cpu", "algo=tempo", "algo.e_step_every=0"]).algo
    assert (a.labeled_prompts_per_step, a.unlabeled_prompts_per_step) == (2, 2)
    # an explicit zero agrees with the mode; from_dict derives the same way
    assert load_config(["algo=rlvr", "algo.unlabeled_prompts_per_step=0"]).algo.unlabeled_prompts_per_step == 0
    assert from_dict({"algo": {"mode": "ttrl"}}).algo.labeled_prompts_per_step == 0


@pytest.mark.parametrize("override, unused", [("algo=rlvr", "algo.unlabeled_prompts_per_step=3"),
                                              ("algo=ttrl", "algo.labeled_prompts_per_step=1"),
                                              ("algo.mode=empo", "algo.labeled_prompts_per_step=1")])
def test_a_count_that_contradicts_the_mode_names_both_keys(override, unused):
    with pytest.raises(ValueError) as e:
        load_config(["experiment=debug_cpu", override, unused])
    assert unused.split("=")[0] in str(e.value) and "algo.mode=" in str(e.value)


def test_unknown_keys_and_choices_suggest_what_exists():
    with pytest.raises(ValueError, match=r"'algo\.lerning_rate': no such key; did you mean algo\.actor\.lr"):
        load_config(["algo.lerning_rate=1"])
    with pytest.raises(ValueError, match=r"did you mean trainer\.total_steps or "):
        load_config(["trainer.totl_steps=1"])
    with pytest.raises(ValueError, match=r"choices are debug_cpu, demo, .*did you mean experiment=debug_cpu\?"):
        load_config(["experiment=debug_cpuu"])


def test_engine_configs_are_typed_and_named_in_errors():
    """rollout.sglang and megatron are the engines' own dataclasses inside TrainConfig, read and checked
    with the rest: a wrong type or value names its key, and the run's config.json reads back equal."""
    from tempo_mega.config import sglang_config, to_dict
    from tempo_mega.rollout.sglang.config import SGLangConfig

    cfg = load_config(["rollout=sglang", "rollout.sglang.urls=[http://127.0.0.1:30000]", "backend=megatron",
                       "megatron.tensor_parallel_size=2", "model.dtype=float32"])
    assert isinstance(cfg.rollout.sglang, SGLangConfig) and isinstance(cfg.megatron, MegatronConfig)
    assert cfg.rollout.sglang.urls == ("http://127.0.0.1:30000",) and cfg.megatron.tensor_parallel_size == 2
    assert cfg.megatron.params_dtype is None and megatron_config(cfg).params_dtype == "float32"  # follows the model
    assert sglang_config(cfg) is cfg.rollout.sglang
    assert from_dict(to_dict(cfg)) == cfg  # config.json holds lists where the dataclasses hold tuples
    for override, key in ((["rollout.sglang.weight_sync=nfs"], "rollout.sglang.weight_sync"),
                          (["rollout.sglang.tp_size=0"], "rollout.sglang.tp_size"),
                          (["rollout.sglang.probe_ids=[x]"], "rollout.sglang.probe_ids"),
                          (["megatron.tensor_parallel_size=0"], "megatron.tensor_parallel_size"),
                          (["megatron.params_dtype=int8"], "megatron.params_dtype")):
        with pytest.raises(ValueError, match=rf"config key '{key}"):
            load_config(override)
    fresh = load_config(["rollout=sglang", "rollout.sglang.model_path=null"])  # a launch needs a checkpoint,
    with pytest.raises(ValueError, match=r"config key 'rollout\.sglang\.model_path'"):  # said when built
        sglang_config(fresh)


@pytest.mark.parametrize("overrides, key", [
    (["rollout.placement=elsewhere"], "rollout.placement"),
    (["rollout.engine=sglang", "rollout.placement=separate", "rollout.sglang.weight_sync=distributed"],
     "rollout.rollout_nodes"),
    (["rollout.rollout_nodes=2"], "rollout.rollout_nodes"),
    (["rollout.placement=separate", "rollout.rollout_nodes=1"], "rollout.placement"),  # the HF engine
    (["rollout.engine=sglang", "rollout.placement=separate", "rollout.rollout_nodes=1"], "rollout.sglang.weight_sync"),
])
def test_rollout_placement_is_checked_by_key(tmp_path, overrides, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_config(["experiment=debug_cpu", f"trainer.output_dir={tmp_path}", "model.path=/m", *overrides])


def test_separate_placement_wants_the_servers_urls(tmp_path):
    from tempo_mega.config import sglang_config

    over = ["experiment=debug_cpu", f"trainer.output_dir={tmp_path}", "model.path=/m", "rollout.engine=sglang",
            "rollout.placement=separate", "rollout.rollout_nodes=1", "rollout.sglang.weight_sync=distributed"]
    with pytest.raises(ValueError, match=r"rollout\.sglang\.urls.*launch slurm"):
        sglang_config(load_config(over))
    assert sglang_config(load_config([*over, 'rollout.sglang.urls=["http://h:30000"]'])).urls == ("http://h:30000",)
