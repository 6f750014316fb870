"""Loading a run config: Hydra composes ``configs/`` with the user's overrides onto every dataclass default
(``load_config``), ``from_dict`` turns the result into a validated ``TrainConfig``, and a mistyped key or
group choice is answered with the nearest real ones (``check_overrides``, ``unknown_key_message``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from tempo_mega.config import TrainConfig, derive_prompt_split, field_of, validate


def known_keys() -> list[str]:
    """Every settable dotted key (the dataclasses', rollout.sglang.* and megatron.* included), for suggestions."""
    def walk(node: Any, prefix: str) -> Iterator[str]:
        for k, v in node.items():
            if isinstance(v, dict) and v:
                yield from walk(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}"

    return sorted(set(walk(to_dict(TrainConfig()), "")))


# names users bring from other trainers, and the key that means it here
_SYNONYMS = {"learning_rate": "lr", "lr_rate": "lr", "max_steps": "total_steps", "num_steps": "total_steps"}


def unknown_key_message(key: str) -> str:
    """``config key 'algo.lerning_rate': no such key; did you mean algo.actor.lr or algo.critic.lr?``:
    difflib's nearest keys, in the same section first, and keys named for a common synonym."""
    import difflib

    keys = known_keys()
    section, leaf = key.split(".", 1)[0], key.rsplit(".", 1)[-1]
    same = [k for k in keys if k.split(".", 1)[0] == section]
    near = []
    for syn in difflib.get_close_matches(leaf, list(_SYNONYMS), n=1, cutoff=0.8):
        near += [k for k in same if k.rsplit(".", 1)[-1] == _SYNONYMS[syn]]
    near += difflib.get_close_matches(key, same, n=3, cutoff=0.6) or difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    near = list(dict.fromkeys(near))[:3]
    hint = f"; did you mean {' or '.join(near)}?" if near else ""
    return f"config key '{key}': no such key{hint}"


def from_dict(raw: dict[str, Any], explicit: set[str] | None = None) -> TrainConfig:
    """Build a TrainConfig from a plain (or OmegaConf) mapping; unknown keys and wrong types raise
    ValueError naming the key. ``explicit``: the dotted keys the user set (load_config passes the
    overrides'); None = every algo key present in ``raw`` (see ``derive_prompt_split``)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    def find_missing(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                find_missing(v, f"{prefix}{k}.")
        elif node == "???":
            raise ValueError(f"config key '{prefix[:-1]}': missing mandatory value (set {prefix[:-1]}=...)")

    plain = OmegaConf.to_container(raw) if isinstance(raw, DictConfig) else dict(raw)
    find_missing(plain, "")
    data = plain.get("data")
    if isinstance(data, dict):  # data.train_files=PATH: one file given as a plain string
        for key in ("train_files", "test_files"):
            if isinstance(data.get(key), str):
                data[key] = [data[key]]
    trainer = plain.get("trainer")
    if isinstance(trainer, dict) and isinstance(trainer.get("resume"), bool):  # trainer.resume=true parses as a bool
        trainer["resume"] = str(trainer["resume"]).lower()
    if explicit is None:
        explicit = {f"algo.{k}" for k in plain.get("algo") or {}}
    derive_prompt_split(plain, explicit)
    raw = plain
    schema = OmegaConf.structured(TrainConfig)

    def writable(node: DictConfig | ListConfig) -> None:  # frozen dataclasses make every node read-only
        OmegaConf.set_readonly(node, False)
        for key in node.keys() if isinstance(node, DictConfig) else range(len(node)):
            child = node._get_node(key)
            if isinstance(child, (DictConfig, ListConfig)):
                writable(child)

    writable(schema)
    try:
        merged = OmegaConf.merge(schema, raw)
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:  # unknown key, wrong type: say which
        key = getattr(e, "full_key", None) or ""
        msg = str(getattr(e, "msg", e)).splitlines()[0]
        if key and "not in" in msg and key not in known_keys():  # an unknown key: suggest the nearest
            raise ValueError(unknown_key_message(key)) from None
        raise ValueError(f"config key '{key}': {msg}") from None
    except ValueError as e:  # an engine config's own check (rollout.sglang.*, megatron.*) names its key
        msg = str(e)
        key = next((k for p in ("rollout.sglang", "megatron") if (k := field_of(msg, p)) != p), "config")
        raise ValueError(f"config key '{key}': {msg}") from None
    return validate(obj)


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """``cfg`` as plain data (what config.json holds; tuples as lists, as JSON and Hydra have them)."""
    def plain(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return [plain(v) for v in x] if isinstance(x, (list, tuple)) else x

    return plain(dataclasses.asdict(cfg))


GROUPS = ("model", "algo", "rollout", "data", "trainer", "experiment")


def group_options(group: str) -> list[str]:
    """The choices of a config group: the names of ``configs/<group>/*.yaml``."""
    from importlib.resources import files

    folder = files("tempo_mega.configs") / group
    return sorted(p.name[:-len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def check_overrides(overrides: list[str]) -> set[str]:
    """Catch what Hydra would report without naming a way out: an unknown group choice (lists the
    choices), an unknown key (suggests the nearest). Returns the dotted keys the overrides set."""
    import difflib

    keys, explicit = None, set()
    for item in overrides:
        name, sep, value = item.partition("=")
        adds = name.startswith("+")
        key = name.lstrip("+~")
        if not sep or key.startswith("hydra"):
            continue
        if key in GROUPS:
            options = group_options(key)
            if value not in options and not (key == "experiment" and value in ("null", "")):
                near = difflib.get_close_matches(value, options, n=1, cutoff=0.5)
                hint = f"; did you mean {key}={near[0]}?" if near else ""
                raise ValueError(f"config group '{key}': no {key}/{value}.yaml; the choices are "
                                 f"{', '.join(options)}{hint}")
            continue
        explicit.add(key)
        if adds:  # '+key=...' adds a key on purpose; from_dict still rejects it if TrainConfig lacks it
            continue
        keys = keys if keys is not None else known_keys()
        if key not in keys and not any(k.startswith(key + ".") for k in keys):
            raise ValueError(unknown_key_message(key))
    return explicit


def load_config(overrides: list[str] | None = None, config_name: str = "train") -> TrainConfig:
    """Compose ``configs/<config_name>.yaml`` with Hydra overrides (``key=value``, ``experiment=...``)."""
    from hydra import compose, initialize_config_module
    from hydra.core.config_store import ConfigStore
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    # every dataclass default as the base layer (rollout.sglang.* and megatron.* included), so any key can be
    # overridden without '+' (model.path is left to the model group: its "???" in a preset must survive)
    defaults = to_dict(TrainConfig())
    del defaults["model"]["path"]
    ConfigStore.instance().store(name="tempo_defaults", node=defaults)
    explicit = check_overrides(list(overrides or []))
    try:
        with initialize_config_module("tempo_mega.configs", version_base=None):
            raw = compose(config_name, overrides=list(overrides or []))
    except (HydraException, OmegaConfBaseException) as e:
        raise ValueError(f"config: {str(e).splitlines()[0]} (overrides: {' '.join(overrides or [])})") from None
    try:
        plain = OmegaConf.to_container(raw, resolve=True)
    except OmegaConfBaseException as e:  # e.g. ${model.path} in rollout/sglang.yaml with model.path unset
        import re

        missing = re.search(r"Missing mandatory value: ([\w.]+)", str(e))
        if missing:
            key = missing.group(1)
            raise ValueError(f"config key '{key}': missing mandatory value (set {key}=...)") from None
        raise ValueError(f"config key '{getattr(e, 'full_key', '')}': {str(e).splitlines()[0]}") from None
    return from_dict(plain, explicit=explicit)
