"""Host memory of a jaxnas process: how the C allocator serves XLA's compiler and steps.

XLA:CPU takes its working memory and every step's buffers from the C allocator, whose
defaults suit neither: compiling frees many large blocks that glibc then keeps, and every
step allocates and frees its buffers, each time touching fresh pages. A run therefore
switches the allocator's settings by phase: ``map_large_allocations`` before compiling,
``release_host_memory`` after it, ``reuse_freed_allocations`` for the steps. The largest
buffers of a step are still mapped anew each time; ``relaunch_with_huge_pages`` restarts
the command-line process with glibc backing those by transparent huge pages.

Each function is a no-op where the C library or the kernel lacks the setting.
"""

import ctypes
import ctypes.util
import functools
import gc
import os
import platform
import sys


@functools.cache
def _libc_function(name: str):
  """glibc's function ``name`` (malloc_trim, mallopt), or None where the C library has
  none (macOS, musl)."""
  try:
    return getattr(ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6'), name)
  except (OSError, AttributeError):
    return None


# glibc's mallopt parameters (malloc.h) and their defaults.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 << 10, 65536


def map_large_allocations(threshold: int = 1 << 20) -> None:
  """Has the C allocator serve blocks of ``threshold`` bytes and more by ``mmap``, so
  that freeing one returns its memory to the system at once: for compiling.

  glibc starts at 128 KiB but raises the threshold, up to 32 MiB, each time a mapped
  block is freed, after which such blocks come from the heaps and, once freed, stay
  there for later requests that often do not fit them. XLA's compiler allocates and frees
  many blocks of that size: compiling the PC-DARTS CIFAR search step at batch 64 on a
  2-core CPU peaks at 3.7 GB of resident memory, 3.2 GB with a fixed 1 MiB threshold, in
  about the same time. Undoes ``reuse_freed_allocations``. A no-op where the C library
  has no such setting."""
  mallopt = _libc_function('mallopt')
  if mallopt is not None:
    mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
    mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
    mallopt(_M_MMAP_THRESHOLD, threshold)


def reuse_freed_allocations() -> None:
  """Has the C allocator serve every block from its heaps and keep freed memory there
  for the next requests: for running compiled steps, after compiling.

  A compiled step allocates its buffers when it starts and frees them when it ends. A
  mapped block is unmapped when freed, so the next step gets fresh pages and takes a page
  fault at the first touch of each: about 600k faults (1 s of system time) per PC-DARTS
  CIFAR search step at batch 64 on a 2-core CPU, half as many when the heaps keep their
  memory, and the step 9 % faster. (glibc still maps a block larger than a thread's heap
  can grow, such as that step's 1.25 GB of XLA buffers.) Undone by
  ``map_large_allocations``; a no-op where the C library has no such setting."""
  mallopt = _libc_function('mallopt')
  if mallopt is not None:
    mallopt(_M_MMAP_MAX, 0)
    mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)


def release_host_memory() -> None:
  """Hands freed host memory back to the operating system.

  XLA's compiler frees its working memory when a compilation ends, but the C allocator
  keeps it in the process, so a search would hold its compile-time peak for its whole
  run. Called after the state is created and after the steps are compiled. On a 2-core
  CPU with the PC-DARTS CIFAR step loaded from the compilation cache, the resident memory
  before the first step goes from 3.6 GB to 1.9 GB."""
  gc.collect()
  trim = _libc_function('malloc_trim')
  if trim is not None:
    trim(0)


# glibc's tunable (2.35+) that asks the kernel for transparent huge pages for the blocks
# it maps and the heaps it grows.
HUGE_PAGES_TUNABLE = 'glibc.malloc.hugetlb=1'
_THP_SETTING = '/sys/kernel/mm/transparent_hugepage/enabled'


def huge_pages_environ(environ=None, thp_setting: str | None = None) -> dict | None:
  """``environ`` (default: this process's) with ``HUGE_PAGES_TUNABLE`` added to
  GLIBC_TUNABLES, or None where a process started with it would gain nothing: not glibc
  2.35+, the kernel gives huge pages only on request ('madvise') and never or always
  otherwise, or GLIBC_TUNABLES already sets ``glibc.malloc.hugetlb`` (a user's choice,
  kept). ``thp_setting``: the kernel's transparent-huge-page mode line (read if None)."""
  environ = os.environ if environ is None else environ
  tunables = environ.get('GLIBC_TUNABLES', '')
  name, version = platform.libc_ver()
  if (name != 'glibc' or tuple(int(v) for v in version.split('.')[:2]) < (2, 35)
      or 'glibc.malloc.hugetlb' in tunables):
    return None
  if thp_setting is None:
    try:
      with open(_THP_SETTING) as f:
        thp_setting = f.read()
    except OSError:
      return None
  if '[madvise]' not in thp_setting:
    return None
  tunables = ':'.join(t for t in (tunables, HUGE_PAGES_TUNABLE) if t)
  return dict(environ, GLIBC_TUNABLES=tunables)


def relaunch_with_huge_pages() -> None:
  """Restarts this process (the same command line, ``sys.orig_argv``) with
  ``HUGE_PAGES_TUNABLE`` set, where ``huge_pages_environ`` says that gains something;
  returns where it does not. glibc reads its tunables only when a process starts.

  For a command-line run, before anything else. A search step frees its largest block
  (XLA's buffers: 1.25 GB for the PC-DARTS CIFAR step at batch 64) at its end and maps it
  anew at the next, and with 4 KiB pages every step then takes some 300k page faults. With
  huge pages that step went from 2.72 to 2.41 s on a 2-core CPU."""
  environ = huge_pages_environ()
  if environ is not None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
