"""The ``batchnorm`` command: ``demo`` and ``run`` (the lab), ``bench`` (kernel benchmark).

Each sub-command's code is imported only when it runs, so ``batchnorm --help`` is instant and the
library never imports the lab.
"""

from __future__ import annotations

import sys

_USAGE = """usage: batchnorm COMMAND [options]

commands:
  demo     train small networks on the bundled digits and write a report of what BN does
  run      run one named lab experiment (batchnorm run --help lists them)
  bench    benchmark the fused CPU kernels against native torch and the bandwidth bound

`batchnorm COMMAND --help` explains each command's options.
"""


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_USAGE)
        return 0
    cmd, rest = args[0], args[1:]
    if cmd in ("demo", "run"):
        from .lab.cli import main as lab_main

        return int(lab_main([cmd, *rest]) or 0)
    if cmd == "bench":
        from .bench.layers import main as bench_main

        return int(bench_main(rest) or 0)
    print(f"batchnorm: unknown command {cmd!r}\n\n{_USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
