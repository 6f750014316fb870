"""trainer.host_memory: with `retain` a freed large host buffer stays with the process for the next
step; with `system` glibc gives it back (each case in a fresh interpreter: mallopt is process-wide)."""

import subprocess
import sys

import pytest

from tempo_mega.hostmem import apply_host_memory

PROBE = """
import sys, torch
from tempo_mega.hostmem import apply_host_memory
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
took = apply_host_memory(sys.argv[1])
base = rss()
x = torch.ones(256 << 20, dtype=torch.uint8)   # 256 MiB, over glibc's default 32 MB mmap threshold
held = rss() - base
del x
print(took, held >> 20, (rss() - base) >> 20)
"""


def _probe(mode: str) -> tuple[bool, int, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    took, held, after = out.stdout.split()
    return took == "True", int(held), int(after)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/statm and glibc: Linux")
def test_retain_keeps_a_freed_buffer_and_system_returns_it():
    took, held, after = _probe("retain")
    if not took:
        pytest.skip("not glibc: malloc is left as it is")
    assert held >= 250 and after >= 250, (held, after)  # freed, but kept in the heap for the next step
    took, held, after = _probe("system")
    assert not took and held >= 250 and after < 32, (held, after)  # glibc unmaps it at once


def test_unknown_mode_is_an_error_naming_the_key():
    with pytest.raises(ValueError, match="trainer.host_memory"):
        apply_host_memory("cache")
