"""Non-temporal ("streaming") stores for the kernels' large outputs.

A plain store to memory that is not in cache first **reads** the line (read-for-ownership), then
writes it back later: writing y costs two transfers per byte. A non-temporal store writes whole
lines through a write-combining buffer without reading them, and leaves the cache alone — so the
next op, which reads y, finds it in memory rather than in cache. Which effect wins depends on the
size. Measured on the 2-core machine with ``batchnorm bench --stream`` ((M, 1024) float32 BN+ReLU
on 2 threads, each pass followed by ``output.sum()`` as the next layer would read it; speed-up of
streaming over plain stores, medians of 9):

    output            eval + read y     train fwd + bwd + read y, dx
    1.0 MB              0.85×               0.70×
    4.2 MB              0.96×               0.98×
    8.4 MB              1.22×               1.11×
    12.6 MB             1.31×               1.14×
    16.8 MB             1.38×               1.21×
    33.6 MB             1.51×               1.24×
    67.1 MB             1.46×               1.19×

The kernels therefore stream only outputs of at least :data:`batchnorm.kernels.cpu.STREAM_MIN_BYTES`
(8 MiB by default, twice the two cores' L2 here; environment variable
``BATCHNORM_STREAM_MIN_BYTES``), and only where every row they stream starts on a 64-byte line.
On a machine with a large, fast last-level cache the break-even is higher: measure with
``batchnorm bench --stream`` and set the variable.

How: :func:`store` is ``row[j] = v`` with LLVM's ``!nontemporal`` hint and a claimed 32-byte
alignment. The loop vectoriser turns a loop of them into 32-byte vector streaming stores
(``vmovntps``), which need that alignment at run time: callers use it only in a loop
``for j in range(n)`` over a C-contiguous row whose first element is 64-byte aligned, so every
vector the vectoriser forms starts at a multiple of 32 bytes. The scalar remainder of a row keeps
the claim, which is false there; x86 has no aligned form of a scalar store, so code generation
does not act on it (tests compare streamed and plain outputs bit for bit over remainders of every
length, and the compiled callbacks were checked for ``vmovntps``). Streaming stores are weakly ordered:
a kernel that used them ends with :func:`fence` (a locked instruction on x86, which drains the
write-combining buffers) before other threads or the caller read the data.
The same IR compiles on any architecture LLVM targets (elsewhere the hint may simply be ignored).
"""

from __future__ import annotations

from ._numba_setup import configure

configure()

from llvmlite import ir  # noqa: E402
from numba import types  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

__all__ = ["fence", "store"]

_ALIGN = 32  # bytes: what the vectoriser needs to emit a 32-byte (ymm) streaming store


@intrinsic
def store(typingctx, row, j, v):
    """``row[j] = v`` as a non-temporal store (see the module docstring for the alignment contract)."""
    if not (isinstance(row, types.Array) and row.ndim == 1 and row.layout == "C" and row.mutable
            and isinstance(j, types.Integer)):
        return None
    sig = types.void(row, types.intp, v)

    def codegen(context, builder, signature, args):
        arr = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = builder.gep(arr.data, [args[1]])
        val = context.cast(builder, args[2], signature.args[2], signature.args[0].dtype)
        st = builder.store(val, ptr, align=_ALIGN)
        st.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def fence(typingctx):
    """A full memory fence (``mfence`` on x86): orders this thread's streaming stores before what follows."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return sig, codegen
