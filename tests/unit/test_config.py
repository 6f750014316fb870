"""Config composition and validation: errors name the key, before any model is built."""

import dataclasses

import pytest

from tempo_mega.config import TrainConfig, from_dict, load_config


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
    ],
)
def test_bad_values_name_the_key(override, match):
    with pytest.raises(ValueError, match=match.replace(".", r"\.")):
        load_config(override)


def test_from_dict_rejects_unknown_nested_key():
    with pytest.raises(ValueError, match=r"algo\.actor\.momentum"):
        from_dict({"algo": {"actor": {"momentum": 0.9}}})
    assert isinstance(from_dict({}), TrainConfig)
