"""What ``batchnorm bench`` runs: ours vs native torch vs the memory-bandwidth bound, in one run.

* :mod:`.layers` — the fused BN(+activation) kernels (``batchnorm bench``);
* :mod:`.inplace` — InPlace-ABN's memory and speed (``batchnorm bench --inplace``).

Never imported by the library; it may import everything below it.
"""

import os as _os


def compile_in_process() -> None:
    """Benchmarks time the compiled kernels: first use compiles them in this process (inside the
    benchmark's warm-up calls) instead of in the background process that normally serves first use
    (:mod:`batchnorm.kernels._warmup`), which would run the timings on torch's kernels and compete
    with them for the cores. An explicit ``BATCHNORM_WARMUP`` in the environment wins."""
    _os.environ.setdefault("BATCHNORM_WARMUP", "0")
