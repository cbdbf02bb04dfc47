"""The allocator settings the command line applies: freed activations stay in the process.

What the settings save (page faults, step time) depends on the machine and its load, so it is
measured by benchmarks, not here; these tests check the settings themselves.
"""

import ctypes
import subprocess
import sys
import textwrap

import pytest

import vitkit.allocator as allocator


class FakeMallopt:
    """A C function mallopt that records its calls and answers with the given result (1: accepted)."""

    def __init__(self, result: int) -> None:
        self.calls: list[tuple[int, int]] = []
        self.result = result
        self.argtypes = None

    def __call__(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.result


class FakeLibc:
    def __init__(self, result: int = 1) -> None:
        self.mallopt = FakeMallopt(result)
        self.calls = self.mallopt.calls


def test_keep_freed_memory_sets_the_allocator_options_it_promises(monkeypatch):
    """mallopt(M_MMAP_THRESHOLD, 32 MiB), glibc's ceiling, so blocks up to it come from the heap and
    are reused, and mallopt(M_TRIM_THRESHOLD, -1), so the heap is never trimmed (mallopt(3))."""
    libc = FakeLibc()
    monkeypatch.setattr(ctypes, "CDLL", lambda name: libc)
    assert allocator.keep_freed_memory() is True
    assert libc.calls == [(-3, 32 * 2**20), (-1, -1)]  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD from malloc.h
    assert libc.mallopt.argtypes == [ctypes.c_int, ctypes.c_int]  # ints, as the C prototype has them


def test_keep_freed_memory_reports_a_c_library_that_refuses_or_lacks_mallopt(monkeypatch):
    refusing = FakeLibc(result=0)
    monkeypatch.setattr(ctypes, "CDLL", lambda name: refusing)
    assert allocator.keep_freed_memory() is False

    class NoMallopt:  # musl, macOS: no such symbol
        def __getattr__(self, name):
            raise AttributeError(name)

    monkeypatch.setattr(ctypes, "CDLL", lambda name: NoMallopt())
    assert allocator.keep_freed_memory() is False

    def unloadable(name):
        raise OSError("no C library")

    monkeypatch.setattr(ctypes, "CDLL", unloadable)
    assert allocator.keep_freed_memory() is False


def test_glibc_accepts_the_settings_in_a_fresh_process():
    """On the real C library (in a process of its own: the settings last for the process): glibc takes
    both options; elsewhere the call says it changed nothing."""
    code = textwrap.dedent("""
        import platform
        from vitkit.allocator import keep_freed_memory
        print(platform.libc_ver()[0] or "other", keep_freed_memory())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    libc, done = out.stdout.split()
    if libc != "glibc":
        pytest.skip(f"the C library is {libc}, not glibc; keep_freed_memory changes nothing here")
    assert done == "True"
