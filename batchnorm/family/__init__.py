"""The BN family: variants built on the core's statistics path.

* :mod:`.renorm` — Batch Renormalization (Ioffe 2017);
* :mod:`.ghost` — Ghost Batch Normalization (Hoffer et al. 2017);
* :mod:`.inplace` — in-place activated BN (InPlace-ABN, Rota Bulò et al. 2018);
* :mod:`.sync` — synchronized BN over ``torch.distributed``.

A family module may import the core, the kernels and the foundation; never the lifecycle tools
or the lab.
"""
