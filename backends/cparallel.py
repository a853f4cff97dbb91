"""The C kernels' thread pool, and the loop scaffold that splits a kernel across it.

Why a pool of our own rather than OpenMP: GNU OpenMP (and OpenBLAS) threads spin while
they wait for work, so on a machine where another process keeps a core busy a team
of two spends its time waiting on a descheduled spinner. Here the workers sleep on
a condition variable and the calling thread sleeps until they are done: a dispatch
costs a wake-up (microseconds), which the size threshold (`grain` elements of work
per thread) keeps small next to the work.

Determinism: a kernel is split into `items` (rows, row blocks, column ranges) that
each compute the same numbers whichever thread runs them, so results do not depend
on the thread count; anything summed across items goes through per-item partial
results combined in item order (see `engine.compiler.ckernels.row_group_source`).

Every kernel library calls `engine_parallel_for` from the pool library, which is
loaded with its symbols global before any kernel library (`build`).
"""
from __future__ import annotations

import ctypes
import os
import re
import threading
from typing import Any

from . import cbuild

MAX_THREADS = 256
DEFAULT_GRAIN = 1 << 16      # elements of work per thread below which a kernel stays serial

# The declaration every kernel source carries (repeatable in one translation unit).
DECLARATION = "void engine_parallel_for(void (*)(void*, long long, long long), void*, long long, long long);\n"

_POOL_SOURCE = r"""
#include <pthread.h>
#include <signal.h>
#include <stdint.h>

typedef void (*engine_task)(void*, long long, long long);

static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;   /* guards the fields below */
static pthread_cond_t pool_wake = PTHREAD_COND_INITIALIZER;     /* a new loop is posted */
static pthread_cond_t pool_done = PTHREAD_COND_INITIALIZER;     /* the last worker finished */
static pthread_mutex_t pool_busy = PTHREAD_MUTEX_INITIALIZER;   /* one parallel loop at a time */
static int pool_wanted = 1, pool_started = 0, pool_parts = 0, pool_pending = 0;
static long long pool_generation = 0, pool_items = 0, pool_grain = __GRAIN__, pool_loops = 0;
static long long pool_born[__MAX__];
static engine_task pool_task;
static void* pool_ctx;

static void* pool_worker(void* arg) {
  const int id = (int)(intptr_t)arg;
  pthread_mutex_lock(&pool_lock);
  long long seen = pool_born[id];    /* the generation current when it was created */
  for (;;) {
    while (pool_generation == seen) pthread_cond_wait(&pool_wake, &pool_lock);
    seen = pool_generation;
    if (id < pool_parts) {
      const engine_task task = pool_task;
      void* ctx = pool_ctx;
      const long long n = pool_items, p = pool_parts;
      pthread_mutex_unlock(&pool_lock);
      task(ctx, n * id / p, n * (id + 1) / p);
      pthread_mutex_lock(&pool_lock);
      if (--pool_pending == 0) pthread_cond_signal(&pool_done);
    }
  }
  return 0;
}

/* Threads do not survive fork: a child starts with no workers and fresh locks. */
static void pool_after_fork(void) {
  pthread_mutex_t fresh = PTHREAD_MUTEX_INITIALIZER;
  pthread_cond_t fresh_cond = PTHREAD_COND_INITIALIZER;
  pool_lock = fresh;
  pool_busy = fresh;
  pool_wake = fresh_cond;
  pool_done = fresh_cond;
  pool_started = pool_parts = pool_pending = 0;
}

__attribute__((constructor)) static void pool_init(void) { pthread_atfork(0, 0, pool_after_fork); }

void engine_set_threads(int n) { pool_wanted = n < 1 ? 1 : (n > __MAX__ ? __MAX__ : n); }
void engine_set_grain(long long g) { pool_grain = g < 1 ? 1 : g; }
long long engine_parallel_loops(void) { return pool_loops; }

/* Run task(ctx, lo, hi) over [0, items): on up to pool_wanted threads when the work
   (elements) is at least pool_grain per thread, else on the calling thread. Part k
   gets [items*k/p, items*(k+1)/p). A call while another loop runs (another Python
   thread, or a task calling a kernel) runs serially. */
void engine_parallel_for(engine_task task, void* ctx, long long items, long long work) {
  long long parts = pool_wanted;
  if (parts > items) parts = items;
  if (parts > work / pool_grain) parts = work / pool_grain;
  if (parts <= 1 || pthread_mutex_trylock(&pool_busy) != 0) {
    if (items > 0) task(ctx, 0, items);
    return;
  }
  pthread_mutex_lock(&pool_lock);
  while (pool_started < parts - 1) {
    const int id = pool_started + 1;
    sigset_t all, old;
    pthread_t thread;
    sigfillset(&all);                       /* workers leave signals to the main thread */
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pool_born[id] = pool_generation;
    pthread_attr_t attr;                    /* row kernels keep whole rows on the stack */
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, (size_t)16 << 20);
    const int failed = pthread_create(&thread, &attr, pool_worker, (void*)(intptr_t)id);
    pthread_attr_destroy(&attr);
    pthread_sigmask(SIG_SETMASK, &old, 0);
    if (failed) break;
    pthread_detach(thread);
    pool_started = id;
  }
  if (parts > pool_started + 1) parts = pool_started + 1;
  if (parts > 1) {
    pool_task = task;
    pool_ctx = ctx;
    pool_items = items;
    pool_parts = (int)parts;
    pool_pending = (int)parts - 1;
    ++pool_generation;
    ++pool_loops;
    pthread_cond_broadcast(&pool_wake);
  }
  pthread_mutex_unlock(&pool_lock);
  task(ctx, 0, parts > 1 ? items / parts : items);
  if (parts > 1) {
    pthread_mutex_lock(&pool_lock);
    while (pool_pending > 0) pthread_cond_wait(&pool_done, &pool_lock);
    pthread_mutex_unlock(&pool_lock);
  }
  pthread_mutex_unlock(&pool_busy);
}
"""

_SERIAL_SOURCE = r"""
void engine_set_threads(int n) { (void)n; }
void engine_set_grain(long long g) { (void)g; }
long long engine_parallel_loops(void) { return 0; }
void engine_parallel_for(void (*task)(void*, long long, long long), void* ctx, long long items,
                         long long work) {
  (void)work;
  if (items > 0) task(ctx, 0, items);
}
"""

def default_threads() -> int:
    """The cores this process may run on, or OMP_NUM_THREADS where the user set it."""
    try:
        requested = int(os.environ.get("OMP_NUM_THREADS", "") or 0)
    except ValueError:
        requested = 0
    return min(requested if requested > 0 else len(os.sched_getaffinity(0)), MAX_THREADS)


_lock = threading.Lock()
_pool: Any = None
_threads = default_threads()
_grain = DEFAULT_GRAIN


def pool_source() -> str:
    """The C source of the thread pool library (the first library the engine loads)."""
    return _POOL_SOURCE.replace("__GRAIN__", f"{DEFAULT_GRAIN}LL").replace("__MAX__", str(MAX_THREADS))


def _library() -> Any:
    """The pool, loaded once with global symbols; a serial stand-in where threads fail to build."""
    global _pool
    with _lock:
        if _pool is None:
            try:
                _pool = cbuild.build(pool_source(), global_symbols=True)
            except (RuntimeError, OSError):
                _pool = cbuild.build(_SERIAL_SOURCE, global_symbols=True)
            _pool.engine_set_grain.argtypes = [ctypes.c_longlong]
            _pool.engine_parallel_loops.restype = ctypes.c_longlong
            _pool.engine_set_threads(_threads)
            _pool.engine_set_grain(_grain)
        return _pool


def build(source: str, vector: bool = False) -> Any:
    """cbuild.build for a kernel library that calls engine_parallel_for."""
    _library()
    return cbuild.build(DECLARATION + source, vector=vector)


def set_threads(n: int) -> None:
    """Threads the kernels may use (the caller's own included)."""
    global _threads
    _threads = max(1, min(int(n), MAX_THREADS))
    if _pool is not None:
        _pool.engine_set_threads(_threads)


def threads() -> int:
    """The threads the kernels may use."""
    return _threads


def set_grain(elements: int) -> int:
    """Set the work per thread below which a kernel stays serial; returns the previous value."""
    global _grain
    previous, _grain = _grain, max(1, int(elements))
    if _pool is not None:
        _pool.engine_set_grain(_grain)
    return previous


def parallel_loops() -> int:
    """How many kernel calls so far ran on more than one thread (the threshold's effect)."""
    return int(_pool.engine_parallel_loops()) if _pool is not None else 0


_NAME = re.compile(r"(\w+)\s*$")


def parallel_function(name: str, params: list[str], items: str, work: str, body: list[str],
                      after: list[str] = ()) -> str:
    """A C function `name(params)` whose loop is split across the pool.

    `body`: C lines processing items [lo, hi) (they write their own loop and may use
    every parameter by name); `items`/`work`: C expressions for the item count and the
    total elements of work (the threshold); `after`: lines run in `name` once every
    item is done (e.g. adding up partial sums in item order)."""
    fields = list(params)
    names = [_NAME.search(f).group(1) for f in fields]
    lines = [f"struct {name}_args {{ {' '.join(f + ';' for f in fields)} }};",
             f"static void {name}_part(void* ctx_, long long lo, long long hi) {{",
             f"  const struct {name}_args* a_ = ctx_;"]
    lines += [f"  {f} = a_->{n};" for f, n in zip(fields, names)]
    lines += [f"  (void){n};" for n in names]
    lines += ["  " + b for b in body]
    lines += ["}", f"void {name}({', '.join(params)}) {{",f"  struct {name}_args a_ = {{ {', '.join(names)} }};",
              f"  engine_parallel_for({name}_part, &a_, {items}, {work});",
              *["  " + b for b in after], "}"]
    return "\n".join(lines) + "\n"
