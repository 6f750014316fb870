#!/usr/bin/env python
"""TEMPO vs frozen critic vs TTRL vs EMPO vs supervised continuation at toy scale (see tempo_mega/study.py)."""

import sys

from tempo_mega.study import main

if __name__ == "__main__":
    sys.exit(main())
