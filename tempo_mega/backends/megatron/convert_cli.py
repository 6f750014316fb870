"""``tempo-mega convert``: HF <-> megatron-core directories, through ``convert.py``'s exact mappings."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from torch import Tensor

from tempo_mega.backends.megatron.convert import (
    _get,
    hf_to_mcore_state_dict,
    mcore_to_hf_state_dict,
    validate_hf_config,
)
from tempo_mega.backends.megatron.convert_moe import is_moe

# ---------------------------------------------------------------------------------------------- CLI
MCORE_LAYOUT_FILE = "tempo_mcore.json"


def _shard_file(tp_rank: int, pp_rank: int, ep_rank: int | None = None) -> str:
    ep = "" if ep_rank is None else f"_ep{ep_rank:02d}"
    return f"mcore_tp{tp_rank:02d}_pp{pp_rank:02d}{ep}.safetensors"


def _read_hf_dir(src: Path, critic: bool) -> Mapping[str, Tensor]:
    """HF tensors of an actor dir (``Qwen3ForCausalLM`` names) or a critic dir (the trunk saved by
    ``ValueHeadModel.save_pretrained``, names without ``model.``, plus ``value_head.safetensors``),
    read from the files as they are asked for."""
    from safetensors.torch import load_file

    from tempo_mega.backends.megatron.hf_weights import CriticWeights, SafetensorsWeights, trunk_weights
    from tempo_mega.models.critic import VALUE_HEAD_FILE

    if not critic:
        return SafetensorsWeights(src)
    head = src / VALUE_HEAD_FILE
    if not head.is_file():
        raise FileNotFoundError(f"{src}: --critic needs {VALUE_HEAD_FILE} (a critic saved by tempo-mega)")
    return CriticWeights(trunk_weights(src), {f"value_head.{k}": v for k, v in load_file(head).items()})


# What makes an HF folder loadable beyond its weights and config.json: the tokenizer (every format
# transformers writes or reads) and the generation config. Carried hf -> mcore -> hf unchanged.
HF_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                 "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
                 "generation_config.json")


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer and generation-config files ``src`` has into ``dst``; returns their names."""
    import shutil

    copied = []
    for name in HF_SIDE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def main(argv: Sequence[str] | None = None) -> int:
    """``tempo-mega convert hf-to-mcore --hf DIR --out DIR [--tp N --pp M] [--critic]`` (Qwen3-MoE also
    ``[--ep K] [--expert-tp 1] [--grouped-gemm]``) and ``tempo-mega convert mcore-to-hf --mcore DIR --out DIR``.

    The mcore directory holds one safetensors file per (TP rank, PP stage[, EP rank]) with megatron names,
    ``config.json`` (the HF config, checked before converting) and ``tempo_mcore.json`` (layout).
    Both directions are exact: a round trip reproduces every tensor bit for bit. Dist-checkpoints
    for resuming at any layout are written and read by ``MegatronBackend.save/load``."""
    import json

    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    from tempo_mega.models.critic import VALUE_HEAD_FILE

    parser = argparse.ArgumentParser(prog="tempo-mega convert")
    sub = parser.add_subparsers(dest="direction", required=True)
    h2m = sub.add_parser("hf-to-mcore", help="HF Qwen3 dir -> megatron shards")
    h2m.add_argument("--hf", required=True, help="HF checkpoint dir (actor, or critic with --critic)")
    h2m.add_argument("--out", required=True)
    h2m.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    h2m.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    h2m.add_argument("--critic", action="store_true", help="a critic dir: trunk + value_head.safetensors")
    h2m.add_argument("--ep", type=int, default=1, help="expert-parallel size (Qwen3-MoE)")
    h2m.add_argument("--expert-tp", choices=("tp", "1"), default="tp",
                     help="experts split over TP (tp, megatron's default) or whole on every TP rank (1)")
    h2m.add_argument("--grouped-gemm", action="store_true", help="the grouped-GEMM expert layout (TEGroupedMLP)")
    m2h = sub.add_parser("mcore-to-hf", help="megatron shards -> HF dir")
    m2h.add_argument("--mcore", required=True)
    m2h.add_argument("--out", required=True)
    m2h.add_argument("--tokenizer", default=None,
                     help="HF dir to take the tokenizer and generation config from (default: the --mcore dir, "
                          "where hf-to-mcore put the source's)")
    args = parser.parse_args(argv)

    if args.direction == "hf-to-mcore":
        src, dst = Path(args.hf), Path(args.out)
        if not (src / "config.json").is_file():
            raise FileNotFoundError(f"{src}: no config.json (not an HF checkpoint dir)")
        hf_config = AutoConfig.from_pretrained(src)
        validate_hf_config(hf_config)  # a mismatching config stops here, naming the field
        if args.tp < 1 or args.pp < 1:
            raise ValueError(f"--tp and --pp must be >= 1, got {args.tp} and {args.pp}")
        for key, n in (("num_attention_heads", args.tp), ("num_key_value_heads", args.tp),
                       ("num_hidden_layers", args.pp)):
            if _get(hf_config, key) % n:
                raise ValueError(f"{src}/config.json: {key}={_get(hf_config, key)} is not divisible by "
                                 f"{'--tp' if key != 'num_hidden_layers' else '--pp'} {n}")
        sparse = is_moe(hf_config)
        if not sparse and (args.ep != 1 or args.expert_tp != "tp" or args.grouped_gemm):
            raise ValueError(f"{src}/config.json: --ep, --expert-tp and --grouped-gemm are for Qwen3-MoE; "
                             f"model_type={_get(hf_config, 'model_type')!r} has no experts")
        if sparse and (args.ep < 1 or _get(hf_config, "num_experts") % args.ep):
            raise ValueError(f"{src}/config.json: num_experts={_get(hf_config, 'num_experts')} is not divisible "
                             f"by --ep {args.ep}")
        hf_sd = _read_hf_dir(src, args.critic)
        dst.mkdir(parents=True, exist_ok=True)
        eps = list(range(args.ep)) if sparse and args.ep > 1 else [None]
        for p in range(args.pp):
            for e in eps:
                for r in range(args.tp):
                    shard = hf_to_mcore_state_dict(hf_sd, hf_config, r, args.tp, pp_rank=p, pp_size=args.pp,
                                                   ep_rank=e or 0, ep_size=args.ep, expert_tp=args.expert_tp == "tp",
                                                   grouped_gemm=args.grouped_gemm)
                    save_file({k: v.contiguous() for k, v in shard.items()}, dst / _shard_file(r, p, e))
        hf_config.save_pretrained(dst)
        copy_side_files(src, dst)  # so that mcore-to-hf can give them back
        layout = {"tp": args.tp, "pp": args.pp, "critic": args.critic}
        if sparse:
            layout.update(ep=args.ep, expert_tp=args.expert_tp, grouped_gemm=args.grouped_gemm)
        (dst / MCORE_LAYOUT_FILE).write_text(json.dumps(layout))
        moe_note = f", EP {args.ep}" if sparse else ""
        print(f"convert hf-to-mcore: {src} -> {dst} (TP {args.tp}, PP {args.pp}{moe_note}"
              f"{', critic' if args.critic else ''})")
        return 0

    src, dst = Path(args.mcore), Path(args.out)
    layout_file = src / MCORE_LAYOUT_FILE
    if not layout_file.is_file():
        raise FileNotFoundError(f"{src}: no {MCORE_LAYOUT_FILE} (not written by tempo-mega convert hf-to-mcore)")
    layout = json.loads(layout_file.read_text())
    hf_config = AutoConfig.from_pretrained(src)
    hf_sd = {}
    ep = int(layout.get("ep", 1))
    for p in range(layout["pp"]):
        for e in range(ep):
            shards = [load_file(src / _shard_file(r, p, e if ep > 1 else None)) for r in range(layout["tp"])]
            hf_sd.update(mcore_to_hf_state_dict(shards, hf_config, pp_rank=p, pp_size=layout["pp"], ep_rank=e,
                                                ep_size=ep, expert_tp=layout.get("expert_tp", "tp") == "tp"))
    dst.mkdir(parents=True, exist_ok=True)
    hf_config.save_pretrained(dst)
    if layout["critic"]:  # the layout ValueHeadModel.from_pretrained reads
        trunk = {k.removeprefix("model."): v.contiguous() for k, v in hf_sd.items() if not k.startswith("value_head.")}
        save_file(trunk, dst / "model.safetensors")
        save_file({k.removeprefix("value_head."): v.contiguous() for k, v in hf_sd.items()
                   if k.startswith("value_head.")}, dst / VALUE_HEAD_FILE)
    else:
        save_file({k: v.contiguous() for k, v in hf_sd.items()}, dst / "model.safetensors", metadata={"format": "pt"})
    side = Path(args.tokenizer) if args.tokenizer else src
    if args.tokenizer and not side.is_dir():
        raise FileNotFoundError(f"--tokenizer {side}: no such directory")
    copied = copy_side_files(side, dst)
    if not any(name.startswith("tokenizer") for name in copied):
        print(f"convert mcore-to-hf: warning: {side} has no tokenizer files, so {dst} does not load with "
              "AutoTokenizer; pass --tokenizer HF_DIR", file=sys.stderr)
    print(f"convert mcore-to-hf: {src} -> {dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
