"""What ``batchnorm bench`` runs: ours vs native torch vs the memory-bandwidth bound, in one run.

* :mod:`.layers` — the fused BN(+activation) kernels (``batchnorm bench``);
* :mod:`.inplace` — InPlace-ABN's memory and speed (``batchnorm bench --inplace``).

Never imported by the library; it may import everything below it.
"""
