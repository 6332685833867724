"""The core: what a user calls — the functional API, its autograd, the custom ops, the modules.

* :mod:`.functional` — ``batch_norm_train`` / ``batch_norm_eval`` / ``moments`` /
  ``update_running_stats``: pure maths, state in and state out.
* :mod:`.autograd` — the hand-derived backward wired to the backends (eager mode); it imports
  :mod:`.ops` (the ``torch.library`` custom ops used under ``torch.compile``) lazily, never the
  other way round.
* :mod:`.modules` — ``BatchNorm1d/2d/3d`` and ``BatchNormAct1d/2d/3d``: thin state holders.
* :mod:`._bnlayers` — helpers over BN layers (ours and torch's) for the family and lifecycle layers.

Imports only go down: core may import :mod:`batchnorm.kernels` and the foundation
(:mod:`batchnorm.stats`, :mod:`batchnorm.reference`, :mod:`batchnorm._checks`), never the family,
the lifecycle tools or the lab.
"""
