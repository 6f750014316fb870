"""Megatron-core train backend: Qwen3 dense actor and critic under TP/PP/DP.

Nothing heavy is imported here: ``config`` is plain dataclasses, ``convert`` imports megatron.core only
inside the functions that build megatron objects, ``model`` and ``backend`` import it at module level.
"""

from tempo_mega.backends.megatron.config import MegatronConfig

__all__ = ["MegatronConfig"]
