"""InPlace-ABN vs the torch stack: saved-activation bytes and step time — the script form of
``batchnorm bench --inplace``.

    python benchmarks/inplace_bench.py             # 4 × (conv3×3 → BN → LeakyReLU) at 32×64×56×56
    python benchmarks/inplace_bench.py --quick     # CI smoke test

See :mod:`batchnorm.bench.inplace` for what is measured and how.
"""

from __future__ import annotations

from batchnorm.bench.inplace import main

if __name__ == "__main__":
    main()
