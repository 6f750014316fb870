"""``tempo-mega plan``: real parameter counts, the bytes the backends really allocate for the tiny model,
and the presets' ``plan:`` comment lines, which must equal what ``plan`` prints for them."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

from tempo_mega.config import load_config
from tempo_mega.plan import GIB, NO_CHECKPOINT, Assumptions, model_shape, plan
from tempo_mega.telemetry.flops import param_counts

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("qwen3_*_tempo.yaml"))

# The published totals (the checkpoints' safetensors: Qwen3-8B "8.2B", 14B "14.8B", 32B "32.8B")
PUBLISHED_PARAMS = {"qwen3_8b_tempo": 8_190_735_360, "qwen3_14b_tempo": 14_768_307_200,
                    "qwen3_32b_tempo": 32_762_123_264}


def preset_cfg(preset: str, *overrides: str):
    return load_config([f"experiment={preset}", f"model.path={NO_CHECKPOINT}", *overrides])


@pytest.mark.parametrize("preset", sorted(PUBLISHED_PARAMS))
def test_parameter_counts_are_the_real_models(preset):
    cfg = preset_cfg(preset)
    assert param_counts(model_shape(cfg))["total"] == PUBLISHED_PARAMS[preset]
    assert plan(cfg, nodes=4).params_total == PUBLISHED_PARAMS[preset]


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one buffer count once)."""
    seen = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def _optimizer_bytes(optimizers) -> int:
    state = []
    masters = []
    for opt in optimizers:
        inner = getattr(opt, "optimizer", opt)
        for group in inner.param_groups:
            for p in group["params"]:
                state += [v for v in inner.state[p].values() if torch.is_tensor(v)]
        for name in ("shard_fp32_from_float16_groups", "fp32_from_float16_groups"):
            for group in getattr(opt, name, None) or []:
                masters += list(group)
    return _storage_bytes(state) + _storage_bytes(masters)


TINY_MOE = ("model.num_experts=4", "model.num_experts_per_tok=2", "model.moe_intermediate_size=48")


@pytest.mark.parametrize("overrides", [(), TINY_MOE], ids=["dense", "moe"])
def test_tiny_model_bytes_equal_the_torch_backend(tmp_path, overrides):
    from tempo_mega.build import build_models
    from tempo_mega.data.pool import load_tokenizer

    cfg = load_config(["experiment=debug_cpu", f"trainer.output_dir={tmp_path}", *overrides])
    actor, critic = build_models(cfg, load_tokenizer(cfg), torch.device("cpu"))
    p = plan(cfg, nodes=1, gpus_per_node=1)
    for role, backend in (("actor", actor), ("critic", critic)):
        params = [q for q in backend.model.parameters() if q.requires_grad]
        for q in params:  # what a backward allocates, then one AdamW step's state
            q.grad = torch.zeros_like(q)
        backend.optimizer.step()
        assert p.memory[f"{role}_weights"] == _storage_bytes(params), role
        assert p.memory[f"{role}_grads"] == _storage_bytes([q.grad for q in params]), role
        assert p.memory[f"{role}_optimizer"] == _optimizer_bytes([backend.optimizer]), role


@pytest.mark.parametrize("overrides", [
    ("megatron.use_distributed_optimizer=true", "megatron.params_dtype=bfloat16"),
    ("megatron.use_distributed_optimizer=false", "megatron.params_dtype=float32"),
    ("megatron.use_distributed_optimizer=true", "megatron.params_dtype=bfloat16", "megatron.moe_token_dispatcher=allgather",
     *TINY_MOE),
], ids=["distopt-bf16", "fp32", "moe-distopt-bf16"])
def test_tiny_model_bytes_equal_the_megatron_backend(tmp_path, monkeypatch, overrides):
    pytest.importorskip("megatron.core")
    from support.megatron_cpu import one_process_world

    from tempo_mega.build import build_models
    from tempo_mega.data.pool import load_tokenizer

    cfg = load_config(["experiment=debug_cpu", "backend=megatron", f"trainer.output_dir={tmp_path}", *overrides])
    p = plan(cfg, nodes=1, gpus_per_node=1)
    with one_process_world(monkeypatch):
        actor, critic = build_models(cfg, load_tokenizer(cfg), torch.device("cpu"))
        for role, backend in (("actor", actor), ("critic", critic)):
            params = [q for c in backend.chunks for q in c.parameters()]
            assert p.memory[f"{role}_weights"] == _storage_bytes(params), role
            assert p.memory[f"{role}_grads"] == _storage_bytes([q.main_grad for q in params]), role
            assert p.memory[f"{role}_optimizer"] == _optimizer_bytes(backend._sub_optimizers), role


# A preset's comment line: "#   plan: --nodes 1 --gpu h100-80gb [overrides] -> key=value key=value ..."
PLAN_LINE = re.compile(r"^\s*#\s+plan:\s*(?P<args>[^>]*?)\s*->\s*(?P<numbers>.+)$")


def preset_plan_lines(preset: str) -> list[tuple[list[str], dict[str, str]]]:
    out = []
    for line in (ROOT / "configs" / "experiment" / f"{preset}.yaml").read_text().splitlines():
        m = PLAN_LINE.match(line)
        if m:
            out.append((shlex.split(m["args"]), dict(kv.split("=", 1) for kv in m["numbers"].split())))
    return out


def run_plan_args(preset: str, args: list[str]):
    opts = {"nodes": 1, "gpu": "h100-80gb"}
    overrides = []
    it = iter(args)
    for a in it:
        if a.startswith("--"):
            opts[a[2:].replace("-", "_")] = next(it)
        else:
            overrides.append(a)
    extra = {k: v for k, v in opts.items() if k not in ("nodes", "gpu")}
    kinds = {"sglang_placement": str, "sglang_nodes": int}
    assumptions = Assumptions(**{k: kinds.get(k, float)(v) for k, v in extra.items()})
    return plan(preset_cfg(preset, *overrides), nodes=int(opts["nodes"]), gpu=opts["gpu"], assumptions=assumptions)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_comments_quote_the_plan(preset):
    lines = preset_plan_lines(preset)
    assert lines, f"configs/experiment/{preset}.yaml has no '#   plan: ... -> ...' line"
    for args, quoted in lines:
        numbers = {k: str(v) for k, v in run_plan_args(preset, args).numbers().items()}
        wrong = {k: (v, numbers.get(k)) for k, v in quoted.items() if numbers.get(k) != v}
        assert not wrong, f"{preset}.yaml 'plan: {' '.join(args)}': quoted vs plan: {wrong}"


def test_plan_command_prints_a_table_and_names_keys(capsys):
    from tempo_mega.cli import main

    assert main(["plan", "experiment=qwen3_32b_tempo", "--nodes", "4", "--gpu", "h100-80gb"]) == 0
    out = capsys.readouterr().out
    assert "actor optimizer" in out and "SGLang KV cache" in out and "estimate" in out and "fits" in out
    # 3 nodes: 24 GPUs are no multiple of TP x PP = 16
    assert main(["plan", "experiment=qwen3_32b_tempo", "--nodes", "3"]) == 2
    assert "megatron" in capsys.readouterr().err


def test_distributed_optimizer_shards_and_more_nodes_help():
    two = plan(preset_cfg("qwen3_32b_tempo"), nodes=2)
    four = plan(preset_cfg("qwen3_32b_tempo"), nodes=4)
    assert two.layout["dp"] == 1 and four.layout["dp"] == 2
    assert four.memory["actor_weights"] == two.memory["actor_weights"]
    # master weights + moments (12 B/param) halve with DP = 2, to within the buffer padding
    assert four.memory["actor_optimizer"] == pytest.approx(two.memory["actor_optimizer"] / 2, rel=1e-6)
    assert four.memory["trainer_state"] < two.memory["trainer_state"] - 20 * GIB
    h200 = plan(preset_cfg("qwen3_32b_tempo"), nodes=2, gpu="h200-141gb")
    assert h200.sglang["kv_tokens_per_engine"] > two.sglang["kv_tokens_per_engine"]


@pytest.mark.parametrize("mode, parts", [("optimizer", ("optimizer",)), ("all", ("weights", "grads", "optimizer"))])
def test_offload_during_rollout_frees_what_it_moves_for_the_kv_cache(mode, parts):
    """trainer.offload_during_rollout: the bytes moved are exactly the roles' parts it names; colocated
    SGLang starts with them away (its static share grows by mem_fraction_static x those bytes), and the
    push, with the trainer's state back and SGLang's weights in, is checked too."""
    base = plan(preset_cfg("qwen3_32b_tempo"), nodes=2)
    off = plan(preset_cfg("qwen3_32b_tempo", f"trainer.offload_during_rollout={mode}"), nodes=2)
    moved = sum(base.memory[f"{role}_{p}"] for role in ("actor", "critic") for p in parts)
    assert off.memory["offloaded"] == moved and base.memory["offloaded"] == 0
    assert off.sglang["free_at_launch"] == pytest.approx(base.sglang["free_at_launch"] + moved)
    frac = base.sglang["mem_fraction_static"]
    assert base.memory["sglang_kv"] < 0.1 * GIB  # 2 nodes: SGLang's weights fill its share
    assert off.memory["sglang_kv"] == pytest.approx(frac * off.sglang["free_at_launch"] - off.memory["sglang_weights"])
    assert base.fits["rollout"] is False and off.fits["rollout"] and "weight_push" in off.fits
    assert "weight_push" not in base.fits and off.numbers()["offloaded_gib"] == round(moved / GIB, 1)


def test_colocated_engines_on_every_node_share_the_samples():
    one = plan(preset_cfg("qwen3_32b_tempo", "rollout.sglang.launch_on=rank0"), nodes=4)
    every = plan(preset_cfg("qwen3_32b_tempo"), nodes=4)
    assert one.sglang["engines"] == 1 and every.sglang["engines"] == 4
    assert every.step_s["rollout"] < one.step_s["rollout"]


def test_the_run_s_own_placement_is_planned():
    """The 235B preset says rollout.placement=separate on 4 nodes: planned so without the flags."""
    from tempo_mega.plan import Assumptions

    own = plan(preset_cfg("qwen3_235b_a22b_tempo"), nodes=32)
    told = plan(preset_cfg("qwen3_235b_a22b_tempo"), nodes=32,
                assumptions=Assumptions(sglang_placement="separate", sglang_nodes=4))
    assert own.sglang["placement"] == "separate" and own.numbers() == told.numbers()


def test_train_logs_the_plan_headline(tmp_path):
    """``train`` logs the plan of its own config at start; a preset without a checkpoint is planned from
    configs/model's shape and the synthetic tokenizer's vocabulary for a fresh model."""
    from tempo_mega.plan import headline_for_run

    cfg = load_config(["experiment=debug_cpu", f"trainer.output_dir={tmp_path}"])
    line = headline_for_run(cfg)
    assert line.startswith("plan (h100-80gb x 1, DP 1): trainer state") and "fits" in line, line
    p = plan(cfg, nodes=1, gpus_per_node=1)
    assert p.memory["logits"] < GIB  # the tiny vocabulary, not Qwen3's 151,936
