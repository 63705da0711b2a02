"""Thread limits for small-matrix work (the PAL head, the per-user fits).

The head's matrices are tiny: with 2+ OpenMP/BLAS threads on shared cores, every op pays thread wake-up and
spin costs (measured: ~20 ms per softmax on a loaded 2-core machine vs ~0.01 ms single-threaded). The
encoder keeps its threads; only head training and few-shot fitting run under this limit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def limit_threads(n: int = 1) -> Iterator[None]:
    from threadpoolctl import threadpool_limits

    try:
        import torch
    except ImportError:  # the serving side's numpy-only fitter may run without torch
        torch = None
    before = torch.get_num_threads() if torch is not None else None
    with threadpool_limits(n):
        if torch is not None:
            torch.set_num_threads(n)
        try:
            yield
        finally:
            if torch is not None and before is not None:
                torch.set_num_threads(before)
