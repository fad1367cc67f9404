"""One file per op: input checks, backend choice, the torch.library custom op with its fake and
autograd registrations, and the functional entry point.

Pattern (every Triton op follows it):
- the functional entry checks its inputs, then asks ``backend.kernels_for(input)`` (its device's
  backend choice; float64 always takes the reference); the checks
  accept the common case in a few comparisons and leave anything else to ``fastnote.checks``,
  which raises the message (host time per call matters: see ``benchmarks/overhead.py``);
- the reference path calls ``fastnote.reference`` directly (plain torch ops: autograd, AMP and
  torch.compile work natively);
- the kernel path calls a ``fastnote::<op>`` custom op whose implementation launches the kernel;
  its backward is another custom op, wired with ``register_autograd``; both have
  ``register_fake`` so ``torch.compile(fullgraph=True)`` traces them and ``opcheck`` passes.
  Both are declared with ``_fast.kernel_op`` instead of ``torch.library.custom_op``: in eager
  mode the call skips the dispatcher and ``register_autograd``'s wrapper (an ``autograd.Function``
  built from the same body, ``setup_context`` and backward; the plain body when no gradient is
  wanted), with bitwise-identical results; while compiling or tracing it is the custom op.

``power_iteration`` differs because its kernels are C++/CUDA (``fastnote._C``), not Triton: its op
is defined in C++ with ``TORCH_LIBRARY_FRAGMENT`` (only the fake is registered from Python), it
mutates the u and v buffers in place and is a constant for autograd, and ``W / sigma`` gets its
gradient from an autograd function rather than ``register_autograd``. Its own ``_use_kernel``
decides, since what matters is whether the extension was built (with CUDA), not Triton. Its
fallback is the op's own semantics as torch ops (in place, either order, the weight's dtype,
complex included), not ``fastnote.reference``, which upcasts, returns new vectors and knows only
the v-then-u order.

Where a new op's pieces go: the six places of the README's "Adding an op" (docs/design.md,
section 2): the maths and ``fastnote/reference.py``, the kernel, this layer's file, the module,
one ``OpCase`` in ``fastnote/cases.py``, tests and benchmarks.
"""
