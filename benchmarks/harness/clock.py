"""GPU time for pytest-benchmark (``benchmarks/test_timings.py``): a clock read from CUDA events,
and the L2 flush that runs between rounds.

pytest-benchmark times a round as ``timer()`` read before and after the call. ``gpu_clock`` is
such a timer for CUDA: each reading records a ``torch.cuda.Event`` on the current stream, waits
for it, and returns the seconds of GPU time since a reference event (the first reading on that
device). The difference of two readings is then the time between the two events on the GPU: the
kernels the timed call launched plus any time the GPU waited for the host (to launch the next
kernel, or to return from the call). Pass it per test with ``@pytest.mark.benchmark(timer=gpu_clock)``.

Two properties to know when reading the figures:

- The start reading waits for its event, so the GPU is idle when the timed call begins, and a
  round includes the latency of launching its first kernel (microseconds). ``do_bench`` queues
  the call behind its L2 flush instead and hides that latency, so for kernels of a few
  microseconds these times run higher than the CSVs'; the ratios between providers of one
  group are what compares.
- ``cudaEventElapsedTime`` gives float32 milliseconds: read against a reference one minute back
  it resolves about 4 us, an hour back a quarter of a millisecond. So the clock adds up the
  intervals between consecutive readings (each short, so exact to the event resolution of about
  0.5 us) in float64 instead of reading every event against the reference.

``flush_l2(device)`` writes a 256 MB buffer (``FLUSH_BYTES``, as ``triton.testing.do_bench``
does; larger than the L2 cache of current GPUs), so a round does not find its inputs in the L2 cache where
the previous round left them. Run it in ``benchmark.pedantic(setup=...)``, which is untimed.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Union

import torch

FLUSH_BYTES = 256 * 1024 * 1024

_READINGS: Dict[int, List] = {}            # device index -> [last event, GPU seconds up to it]
_FLUSH_BUFFERS: Dict[int, torch.Tensor] = {}


def gpu_clock() -> float:
    """Seconds of GPU time on the current CUDA device since this clock's first reading there."""
    device = torch.cuda.current_device()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    event.synchronize()
    state = _READINGS.get(device)
    if state is None:
        _READINGS[device] = [event, 0.0]
        return 0.0
    last, seconds = state
    seconds += last.elapsed_time(event) / 1e3
    _READINGS[device] = [event, seconds]
    return seconds


def _index(device: Optional[Union[torch.device, str, int]]) -> int:
    if device is None:
        return torch.cuda.current_device()
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    return device.index if device.index is not None else torch.cuda.current_device()


def flush_l2(device: Optional[Union[torch.device, str, int]] = None) -> None:
    """Overwrite ``FLUSH_BYTES`` on ``device`` (default: the current CUDA device), evicting from
    the L2 cache what the previous round left there. The buffer is allocated on first use and
    kept (see ``release_flush_buffers``)."""
    index = _index(device)
    buf = _FLUSH_BUFFERS.get(index)
    if buf is None:
        buf = _FLUSH_BUFFERS[index] = torch.empty(FLUSH_BYTES // 4, dtype=torch.int32,
                                                  device=torch.device("cuda", index))
    buf.zero_()


def release_flush_buffers() -> None:
    """Free the flush buffers (256 MB per device that ``flush_l2`` ran on)."""
    _FLUSH_BUFFERS.clear()
