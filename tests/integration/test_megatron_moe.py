"""MegatronBackend on a tiny Qwen3-MoE (4 experts, top-2, 2 layers), CPU and gloo, megatron's allgather
token dispatcher: every expert layout gives the log-probs, values, losses, grad norms, MoE metrics and
post-step weights of the layout without expert parallelism, for an actor trained with the router's
load-balancing and z losses and a critic without them:

- EP=2 (DP=2), EP=2 with the distributed optimizer, TP=2 x EP=2 (expert TP = TP; sequence parallel,
  which megatron-core requires for MoE with TP), the same with expert TP 1, PP=2 x EP=2, CP=2 x EP=2:
  against DP=2 without EP (the router losses are per micro-batch, so the
  micro-batches must be the same: DP=2's);
- the critic and an actor replaying recorded experts (no router loss) also against EP=TP=PP=DP=1,
  and full activation recompute against it for all three;
- a dist-checkpoint saved at EP=2 (distributed optimizer) loads at EP=1 and continues identically.

Each layout runs in its own ``torchrun``-like subprocess world (spawned, under a timeout)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")

HERE = Path(__file__).resolve()

# name -> (world size, megatron config keys)
LAYOUTS = {
    "single": (1, {}),
    "dp2": (2, {}),
    "ep2": (2, {"expert_model_parallel_size": 2}),
    "ep2dist": (2, {"expert_model_parallel_size": 2, "use_distributed_optimizer": True}),
    "tp2ep2": (4, {"tensor_parallel_size": 2, "sequence_parallel": True, "expert_model_parallel_size": 2}),
    "tp2ep2etp1": (4, {"tensor_parallel_size": 2, "sequence_parallel": True, "expert_model_parallel_size": 2,
                       "expert_tensor_parallel_size": 1}),
    "pp2ep2": (4, {"pipeline_parallel_size": 2, "expert_model_parallel_size": 2}),
    "cp2ep2": (4, {"context_parallel_size": 2, "expert_model_parallel_size": 2}),
    "recompute": (1, {"recompute": "full"}),
    "ep1dist": (1, {"use_distributed_optimizer": True}),  # loads ep2dist's checkpoint
}
ROUTER_LOSSES = {"moe_aux_loss_coeff": 0.05, "moe_z_loss_coeff": 0.01}  # the actor's
ROLES = ("actor", "critic", "replay")  # replay: an actor replaying recorded experts, no router losses
METRICS = ("loss", "grad_norm", "num_micro_batches", "moe_aux_loss", "moe_z_loss", "moe_load_imbalance",
           "moe_load_imbalance_max", "moe_routing_agreement")


def run_world(tmp: Path, layout: str, mode: str, ckpt: Path | None = None) -> dict:
    """This file as a torchrun script in the world of ``layout``."""
    from support.worlds import run_world as run

    return run(HERE, LAYOUTS[layout][0], tmp, layout, mode, ckpt, timeout_s=400)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """``world(name)``: one torchrun world's results, run on first use and kept for the module; "loaded"
    is ep1dist loading ep2dist's checkpoint."""
    tmp = tmp_path_factory.mktemp("megatron_moe")
    saves = {"ep2dist": tmp / "ckpt_ep2dist"}
    done: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in done:
            if name == "loaded":
                get("ep2dist")
                done[name] = run_world(tmp, "ep1dist", "load", saves["ep2dist"])
            else:
                done[name] = run_world(tmp, name, "train", saves.get(name))
        return done[name]

    return get


def _assert_same(got: dict, ref: dict, roles: tuple[str, ...]) -> None:
    for role in roles:
        for key in (role, f"{role}_after"):
            torch.testing.assert_close(got[key], ref[key], atol=1e-5, rtol=1e-5, msg=key)
        assert got[f"{role}_weights"].keys() == ref[f"{role}_weights"].keys()
        for name, t in ref[f"{role}_weights"].items():  # one optimizer step
            torch.testing.assert_close(got[f"{role}_weights"][name], t, atol=1e-4, rtol=1e-4, msg=f"{role} {name}")
        prefix = "critic" if role == "critic" else "actor"
        for key in METRICS:
            name = f"{prefix}/{key}"
            if key == "moe_routing_agreement" and role != "replay":
                assert name not in got[f"{role}_metrics"]
                continue
            assert got[f"{role}_metrics"][name] == pytest.approx(ref[f"{role}_metrics"][name], rel=1e-5), name


@pytest.mark.parametrize("layout", ["ep2", "ep2dist", "tp2ep2", "tp2ep2etp1", "pp2ep2", "cp2ep2"])
def test_expert_layout_matches_dp2(world, layout):
    _assert_same(world(layout), world("dp2"), ROLES)


@pytest.mark.parametrize("layout", ["ep2", "ep2dist", "tp2ep2", "tp2ep2etp1", "pp2ep2", "cp2ep2", "recompute"])
def test_roles_without_router_losses_match_one_process(world, layout):
    """The critic and the replaying actor (no router loss: the same update whatever the micro-batches)
    match one process in every layout: the replayed experts reach the right tokens under EP, sequence
    parallel, PP, CP and full recompute."""
    _assert_same(world(layout), world("single"), ("critic", "replay"))


def test_full_recompute_keeps_each_micro_batchs_router_losses(world):
    """Under full recompute the routers run again in the backward, where another micro-batch is in flight:
    the router losses of each keep its own weight (and the replay its own experts)."""
    _assert_same(world("recompute"), world("single"), ROLES)


def test_router_losses_train_and_report(world):
    """The actor's router losses are on (coefficients > 0) and the critic's off: only the actor's router
    weights get a gradient beyond the policy loss's, and both report the step's routing."""
    res = world("single")
    for role in ("actor", "critic"):
        m = res[f"{role}_metrics"]
        assert m[f"{role}/moe_load_imbalance_max"] >= m[f"{role}/moe_load_imbalance"] >= 1.0
        assert m[f"{role}/moe_aux_loss"] > 0 and m[f"{role}/moe_z_loss"] > 0
    # the same actor trained without the router losses ends elsewhere: they reached the gradient
    plain, aux = res["actor_plain_weights"], res["actor_weights"]
    router = [n for n in plain if n.endswith("mlp.gate.weight")]
    assert router and any(not torch.allclose(plain[n], aux[n], atol=1e-6) for n in router)


def test_checkpoint_saved_at_ep2_loads_at_ep1(world):
    saved, loaded = world("ep2dist"), world("loaded")
    for role in ROLES:
        for name, t in saved[f"{role}_weights"].items():
            assert torch.equal(loaded[f"{role}_weights"][name], t), name
    # the optimizer moments came back too: one more identical step agrees
    torch.testing.assert_close(loaded["actor_after_2nd"], saved["actor_after_2nd"], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- replay
@pytest.fixture
def megatron_world(monkeypatch):
    from support.megatron_cpu import one_process_world

    with one_process_world(monkeypatch):
        yield


def _replay_case(seed: int = 0):
    """The tiny MoE, samples of the HF engine with their routed experts, and those experts shifted (every
    token sent to other experts than its own)."""
    from support.models import hf_moe_model, tiny_qwen3_moe_config

    from tempo_mega.batch import RolloutBatch
    from tempo_mega.rollout.base import SamplingParams
    from tempo_mega.rollout.hf import HFRolloutEngine

    cfg = tiny_qwen3_moe_config()
    hf = hf_moe_model(cfg)
    engine = HFRolloutEngine(hf_moe_model(cfg), pad_token_id=0)
    prompts = [[5, 9, 11, 3], [7, 2]]
    samples, _ = engine.generate(prompts, 2, SamplingParams(max_response_tokens=6, seed=seed,
                                                            return_routed_experts=True))
    prompt_of = [prompts[s.prompt_index] for s in samples]
    batch = RolloutBatch.from_samples(prompt_of, [s.response_ids for s in samples], is_labeled=[True] * 4,
                                      group_ids=[0, 0, 1, 1], pad_token_id=0,
                                      routed_experts=[s.routed_experts for s in samples])
    shifted = [((t.long() + 1) % cfg.num_experts).to(t.dtype) for t in batch.routed_experts]
    return cfg, hf, samples, prompt_of, batch, shifted


def test_hf_engine_records_the_routing_of_every_token_it_ran(megatron_world):
    """The HF engine's routed experts ([prompt + response - 1, layers, k], uint8) are the top k of the
    model's own router on the whole sequence, token by token."""
    cfg, hf, samples, prompt_of, _, _ = _replay_case()
    for s, p in zip(samples, prompt_of):
        ids = torch.tensor([p + s.response_ids])
        with torch.no_grad():
            logits = hf(input_ids=ids, output_router_logits=True).router_logits
        own = torch.stack([x.topk(cfg.num_experts_per_tok, dim=-1).indices for x in logits], dim=1)[:-1]
        assert s.routed_experts.dtype == torch.uint8
        assert s.routed_experts.shape == (len(p) + len(s.response_ids) - 1, cfg.num_hidden_layers, 2)
        assert torch.equal(s.routed_experts.long().sort(-1).values, own.sort(-1).values)


def test_routing_replay_routes_the_trainer_as_recorded(megatron_world):
    """With routing replay the megatron actor's log-probs are those of HF's model routed to the recorded
    experts (an independent reference: its routers replaced by forced ones) - for experts other than its
    own, too; without replay they stay the model's own. Training reports how often the trainer's own
    routing agreed with the recorded one: always for the sampler's own, hardly ever for shifted experts."""
    import dataclasses

    from support.models import hf_logprobs_with_routing, moe_checkpoint_state_dict

    from tempo_mega.backends.megatron import MegatronConfig
    from tempo_mega.backends.megatron.backend import MegatronBackend
    from tempo_mega.backends.torch import OptimConfig

    cfg, hf, samples, prompt_of, batch, shifted = _replay_case()
    mc = MegatronConfig(params_dtype="float32", moe_token_dispatcher="allgather")
    sd = moe_checkpoint_state_dict(hf)
    optim = OptimConfig(lr=1e-3, max_tokens_per_micro_batch=12)  # several micro-batches
    replay = MegatronBackend("actor", cfg, mc, optim, hf_state_dict=sd, routing_replay=True)
    plain = MegatronBackend("actor", cfg, mc, optim, hf_state_dict=sd)
    moved = dataclasses.replace(batch, routed_experts=shifted)
    got_moved, got_own, got_plain = (replay.forward_logprobs(moved), replay.forward_logprobs(batch),
                                     plain.forward_logprobs(moved))
    mask = batch.response_mask.bool()
    for r, (s, p) in enumerate(zip(samples, prompt_of)):
        n = len(s.response_ids)
        ref_moved = hf_logprobs_with_routing(hf, p, s.response_ids, shifted[r])
        ref_own = hf_logprobs_with_routing(hf, p, s.response_ids, batch.routed_experts[r])
        torch.testing.assert_close(got_moved[r, :n], ref_moved, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got_own[r, :n], ref_own, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got_plain[r, :n], ref_own, atol=1e-4, rtol=1e-4)
        assert (ref_moved - ref_own).abs().max() > 1e-2  # the shift changes the numbers
    assert not torch.allclose(got_moved[mask], got_own[mask])

    moved.advantages = batch.advantages = torch.randn(batch.response_mask.shape)
    # the first layer never agrees with shifted experts; a later one may, its input moved by the shift
    assert replay.train_step(moved, _pg_loss)["actor/moe_routing_agreement"] < 0.1
    fresh = MegatronBackend("actor", cfg, mc, optim, hf_state_dict=sd, routing_replay=True)
    assert fresh.train_step(batch, _pg_loss)["actor/moe_routing_agreement"] == 1.0
    assert "actor/moe_routing_agreement" not in plain.train_step(moved, _pg_loss)
    with pytest.raises(ValueError, match="carries no routed experts"):
        replay.forward_logprobs(dataclasses.replace(batch, routed_experts=None))


# ---------------------------------------------------------------------------------------------- worker
from support.worlds import finish_world, train_or_load  # noqa: E402
from support.worlds import pg_loss as _pg_loss  # noqa: E402
from support.worlds import value_loss as _value_loss  # noqa: E402


def _worker(layout: str, mode: str, out_path: str, ckpt: str) -> None:
    import torch.distributed as dist
    from support.megatron_cpu import megatron_on_cpu
    from support.models import hf_moe_model, moe_checkpoint_state_dict, tiny_qwen3_moe_config

    from tempo_mega.backends.megatron import MegatronConfig
    from tempo_mega.backends.megatron.backend import MegatronBackend
    from tempo_mega.backends.torch import OptimConfig, ValueHeadModel
    from tempo_mega.batch import RolloutBatch

    torch.use_deterministic_algorithms(True)
    with megatron_on_cpu():
        dist.init_process_group("gloo")
        cfg = tiny_qwen3_moe_config()
        hf = hf_moe_model(cfg)
        actor_sd = moe_checkpoint_state_dict(hf)
        head = ValueHeadModel.from_actor(hf_moe_model(cfg), seed=3).value_head.state_dict()
        critic_sd = {**{k: v for k, v in actor_sd.items() if k.startswith("model.")},
                     **{f"value_head.{k}": v for k, v in head.items()}}
        gen = torch.Generator().manual_seed(5)
        prompts = [[int(x) for x in torch.randint(0, 128, (n,), generator=gen)] for n in (3, 5, 2, 4, 3, 4)]
        responses = [[int(x) for x in torch.randint(0, 128, (n,), generator=gen)] for n in (4, 2, 5, 3, 1, 3)]
        batch = RolloutBatch.from_samples(prompts, responses, is_labeled=[True] * 6, group_ids=[0, 0, 1, 1, 2, 2],
                                          pad_token_id=0)
        batch.advantages = torch.randn(batch.response_mask.shape, generator=gen)
        batch.returns = torch.randn(batch.response_mask.shape, generator=gen)
        # two mini-batches of 3 rows, micro-batches of <= 8 tokens; Adam with eps 1 (see test_megatron_parallel)
        optim = OptimConfig(lr=1.0, eps=1.0, mini_batch_size=3, max_tokens_per_micro_batch=8, grad_clip=0.5)
        base = dict(params_dtype="float32", logprob_chunk_tokens=3, moe_token_dispatcher="allgather",
                    **LAYOUTS[layout][1])
        # recorded experts for every token but each row's last: k = 2 distinct of 4, drawn
        first = [torch.randint(0, 4, (int(n) - 1, cfg.num_hidden_layers, 1), generator=gen) for n in batch.row_tokens()]
        batch.routed_experts = [torch.cat([f, (f + torch.randint(1, 4, f.shape, generator=gen)) % 4], dim=-1).to(torch.uint8)
                                for f in first]
        backends = {"actor": MegatronBackend("actor", cfg, MegatronConfig(**base, **ROUTER_LOSSES), optim,
                                             hf_state_dict=actor_sd),
                    "critic": MegatronBackend("critic", cfg, MegatronConfig(**base), optim, hf_state_dict=critic_sd),
                    "replay": MegatronBackend("actor", cfg, MegatronConfig(**base), optim, hf_state_dict=actor_sd,
                                              routing_replay=True)}
        losses = {"actor": _pg_loss, "critic": _value_loss, "replay": _pg_loss}

        res = train_or_load(backends, batch, losses, mode, ckpt)
        if mode == "train" and layout == "single":  # the actor without router losses
            plain = MegatronBackend("actor", cfg, MegatronConfig(**base), optim, hf_state_dict=actor_sd)
            plain.train_step(batch, _pg_loss)
            res["actor_plain_weights"] = dict(plain.export_weights(dtype=None))
        finish_world(res, out_path)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4])
