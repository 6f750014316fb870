"""`tempo-mega convert`: HF <-> mcore shards through files, bit-exact both ways, actor and critic."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen3Config, Qwen3ForCausalLM

from tempo_mega.cli import main
from tempo_mega.models.critic import ValueHeadModel


def tiny(tied: bool) -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=tied)
    return Qwen3ForCausalLM(cfg)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2)])
def test_actor_round_trip_is_bit_exact(tmp_path, tied, tp, pp):
    model = tiny(tied)
    model.save_pretrained(tmp_path / "hf")
    assert main(["convert", "hf-to-mcore", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "mc"),
                 "--tp", str(tp), "--pp", str(pp)]) == 0
    assert len(list((tmp_path / "mc").glob("mcore_tp*_pp*.safetensors"))) == tp * pp
    assert json.loads((tmp_path / "mc" / "tempo_mcore.json").read_text()) == {"tp": tp, "pp": pp, "critic": False}
    assert main(["convert", "mcore-to-hf", "--mcore", str(tmp_path / "mc"), "--out", str(tmp_path / "back")]) == 0
    back = load_file(tmp_path / "back" / "model.safetensors")
    want = load_file(tmp_path / "hf" / "model.safetensors")
    assert set(back) == set(want)
    for name, t in want.items():
        assert torch.equal(back[name], t), name
    again = Qwen3ForCausalLM.from_pretrained(tmp_path / "back")
    ids = torch.randint(0, 96, (2, 7))
    torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_critic_round_trip_is_bit_exact(tmp_path):
    critic = ValueHeadModel.from_actor(tiny(True), seed=3)
    critic.save_pretrained(tmp_path / "critic")
    assert main(["convert", "hf-to-mcore", "--hf", str(tmp_path / "critic"), "--out", str(tmp_path / "mc"),
                 "--tp", "2", "--critic"]) == 0
    assert main(["convert", "mcore-to-hf", "--mcore", str(tmp_path / "mc"), "--out", str(tmp_path / "back")]) == 0
    again = ValueHeadModel.from_pretrained(tmp_path / "back")
    for (n1, p1), (n2, p2) in zip(critic.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_bad_inputs_are_rejected_with_a_clear_error(tmp_path, capsys):
    model = tiny(True)
    model.save_pretrained(tmp_path / "hf")
    assert main(["convert", "hf-to-mcore", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "o"), "--tp", "3"]) == 2
    assert "num_attention_heads" in capsys.readouterr().err
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["attention_bias"] = True  # not a Qwen3 layout the converter maps
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    assert main(["convert", "hf-to-mcore", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "o")]) == 2
    assert "attention_bias" in capsys.readouterr().err
    assert main(["convert", "mcore-to-hf", "--mcore", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2


def test_mcore_to_hf_output_loads_with_auto_tokenizer(tmp_path, capsys):
    """The tokenizer and generation config of the HF source travel through the mcore dir, so the export
    is a complete HF model folder (it was weights and config.json only)."""
    from transformers import AutoTokenizer, GenerationConfig

    from tempo_mega.data.tokenizer import build_synthetic_tokenizer

    tok = build_synthetic_tokenizer()
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
    Qwen3ForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    GenerationConfig(max_new_tokens=7, eos_token_id=tok.eos_token_id).save_pretrained(tmp_path / "hf")
    assert main(["convert", "hf-to-mcore", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "mc")]) == 0
    assert main(["convert", "mcore-to-hf", "--mcore", str(tmp_path / "mc"), "--out", str(tmp_path / "back")]) == 0
    back = AutoTokenizer.from_pretrained(tmp_path / "back")
    assert back("1 + 2 = 3")["input_ids"] == tok("1 + 2 = 3")["input_ids"]
    assert GenerationConfig.from_pretrained(tmp_path / "back").max_new_tokens == 7
    # an mcore dir without them (another tool's): --tokenizer names where they are, and it says so otherwise
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / "mc" / name).unlink(missing_ok=True)
    capsys.readouterr()
    assert main(["convert", "mcore-to-hf", "--mcore", str(tmp_path / "mc"), "--out", str(tmp_path / "b2")]) == 0
    assert "--tokenizer" in capsys.readouterr().err
    assert main(["convert", "mcore-to-hf", "--mcore", str(tmp_path / "mc"), "--out", str(tmp_path / "b3"),
                 "--tokenizer", str(tmp_path / "hf")]) == 0
    AutoTokenizer.from_pretrained(tmp_path / "b3")


@pytest.mark.parametrize("tp,ep,expert_tp,grouped", [(1, 1, "tp", False), (2, 2, "tp", False),
                                                      (2, 2, "1", True), (1, 4, "tp", False)])
def test_moe_round_trip_through_files(tmp_path, tp, ep, expert_tp, grouped):
    """Qwen3-MoE: hf-to-mcore at (TP, EP) -> mcore-to-hf writes the checkpoint's per-expert names, which
    transformers loads back into the same model (the same logits, exactly), whatever names the source
    was saved with."""
    from support.models import hf_moe_model, moe_checkpoint_state_dict, tiny_qwen3_moe_config
    from transformers import Qwen3MoeForCausalLM

    model = hf_moe_model(tiny_qwen3_moe_config())
    model.save_pretrained(tmp_path / "hf")
    args = ["convert", "hf-to-mcore", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "mc"),
            "--tp", str(tp), "--ep", str(ep), "--expert-tp", expert_tp] + (["--grouped-gemm"] if grouped else [])
    assert main(args) == 0
    assert len(list((tmp_path / "mc").glob("mcore_tp*_pp*.safetensors"))) == tp * ep
    layout = json.loads((tmp_path / "mc" / "tempo_mcore.json").read_text())
    assert layout == {"tp": tp, "pp": 1, "critic": False, "ep": ep, "expert_tp": expert_tp, "grouped_gemm": grouped}
    assert main(["convert", "mcore-to-hf", "--mcore", str(tmp_path / "mc"), "--out", str(tmp_path / "back")]) == 0
    back = load_file(tmp_path / "back" / "model.safetensors")
    want = moe_checkpoint_state_dict(model)
    assert set(back) == set(want)
    for name, t in want.items():
        assert torch.equal(back[name], t), name
    again = Qwen3MoeForCausalLM.from_pretrained(tmp_path / "back").eval()
    ids = torch.randint(0, 128, (2, 7))
    torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_moe_flags_need_a_moe_model_and_a_dividing_ep(tmp_path, capsys):
    from support.models import hf_moe_model, tiny_qwen3_moe_config

    tiny(False).save_pretrained(tmp_path / "dense")
    assert main(["convert", "hf-to-mcore", "--hf", str(tmp_path / "dense"), "--out", str(tmp_path / "o"),
                 "--ep", "2"]) == 2
    assert "has no experts" in capsys.readouterr().err
    hf_moe_model(tiny_qwen3_moe_config()).save_pretrained(tmp_path / "moe")
    assert main(["convert", "hf-to-mcore", "--hf", str(tmp_path / "moe"), "--out", str(tmp_path / "o"),
                 "--ep", "3"]) == 2
    assert "num_experts=4 is not divisible by --ep 3" in capsys.readouterr().err
