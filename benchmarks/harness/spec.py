"""What a benchmark script declares (``Case``, ``Provider``, ``Benchmark``), the settings one run
measures under (``_Run``), and the vocabulary they share: modes, dtypes, reported quantiles."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional, Sequence

import torch

MODES = ("fwd", "bwd", "both")
# A whole training step (forward, backward, optimiser step): the model benchmarks' only mode; their
# providers give ready callables, {"step": fn}.
STEP = "step"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
QUANTILES = [0.5, 0.2, 0.8]   # the p50, p20, p80 columns


@dataclasses.dataclass
class Case:
    x_name: str
    x_value: float
    config: Dict[str, Any]

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.config["dtype"]]

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


@dataclasses.dataclass
class Provider:
    name: str
    setup: Callable[[Any, Case], Any]
    compile: bool = False
    skip_in_smoke: Optional[bool] = None  # default: skip compiled providers in smoke mode
    needs_cuda: bool = False


@dataclasses.dataclass
class Benchmark:
    op: str
    make_inputs: Callable[[Case, torch.device], Any]
    providers: Sequence[Provider]
    cases: Sequence[Case]
    smoke_cases: Sequence[Case]
    modes: Sequence[str] = MODES
    bytes_moved: Optional[Callable[[Case, str], Optional[float]]] = None
    flops: Optional[Callable[[Case, str], Optional[float]]] = None
    device: Optional[str] = None  # None: cuda when available, else cpu
    cpu_real: bool = False        # CPU timings are real measurements, not a smoke run
    cpu_warmup: int = 3
    cpu_repeats: int = 20
    plot_by: Sequence[str] = ("dtype",)
    quick_cases: Optional[Sequence[Case]] = None   # what --quick runs; default: the first case per dtype
    gpu_rep_ms: int = 100     # do_bench's rep: how long (ms) it keeps timing; raise it for calls of 100 ms and more
    plot_kind: str = "lines"  # "lines": time and memory against x; "bars": one group of bars per case


@dataclasses.dataclass
class _Run:
    device: torch.device
    smoke: bool
    cpu_timing: bool
    slug: str
    gpu: str
    warmup: int
    repeats: int
    peak_gbps: Optional[float]
    peak_tflops: Optional[float]
    copy_gbps: Optional[float]
    meta: Dict[str, str]
