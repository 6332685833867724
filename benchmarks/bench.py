"""Fused BN+ReLU CPU kernels vs native torch vs the bandwidth bound — the script form of ``batchnorm bench``.

    python benchmarks/bench.py             # full table
    python benchmarks/bench.py --quick     # CI smoke test (tiny shapes)
    python benchmarks/bench.py --json out.json
    python benchmarks/bench.py --alloc     # output-allocation measurement
    python benchmarks/bench.py --stream    # plain vs streaming output stores by size

See :mod:`batchnorm.bench.layers` for what is measured and how.
"""

from __future__ import annotations

from batchnorm.bench.layers import main

if __name__ == "__main__":
    raise SystemExit(main())
