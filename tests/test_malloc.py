"""The backbone's freed activations stay in the process for the next batch (glibc's malloc)."""

import json
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from skpatchcore import _malloc

from _helpers import small_transformer

on_glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                              reason="the allocator settings apply to glibc's malloc only")


class RecordingMallopt:
    def __init__(self):
        self.calls = []

    def __call__(self, parameter, value):
        self.calls.append((parameter, value))
        return 1


@pytest.fixture
def recorded(monkeypatch):
    recorder = RecordingMallopt()
    monkeypatch.setattr(_malloc, "_mallopt", lambda: recorder)
    monkeypatch.setattr(_malloc, "_active", 0)
    return recorder


@pytest.mark.parametrize("environ, chose", [
    ({}, False),
    ({"PATH": "/usr/bin", "LD_PRELOAD": ""}, False),
    ({"SKPATCHCORE_REUSE_FREED_MEMORY": "0"}, True),
    ({"SKPATCHCORE_REUSE_FREED_MEMORY": "off"}, True),
    ({"SKPATCHCORE_REUSE_FREED_MEMORY": "1"}, False),
    ({"MALLOC_ARENA_MAX": "2"}, True),
    ({"MALLOC_TRIM_THRESHOLD_": "131072"}, True),
    ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}, True),
    ({"GLIBC_TUNABLES": "glibc.pthread.rseq=0"}, False),
    ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, True),
    ({"LD_PRELOAD": "libtcmalloc_minimal.so.4"}, True),
])
def test_the_users_own_allocator_settings_are_left_alone(environ, chose):
    assert _malloc._user_chose_allocator(environ) is chose


def test_blocks_serve_large_allocations_from_the_heap_until_the_last_one_ends(recorded):
    with _malloc.reuse_freed_memory():
        with _malloc.reuse_freed_memory():
            assert recorded.calls == [(_malloc.M_MMAP_MAX, 0)]
        assert recorded.calls == [(_malloc.M_MMAP_MAX, 0)]
    assert recorded.calls == [(_malloc.M_MMAP_MAX, 0), (_malloc.M_MMAP_MAX, _malloc.DEFAULT_MMAP_MAX)]
    with pytest.raises(RuntimeError, match="inside"):
        with _malloc.reuse_freed_memory():
            raise RuntimeError("inside")
    assert recorded.calls[-1] == (_malloc.M_MMAP_MAX, _malloc.DEFAULT_MMAP_MAX) and _malloc._active == 0


def test_without_glibc_settings_the_block_changes_nothing(monkeypatch):
    monkeypatch.setattr(_malloc, "_mallopt", lambda: None)
    monkeypatch.setattr(_malloc, "_active", 0)
    with _malloc.reuse_freed_memory():
        assert _malloc._active == 0


@pytest.mark.parametrize("tile_size", [None, 32])
def test_cpu_forward_passes_run_inside_the_block(recorded, tile_size):
    transformer = small_transformer(tile_size=tile_size, batch_size=2).fit(None)
    images = np.random.default_rng(0).integers(0, 256, size=(3, 64, 64, 3), dtype=np.uint8)
    transformer.transform(images)
    n_batches = 2 if tile_size is None else 6  # 3 images, or 12 tiles, in batches of 2
    assert recorded.calls == [(_malloc.M_MMAP_MAX, 0), (_malloc.M_MMAP_MAX, _malloc.DEFAULT_MMAP_MAX)] * n_batches


FAULTS_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    from _helpers import small_transformer
    from skpatchcore import _malloc

    # ResNet-18's first activation for 4 images of 384 px is 36 MiB: above glibc's mmap ceiling.
    transformer = small_transformer(resize=384, batch_size=4, n_jobs=1).fit(None)
    images = np.random.default_rng(0).integers(0, 256, size=(4, 384, 384, 3), dtype=np.uint8)

    def page_faults_of_later_passes():
        transformer.transform(images)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(2):
            transformer.transform(images)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    reuse = _malloc._mallopt
    _malloc._mallopt = lambda: None  # glibc's own settings first: the block changes nothing
    system = page_faults_of_later_passes()
    _malloc._mallopt = reuse
    print(json.dumps([system, page_faults_of_later_passes()]))
""")


@on_glibc
def test_forward_passes_reuse_the_memory_of_earlier_ones(tmp_path):
    # Each page the kernel maps afresh is a page fault; kept memory is reused without one.
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    completed = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT, str(Path(__file__).parent)], env=env,
                               cwd=tmp_path, capture_output=True, text=True, check=True, timeout=300)
    system, reused = json.loads(completed.stdout.strip().splitlines()[-1])
    assert system > 20_000
    assert reused * 4 < system
