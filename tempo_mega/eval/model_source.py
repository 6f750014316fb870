"""The model ``tempo-mega eval`` evaluates: where its weights, architecture and tokenizer are, and loading it.

``resolve_model`` accepts an HF directory, a checkpoint's ``step_*/actor`` (or ``step_*``) directory, or a
run directory (its ``hf/actor`` export or one of its complete checkpoints, picked by ``checkpoint``), and
returns a ``ModelSource``; for a checkpoint the architecture comes from the run's ``hf/actor`` or its
``config.json`` (the fresh Qwen3 the trainer builds when ``model.path`` is None), the tokenizer from
``hf/actor``, the run's config or the built-in synthetic one. ``load_model_and_tokenizer`` turns a
``ModelSource`` into an eval-mode causal LM and its tokenizer (torch, transformers and safetensors are
imported only then).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tempo_mega.models import fresh_qwen3_config

DTYPES = ("auto", "float32", "bfloat16", "float16")

# ---------------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelSource:
    """What ``resolve_model`` found. ``weights``: an HF directory (``kind="hf"``) or a checkpoint's
    ``actor`` directory (``kind="checkpoint"``: ``model.safetensors`` without a ``config.json``).
    For a checkpoint, the architecture comes from ``config_dir`` (the run's ``hf/actor``) when there is
    one, else from the run's ``config.json`` (``run_config``). ``tokenizer``: a tokenizer directory, or
    None for the built-in synthetic tokenizer (a run trained with it)."""

    weights: Path
    kind: str
    tokenizer: Path | None
    config_dir: Path | None = None
    run_config: Path | None = None

    def describe(self) -> str:
        tok = str(self.tokenizer) if self.tokenizer is not None else "built-in synthetic tokenizer"
        return f"{self.weights} ({self.kind}; tokenizer: {tok})"


def _json(path: Path) -> Any:
    from tempo_mega.checkpoint import load_json

    return load_json(path)


def _is_hf_dir(d: Path) -> bool:
    cfg = d / "config.json"
    return cfg.is_file() and isinstance(data := _json(cfg), dict) and "model_type" in data


def _has_tokenizer(d: Path) -> bool:
    return any((d / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def _checkpoint_source(actor: Path, run_dir: Path, tokenizer: Path | None) -> ModelSource:
    state_file = actor / "backend_state.json"
    if state_file.is_file() and _json(state_file).get("role", "actor") != "actor":
        raise ValueError(f"{actor}: a {_json(state_file)['role']} checkpoint, not the actor")
    if not (actor / "model.safetensors").is_file():
        raise FileNotFoundError(f"{actor}: no model.safetensors (an incomplete checkpoint?)")
    export = run_dir / "hf" / "actor"
    config_dir = export if _is_hf_dir(export) else None
    run_config = next((p for p in (actor.parent / "config.json", run_dir / "config.json") if p.is_file()), None)
    if config_dir is None and run_config is None:
        raise FileNotFoundError(
            f"{actor}: a checkpoint, but neither {export}/config.json nor the run's config.json says "
            "which model it holds"
        )
    if tokenizer is None:
        if config_dir is not None and _has_tokenizer(config_dir):
            tokenizer = config_dir
        else:  # as the trainer chose it: model.tokenizer_path, model.path, or the synthetic tokenizer
            model_cfg = _json(run_config).get("model", {}) if run_config is not None else {}
            chosen = model_cfg.get("tokenizer_path") or model_cfg.get("path")
            if chosen is not None and not Path(chosen).is_dir():
                raise FileNotFoundError(
                    f"{run_config}: the run's tokenizer {chosen} is not a directory here; pass --tokenizer"
                )
            tokenizer = Path(chosen) if chosen is not None else None
    return ModelSource(actor, "checkpoint", tokenizer, config_dir, run_config)


def _pick_run_checkpoint(run_dir: Path, checkpoint: str) -> tuple[str, Path]:
    from tempo_mega.checkpoint import COMPLETE_MARKER, list_checkpoints

    export = run_dir / "hf" / "actor"
    has_export = _is_hf_dir(export)
    steps = list_checkpoints(run_dir / "checkpoints")
    if checkpoint == "hf":
        if not has_export:
            raise FileNotFoundError(f"{run_dir}: no HF export at {export} (the run has not finished?)")
        return "hf", export
    if checkpoint == "latest":
        if not steps:
            raise FileNotFoundError(f"{run_dir}: no complete checkpoint under {run_dir / 'checkpoints'}")
        return "checkpoint", steps[-1][1] / "actor"
    if checkpoint != "auto":
        digits = checkpoint.removeprefix("step_")
        if not digits.isdigit():
            raise ValueError(f"checkpoint must be auto, hf, latest or a step number, got {checkpoint!r}")
        found = [p for s, p in steps if s == int(digits)]
        if not found:
            raise FileNotFoundError(
                f"{run_dir}: no complete checkpoint of step {int(digits)} (have: {[s for s, _ in steps]})"
            )
        return "checkpoint", found[0] / "actor"
    # auto: the export of a finished run, unless a checkpoint was written after it (a resumed run)
    if has_export and (
        not steps
        or (export / "config.json").stat().st_mtime >= (steps[-1][1] / COMPLETE_MARKER).stat().st_mtime
    ):
        return "hf", export
    if steps:
        return "checkpoint", steps[-1][1] / "actor"
    raise FileNotFoundError(f"{run_dir}: a run directory without hf/actor or a complete checkpoint")


def resolve_model(path: str | Path, *, checkpoint: str = "auto", tokenizer: str | Path | None = None) -> ModelSource:
    """Find the weights, architecture and tokenizer to evaluate at ``path``:

    - an HF directory (a ``config.json`` with a ``model_type``): itself, tokenizer included;
    - a checkpoint's ``step_*/actor`` directory or its ``step_*`` directory;
    - a run directory (``hf/actor`` and/or ``checkpoints/``), by ``checkpoint``: ``"auto"`` (the ``hf/actor``
      export, unless the newest complete checkpoint is newer than it), ``"hf"``, ``"latest"``, or a step
      number (``"120"`` / ``"step_00000120"``).

    A checkpoint takes its architecture from the run's ``hf/actor`` (else the run's ``config.json``), and
    its tokenizer from ``hf/actor`` (else the tokenizer the run's config names, else the synthetic one).
    ``tokenizer`` overrides the tokenizer directory in every case.
    """
    p = Path(path)
    tok = Path(tokenizer) if tokenizer is not None else None
    if tok is not None and not _has_tokenizer(tok):
        raise FileNotFoundError(f"--tokenizer {tok}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
    if not p.exists():
        raise FileNotFoundError(f"model path {p} does not exist")
    if _is_hf_dir(p):
        if tok is None and not _has_tokenizer(p):
            raise FileNotFoundError(f"{p}: an HF model directory without a tokenizer; pass --tokenizer DIR")
        return ModelSource(p, "hf", tok or p)
    if (p / "backend_state.json").is_file() or (p / "model.safetensors").is_file():  # step_*/actor
        return _checkpoint_source(p, p.parent.parent.parent, tok)
    if (p / "actor" / "model.safetensors").is_file():  # step_*
        return _checkpoint_source(p / "actor", p.parent.parent, tok)
    if (p / "hf" / "actor").is_dir() or (p / "checkpoints").is_dir():
        kind, weights = _pick_run_checkpoint(p, checkpoint)
        if kind == "hf":
            return resolve_model(weights, tokenizer=tok)
        return _checkpoint_source(weights, p, tok)
    raise FileNotFoundError(
        f"{p}: not an HF model directory (config.json with model_type), a checkpoint (step_*/actor) "
        "or a run directory (hf/actor, checkpoints/)"
    )


def _torch_dtype(name: str, source: ModelSource):
    import torch

    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    if name == "auto":
        if source.kind == "hf":
            return "auto"  # what the directory's config.json says
        if source.config_dir is not None:
            name = _json(source.config_dir / "config.json").get("dtype") or "float32"
        else:
            name = _json(source.run_config).get("model", {}).get("dtype", "float32")
    return getattr(torch, name)


def load_model_and_tokenizer(source: ModelSource, dtype: str = "auto"):
    """(causal LM in eval mode, tokenizer) for a ``ModelSource``."""
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from tempo_mega.data.tokenizer import build_synthetic_tokenizer

    hf_logging.disable_progress_bar()

    tok = AutoTokenizer.from_pretrained(source.tokenizer) if source.tokenizer else build_synthetic_tokenizer()
    torch_dtype = _torch_dtype(dtype, source)
    if source.kind == "hf":
        model = AutoModelForCausalLM.from_pretrained(source.weights, dtype=torch_dtype, attn_implementation="sdpa")
        return model.eval(), tok
    if source.config_dir is not None:
        config = AutoConfig.from_pretrained(source.config_dir)
    else:
        m = _json(source.run_config).get("model", {})
        if m.get("path"):
            config = AutoConfig.from_pretrained(m["path"])
        else:  # the fresh Qwen3 the trainer builds when model.path is None (build.build_models)
            config = fresh_qwen3_config(m, tok)
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, attn_implementation="sdpa")
    weights = source.weights / "model.safetensors"
    try:
        load_model(model, str(weights), strict=True)
    except RuntimeError as e:
        raise ValueError(f"{weights}: does not fit the model described by "
                         f"{source.config_dir or source.run_config}: {str(e).splitlines()[0]}") from None
    return model.eval(), tok
