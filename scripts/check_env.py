#!/usr/bin/env python
"""Check this environment for tempo-mega: versions, GPUs, and which features work.

    python scripts/check_env.py [--json] [--require FEATURE,...]

The logic is tempo_mega/doctor.py (also `python -m tempo_mega.doctor`). It is loaded from this
checkout by file path, so the check runs even where tempo_mega is not installed or its imports are
broken, and without putting the repository root on sys.path (that would expose kernels/ as a
top-level `kernels` module, a name transformers probes for).
"""

import importlib.util
import sys
from pathlib import Path


def _load_doctor():
    path = Path(__file__).resolve().parents[1] / "tempo_mega" / "doctor.py"
    if path.is_file():
        spec = importlib.util.spec_from_file_location("tempo_mega_doctor", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up by name
        spec.loader.exec_module(module)
        return module
    import tempo_mega.doctor as module  # the script was copied away from its checkout

    return module


if __name__ == "__main__":
    sys.exit(_load_doctor().main(sys.argv[1:]))
