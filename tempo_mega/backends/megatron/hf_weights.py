"""HF checkpoints read tensor by tensor, for building sharded models without holding the whole model.

``MegatronBackend`` takes its starting weights as a mapping of HF names to tensors, and each rank reads
only the names of its pipeline stage (and keeps only its tensor-parallel slice of them). A dict of a
loaded ``Qwen3ForCausalLM`` would put the whole model in every rank's memory: at Qwen3-32B in bf16 that
is 64 GB per rank for the actor and as much for the critic, times 8 ranks on a node. These mappings
read a tensor from the safetensors files (memory-mapped) when it is asked for, and forget it after.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor

from tempo_mega.models.critic import VALUE_HEAD_FILE, init_value_head

__all__ = ["CriticWeights", "SafetensorsWeights", "critic_weights", "trunk_weights"]

_INDEX = "model.safetensors.index.json"


class SafetensorsWeights(Mapping[str, Tensor]):
    """The tensors of an HF model directory (``model.safetensors``, or shards listed by
    ``model.safetensors.index.json``), read on access and cast to ``dtype`` (floating tensors only).

    ``prefix`` is put before every stored name: ``"model."`` turns a trunk saved by ``AutoModel``
    (``layers.0...``) into the names of a causal LM (``model.layers.0...``)."""

    def __init__(self, directory: str | Path, *, dtype: torch.dtype | None = None, prefix: str = ""):
        from safetensors import safe_open

        self.directory, self.dtype, self._prefix = Path(directory), dtype, prefix
        index = self.directory / _INDEX
        where: dict[str, Path] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise ValueError(f"{index}: not a safetensors index ({e!r})") from None
            for name, file in weight_map.items():
                where[prefix + name] = self.directory / file
        else:
            paths = sorted(p for p in self.directory.glob("*.safetensors") if p.name != VALUE_HEAD_FILE)
            if not paths:
                raise FileNotFoundError(f"{self.directory}: no *.safetensors weights")
            for path in paths:
                with safe_open(str(path), framework="pt") as f:
                    where.update((prefix + name, path) for name in f.keys())
        self._where = where

    def __getitem__(self, name: str) -> Tensor:
        from safetensors import safe_open

        path = self._where[name]  # KeyError for a name the checkpoint does not have
        with safe_open(str(path), framework="pt") as f:
            t = f.get_tensor(name[len(self._prefix):])
        if self.dtype is not None and t.is_floating_point() and t.dtype != self.dtype:
            t = t.to(self.dtype)
        return t

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


class CriticWeights(Mapping[str, Tensor]):
    """A critic's HF names (the actor's ``model.*`` trunk plus ``value_head.weight`` / ``value_head.bias``)
    over a trunk mapping and a value head: ``trunk`` supplies every ``model.*`` name (its ``lm_head.*``
    and other names are not part of a critic), ``head`` the two value-head tensors."""

    def __init__(self, trunk: Mapping[str, Tensor], head: Mapping[str, Tensor]):
        missing = {"value_head.weight", "value_head.bias"} - set(head)
        if missing:
            raise ValueError(f"CriticWeights: the value head lacks {sorted(missing)}")
        self.trunk, self.head = trunk, head
        self._names = [n for n in trunk if n.startswith("model.")] + ["value_head.weight", "value_head.bias"]

    def __getitem__(self, name: str) -> Tensor:
        if name.startswith("value_head."):
            return self.head[name]
        if not name.startswith("model."):
            raise KeyError(name)
        return self.trunk[name]

    def __contains__(self, name: object) -> bool:
        return name in self.head if str(name).startswith("value_head.") else \
            str(name).startswith("model.") and name in self.trunk

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def trunk_weights(directory: str | Path, *, dtype: torch.dtype | None = None) -> SafetensorsWeights:
    """A decoder trunk under causal-LM names (``model.*``) from a critic directory (the trunk saved by
    ``ValueHeadModel.save_pretrained`` with ``AutoModel`` names, no ``model.``) or an actor directory."""
    weights = SafetensorsWeights(directory, dtype=dtype)
    if any(n.startswith("model.") for n in weights):
        return weights
    return SafetensorsWeights(directory, dtype=dtype, prefix="model.")


def critic_weights(actor: Mapping[str, Tensor], critic_dir: str | Path | None, *, hidden_size: int, seed: int,
                   dtype: torch.dtype | None = None) -> CriticWeights:
    """The critic's starting weights as the torch backend builds them, without loading a model:
    ``critic_dir`` None: the actor's trunk and a fresh value head (``ValueHeadModel``'s seeded init);
    otherwise that directory's trunk (a ``ValueHeadModel.save_pretrained`` directory, or an actor's) and
    its ``value_head.safetensors`` where there is one, a fresh head where not (said in the log)."""
    import logging

    from safetensors.torch import load_file

    if critic_dir is None:
        return CriticWeights(actor, {f"value_head.{k}": v for k, v in init_value_head(hidden_size, seed).items()})
    d = Path(critic_dir)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d}: not a model directory (no config.json)")
    if (d / VALUE_HEAD_FILE).is_file():
        head = {k: v.float() for k, v in load_file(str(d / VALUE_HEAD_FILE)).items()}
    else:
        logging.getLogger(__name__).info("%s has no %s: value head freshly initialized", d, VALUE_HEAD_FILE)
        head = init_value_head(hidden_size, seed)
    return CriticWeights(trunk_weights(d, dtype=dtype), {f"value_head.{k}": v for k, v in head.items()})
