"""One file per op: input checks, backend choice, the torch.library custom op with its fake and
autograd registrations, and the functional entry point.

Pattern (every op follows it):
- the functional entry checks its inputs, then asks ``backend.use_triton(device)``;
- the reference path calls ``fastnote.reference`` directly (plain torch ops: autograd, AMP and
  torch.compile work natively);
- the kernel path calls a ``fastnote::<op>`` custom op whose implementation launches the kernel;
  its backward is another custom op, wired with ``register_autograd``; both have
  ``register_fake`` so ``torch.compile(fullgraph=True)`` traces them and ``opcheck`` passes.
"""
