"""Tools that act around a trained layer: recalibrate, freeze, fold, convert, checkpoint,
conventions, ONNX export and diagnostics.

They work on our layers and on torch's (found through :mod:`batchnorm.core._bnlayers`). A
lifecycle module may import the family, the core, the kernels and the foundation; never the lab.
Heavy optional dependencies (rich, safetensors, onnx) are imported only when a tool uses them.
"""
