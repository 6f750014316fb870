"""Small model-side helpers shared by the trainer and the evaluator."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

QWEN3_SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "max_position_embeddings", "rope_theta", "tie_word_embeddings")


QWEN3_MOE_KEYS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob")


def fresh_qwen3_config(model_cfg: Any, tokenizer):
    """The Qwen3 config of a model built from scratch (``model.path`` unset) for this tokenizer: a
    ``Qwen3MoeConfig`` (every layer sparse, no shared expert) when ``model.num_experts`` > 0, else a dense
    ``Qwen3Config``. ``model_cfg`` is a ``config.ModelConfig`` or the ``model`` mapping of a saved run
    config (one saved before the MoE keys existed is dense)."""
    from transformers import Qwen3Config, Qwen3MoeConfig

    get = (lambda k: model_cfg.get(k)) if isinstance(model_cfg, Mapping) else lambda k: getattr(model_cfg, k, None)
    common = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id, bos_token_id=None, **{k: get(k) for k in QWEN3_SHAPE_KEYS})
    if get("num_experts"):
        return Qwen3MoeConfig(**common, **{k: get(k) for k in QWEN3_MOE_KEYS}, decoder_sparse_step=1,
                              mlp_only_layers=[])
    return Qwen3Config(**common)


def stop_token_ids(tokenizer, model=None) -> tuple[int, ...]:
    """EOS, ``<|im_end|>`` and ``<|endoftext|>`` where the vocabulary has them, and the model's
    generation-config EOS ids."""
    stops = {tokenizer.eos_token_id}
    for special in ("<|im_end|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(special)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            stops.add(tid)
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stops.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    stops.discard(None)
    return tuple(sorted(stops))
