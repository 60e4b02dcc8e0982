import ctypes
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core import dist

ROOT = Path(__file__).resolve().parents[2]

# In a fresh interpreter: apply the setting or not, then allocate a 30 MB tensor and report
# whether glibc served it with its own mmap (mallinfo2's count of mmapped blocks).
PROBE = """
import ctypes, json, sys, torch
from core import dist

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
applied = dist.keep_freed_cpu_memory(sys.argv[1] == "on")
before = libc.mallinfo2().hblks
x = torch.ones(30 * 2**20 // 4)
print(json.dumps({"applied": applied, "mmapped": libc.mallinfo2().hblks - before}))
"""


def probe(setting: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", PROBE, setting], cwd=ROOT, env={**clean, **env},
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc" or not hasattr(ctypes.CDLL(None), "mallinfo2"),
    reason="needs glibc >= 2.33",
)
def test_keep_freed_memory_serves_large_tensors_from_the_heap_unless_off_or_the_user_tuned_malloc():
    assert probe("on") == {"applied": True, "mmapped": 0}
    # the probe can tell: without the setting glibc maps a block this large on its own
    assert probe("off") == {"applied": False, "mmapped": 1}
    assert probe("on", MALLOC_ARENA_MAX="2") == {"applied": False, "mmapped": 1}  # the user's settings win


def test_keep_freed_memory_is_only_for_the_cpu(monkeypatch):
    monkeypatch.setattr(dist, "device", lambda: torch.device("cuda", 0))
    assert dist.keep_freed_cpu_memory(True) is False
