"""The lifecycle modules keep `import batchnorm` light: rich, safetensors, onnx are imported on use only."""

from __future__ import annotations

import subprocess
import sys


def test_lifecycle_modules_import_no_heavy_dependencies():
    code = ("import sys, batchnorm.lifecycle.diagnostics, batchnorm.lifecycle.recalibrate, "
            "batchnorm.lifecycle.freeze, batchnorm.lifecycle.fold, batchnorm.lifecycle.convert, "
            "batchnorm.lifecycle.checkpoint, batchnorm.lifecycle.conventions, batchnorm.lifecycle.onnx; "
            "print(sorted(m for m in ('rich', 'safetensors', 'onnx', 'onnxruntime', 'onnxscript', "
            "'matplotlib', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
