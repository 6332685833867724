"""The lifecycle modules keep `import batchnorm` light: rich, safetensors, onnx are imported on use only."""

from __future__ import annotations

import subprocess
import sys


def test_lifecycle_modules_import_no_heavy_dependencies():
    code = ("import sys, batchnorm.diagnostics, batchnorm.recalibrate, batchnorm.freeze, batchnorm.fold, "
            "batchnorm.convert, batchnorm.checkpoint, batchnorm.conventions, batchnorm.onnx; "
            "print(sorted(m for m in ('rich', 'safetensors', 'onnx', 'onnxruntime', 'onnxscript', "
            "'matplotlib', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
