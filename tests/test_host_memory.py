"""The allocator settings of jaxnas/host_memory.py, each checked on glibc's own counters
in a fresh process where it changes process-wide state."""

import os
import platform
import subprocess
import sys

import pytest

from jaxnas import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC = platform.libc_ver()[0] == 'glibc'
GLIBC_VERSION = tuple(int(v) for v in platform.libc_ver()[1].split('.')[:2]) if GLIBC else ()


def _rss_bytes() -> int:
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


@pytest.mark.skipif(not os.path.exists('/proc/self/statm') or not GLIBC,
                    reason='needs Linux with glibc')
def test_release_host_memory_hands_freed_heap_back():
  # Freed blocks between live ones stay in the process until the heap is trimmed, as a
  # compiler's freed working memory does.
  blocks = [bytearray(2048) for _ in range(100_000)]  # ~200 MB of heap allocations
  survivors = blocks[::64]  # live blocks that keep the freed ones inside the heap
  del blocks
  before = _rss_bytes()
  host_memory.release_host_memory()
  after = _rss_bytes()
  del survivors
  assert host_memory._libc_function('malloc_trim') is not None
  assert before - after > 100e6, (before, after)


# glibc's malloc, free and counters (mallinfo2) for the probe scripts below.
_MALLINFO = """
import ctypes, sys
from jaxnas import host_memory

class MallInfo2(ctypes.Structure):
  _fields_ = [(name, ctypes.c_size_t) for name in (
      'arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks', 'fsmblks', 'uordblks',
      'fordblks', 'keepcost')]

libc = ctypes.CDLL('libc.so.6')
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2
"""

_MMAP_PROBE = _MALLINFO + """
if sys.argv[1] == 'mapped':
  host_memory.map_large_allocations()
libc.free(libc.malloc(8 << 20))  # a mapped block freed: glibc raises its threshold past it
before = libc.mallinfo2().hblkhd  # bytes in mapped blocks
block = libc.malloc(2 << 20)
print(libc.mallinfo2().hblkhd - before)
libc.free(block)
"""


@pytest.mark.skipif(not GLIBC or GLIBC_VERSION < (2, 33),
                    reason='needs glibc 2.33+ (mallinfo2)')
def test_map_large_allocations_keeps_freed_blocks_out_of_the_heap():
  def mapped_bytes(mode):
    out = subprocess.run([sys.executable, '-c', _MMAP_PROBE, mode], cwd=REPO,
                         capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])

  # By default the 2 MiB block comes from the heap once an 8 MiB one has been freed;
  # with the fixed threshold it is mapped, and freeing it unmaps it.
  assert mapped_bytes('default') == 0
  assert mapped_bytes('mapped') >= 2 << 20


_REUSE_PROBE = _MALLINFO + """
host_memory.map_large_allocations()
for call in sys.argv[1:]:
  getattr(host_memory, call)()
before = libc.mallinfo2()
block = libc.malloc(8 << 20)
mapped = libc.mallinfo2().hblkhd - before.hblkhd
libc.free(block)
print(mapped, libc.mallinfo2().arena - before.arena)  # mapped; heap growth kept after free
"""


@pytest.mark.skipif(not GLIBC or GLIBC_VERSION < (2, 33),
                    reason='needs glibc 2.33+ (mallinfo2)')
def test_reuse_freed_allocations_keeps_large_blocks_in_the_heap():
  def probe(*calls):
    out = subprocess.run([sys.executable, '-c', _REUSE_PROBE, *calls], cwd=REPO,
                         capture_output=True, text=True, check=True)
    return tuple(int(v) for v in out.stdout.split()[-2:])

  # Mapped, and gone when freed, while compiling; from the heap, and kept there for the
  # next step's buffers, after reuse_freed_allocations; mapped again after switching back.
  mapped, kept = probe()
  assert mapped >= 8 << 20 and kept < 1 << 20, (mapped, kept)
  mapped, kept = probe('reuse_freed_allocations')
  assert mapped == 0 and kept >= 4 << 20, (mapped, kept)
  mapped, kept = probe('reuse_freed_allocations', 'map_large_allocations')
  assert mapped >= 8 << 20 and kept < 1 << 20, (mapped, kept)


MADVISE = 'always [madvise] never\n'


@pytest.mark.skipif(not GLIBC or GLIBC_VERSION < (2, 35), reason='needs glibc 2.35+')
def test_huge_pages_environ_adds_the_tunable_only_where_it_gains():
  env = host_memory.huge_pages_environ({'PATH': '/bin'}, MADVISE)
  assert env == {'PATH': '/bin', 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}
  # Other tunables are kept; a user's own hugetlb setting wins.
  env = host_memory.huge_pages_environ({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}, MADVISE)
  assert env['GLIBC_TUNABLES'] == 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'
  assert host_memory.huge_pages_environ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'},
                                        MADVISE) is None
  # Kernels that give huge pages always, or never, gain nothing from it.
  assert host_memory.huge_pages_environ({}, '[always] madvise never\n') is None
  assert host_memory.huge_pages_environ({}, 'always madvise [never]\n') is None


_RELAUNCH_PROBE = """
import ctypes, os, sys
from jaxnas import host_memory
print('start', os.environ.get('GLIBC_TUNABLES', ''), flush=True)
host_memory.relaunch_with_huge_pages()
libc = ctypes.CDLL('libc.so.6')
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
block = libc.malloc(64 << 20)  # mapped (above glibc's threshold) and touched
ctypes.memset(block, 1, 64 << 20)
with open('/proc/self/smaps_rollup') as f:
  huge = [int(line.split()[1]) for line in f if line.startswith('AnonHugePages:')][0]
print('huge_kb', huge, sys.argv[1:])
"""


@pytest.mark.skipif(host_memory.huge_pages_environ() is None or
                    not os.path.exists('/proc/self/smaps_rollup'),
                    reason='needs glibc 2.35+ and a kernel with madvise huge pages')
def test_relaunch_restarts_once_with_huge_pages():
  env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  out = subprocess.run([sys.executable, '-c', _RELAUNCH_PROBE, '--flag=1'], cwd=REPO,
                       env=env, capture_output=True, text=True, check=True)
  lines = out.stdout.splitlines()
  # Started once without the tunable, once with it, and the second run kept its arguments.
  assert lines[0] == 'start ' and lines[1] == 'start glibc.malloc.hugetlb=1', lines
  huge_kb, args = lines[2].split(' ', 2)[1:]
  assert args == "['--flag=1']"
  # The 64 MiB block is backed (in part at least) by 2 MiB pages.
  assert int(huge_kb) >= 2048, lines
