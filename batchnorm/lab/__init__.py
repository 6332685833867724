"""The lab: train small networks on real data and report what Batch Normalization does.

Run it with ``batchnorm demo`` (the default selection, ~2 minutes on 2 cores) or
``batchnorm run NAME`` (one experiment; ``batchnorm run --help`` lists them). The library never
imports this package; it may use matplotlib, scikit-learn and rich (the ``lab`` extra).

Reusable pieces:

* :mod:`batchnorm.lab.data` — bundled digits, MNIST/Fashion-MNIST IDX reader/writer, :class:`Dataset`;
* :mod:`batchnorm.lab.preprocessing` — streaming per-channel statistics, min-max / mean / z-score;
* :mod:`batchnorm.lab.models` — article 001's MLP (3 BN placements), article 002's CNN, Figure 1's
  sigmoid network;
* :mod:`batchnorm.lab.train` — the training loop and evaluation;
* :mod:`batchnorm.lab.registry` — how experiments register (and how to add one);
* ``batchnorm/lab/exp_*.py`` — the experiments; :mod:`batchnorm.lab.report` — HTML/PNG/JSON output;
  :mod:`batchnorm.lab.cli` — the command line.
"""
