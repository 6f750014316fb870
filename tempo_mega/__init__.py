"""tempo-mega: test-time training of reasoning LLMs as expectation-maximization (TEMPO).

Importing this package pulls no CUDA library: heavy engines (megatron.core, transformer_engine,
sglang, triton, pynvml, wandb) are imported only by the modules that need them.
"""

__version__ = "0.1.0"

import os as _os
import sys as _sys


def checkout_root() -> str | None:
    """The repository checkout this package is imported from (it holds ``kernels/`` at its top, installed
    only as ``tempo_mega.kernels``), or None for an installed copy."""
    root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    ours = _os.path.isfile(_os.path.join(root, "kernels", "__init__.py")) and _os.path.isfile(
        _os.path.join(root, "pyproject.toml"))
    return root if ours else None


def _hide_checkout_root() -> None:
    """Run from the checkout's top (``python -m tempo_mega.cli``, torchrun, an sbatch script started
    there), Python puts that folder first on sys.path, and ``kernels/`` then shadows the ``kernels``
    package transformers imports (ImportError: cannot import name ... from 'kernels'). The package
    itself is found through its installation, so the folder is taken off the path."""
    root = checkout_root()
    if root is not None:
        _sys.path[:] = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != root]


_hide_checkout_root()
