"""Host overhead per call of every public op: fastnote against the eager code it replaces.

Part 1, everywhere (no GPU needed): the Triton launch is replaced by a no-op
(``triton.runtime.jit.KernelInterface.__getitem__`` returns a do-nothing callable while timing),
the inputs are tiny CPU tensors and the Triton interpreter is on, so ``backend.use_triton`` picks
the kernel path and what is timed is the Python and dispatcher work around the launches: input
checks, backend choice, output allocation, autograd bookkeeping. The kernels never run (the
outputs are garbage); the eager providers run for real, on tensors so small that their arithmetic
is negligible. Metric ``host`` (launch ``stubbed``).

Part 2, only on a CUDA GPU: realistic bf16 CUDA tensors, launches real. ``host``: host wall time
per call of many asynchronous calls (timed before the one synchronize that follows them);
``gpu``: GPU time per call from a CUDA-graph replay (``CALLS_PER_GRAPH`` calls captured in one
graph, replays timed with CUDA events), i.e. device time without any host gaps. Beside eager and
fastnote, ``custom_op`` times fastnote through its torch.library ops (the path torch.compile
traces) and, here only, ``triton_launch`` through Triton's own launch path instead of the direct
one (``triton_kernels.utils.launch``): their difference is what the direct path saves. On a GPU machine
part 1 runs in a subprocess that hides the GPU and turns the interpreter on (the interpreter
replaces ``@triton.jit`` kernels at import, so one process cannot do both parts).

Modes: ``nograd`` (forward under ``torch.no_grad``), ``fwd`` (forward, inputs requiring grad: the
graph is recorded, as in training), ``both`` (forward + ``torch.autograd.grad`` to every input
that requires grad). Each figure is the median over ``--repeats`` rounds of ``--calls`` calls
(``time.perf_counter_ns``, gc disabled while timing); the providers of an op take turns round by
round, so a drifting machine speed hits them alike.

Output: a table on stdout and the long-format CSV of the harness (``--out``, default
``out/overhead.csv``; unit us, p50/p20/p80 over the rounds).

    python benchmarks/overhead.py [--ops gram,tv_loss] [--modes fwd,both] [--calls 200] [--repeats 7]
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Before anything imports triton: the stubbed launches must go down the kernel path on CPU
    # tensors, which backend.use_triton only picks with the interpreter on.
    os.environ.setdefault("TRITON_INTERPRET", "1")

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import torch.nn.functional as F  # noqa: E402

import fastnote  # noqa: E402
import harness  # noqa: E402
from fastnote import reference  # noqa: E402
from gram import eager_gram, eager_style, eager_tv  # noqa: E402
from harness.timing import _quantiles  # noqa: E402
from sagan_attention import _eager as eager_sagan  # noqa: E402
from squeeze_excitation import eager_hswish_se  # noqa: E402
from window_attention import eager_block, eager_core, eager_core_v2  # noqa: E402

MODES = ("nograd", "fwd", "both")
PROVIDERS = ("eager", "fastnote")
# "custom_op": fastnote's public function with every kernel call sent through its torch.library
# custom op and register_autograd (fastnote.ops._fast.FORCE_CUSTOM_OP), the path torch.compile traces.
# "triton_launch": fastnote with every kernel launched through Triton's own JITFunction.run instead
# of the direct path (triton_kernels/utils.py, ``launch``); GPU part only, where the direct path is on.
ALL_PROVIDERS = PROVIDERS + ("custom_op", "triton_launch")
CALLS_PER_GRAPH = 20
GPU_CALLS = 20     # calls per timed round with real launches: few enough that the launch queue never fills
DEFAULT_OUT = os.path.join("out", "overhead.csv")


# ------------------------------------------------------------------------------------------------
# Eager code the ops replace (where benchmarks/<op>.py has none to reuse)
# ------------------------------------------------------------------------------------------------

def eager_se(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias):
    """torchvision's SqueezeExcitation (relu, hard-sigmoid) on x."""
    scale = F.adaptive_avg_pool2d(x, 1)
    scale = F.relu(F.conv2d(scale, fc1_weight, fc1_bias))
    return F.hardsigmoid(F.conv2d(scale, fc2_weight, fc2_bias)) * x


def eager_patch_nce(feat_q, feat_k, batch_size, nce_T=0.07):
    """CUT's PatchNCELoss.forward (reduction 'none')."""
    rows, dim = feat_q.shape
    feat_k = feat_k.detach()
    l_pos = torch.bmm(feat_q.view(rows, 1, -1), feat_k.view(rows, -1, 1)).view(rows, 1)
    q = feat_q.view(batch_size, -1, dim)
    k = feat_k.view(batch_size, -1, dim)
    m = q.size(1)
    l_neg = torch.bmm(q, k.transpose(2, 1))
    l_neg.masked_fill_(torch.eye(m, device=q.device, dtype=torch.bool)[None, :, :], -10.0)
    out = torch.cat((l_pos, l_neg.view(-1, m)), dim=1) / nce_T
    return F.cross_entropy(out, torch.zeros(out.size(0), dtype=torch.long, device=q.device), reduction="none")


def eager_clip(image, text, logit_scale):
    """CLIP's / open_clip's loss: cross-entropy over the logits, both ways."""
    logits = logit_scale * image @ text.t()
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def eager_siglip(image, text, logit_scale, logit_bias):
    """open_clip's SigLipLoss on one device: logits = s * img @ txt^T + b, an [n, n] label matrix
    (2 eye - 1, in the features' dtype), -sum(logsigmoid(labels * logits)) / n."""
    logits = logit_scale * image @ text.t() + logit_bias
    n = logits.shape[0]
    labels = 2 * torch.eye(n, device=image.device, dtype=image.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / n


# ------------------------------------------------------------------------------------------------
# The ops: inputs (tiny for the stubbed part, realistic for the GPU part), eager and fastnote calls
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Op:
    name: str
    make_inputs: Callable[[torch.device, torch.dtype, bool], dict]   # (device, dtype, realistic)
    eager: Callable[[dict], torch.Tensor]
    fastnote: Callable[[dict], torch.Tensor]


def _leaf(*shape, device, dtype, scale=1.0, grad=True):
    t = (torch.randn(*shape, device=device) * scale).to(dtype)
    return t.requires_grad_(grad)


def _se_inputs(device, dtype, realistic):
    B, C, H, W, Cr = (128, 120, 28, 28, 32) if realistic else (2, 16, 4, 4, 8)   # MobileNetV3's SE
    p = dict(device=device, dtype=dtype)
    return {"x": _leaf(B, C, H, W, scale=3.0, **p), "fc1_weight": _leaf(Cr, C, 1, 1, scale=C ** -0.5, **p),
            "fc1_bias": _leaf(Cr, scale=0.1, **p), "fc2_weight": _leaf(C, Cr, 1, 1, scale=Cr ** -0.5, **p),
            "fc2_bias": _leaf(C, scale=0.1, **p)}


def _feature_inputs(device, dtype, realistic):
    B, C, H, W = (4, 128, 64, 64) if realistic else (2, 8, 4, 4)      # a VGG feature map
    x = _leaf(B, C, H, W, device=device, dtype=dtype)
    with torch.no_grad():
        target = eager_gram(torch.randn(1, C, H, W, device=device).to(dtype))[0]
    return {"x": x, "target": target}


def _image_inputs(device, dtype, realistic):
    shape = (4, 3, 256, 256) if realistic else (2, 3, 8, 8)
    return {"y": _leaf(*shape, device=device, dtype=dtype)}


def _nce_inputs(device, dtype, realistic):
    B, P, d = (1, 256, 256) if realistic else (2, 8, 16)              # CUT's default: 256 patches
    q = F.normalize(torch.randn(B * P, d, device=device), dim=1)
    k = F.normalize(q + 0.5 * torch.randn_like(q), dim=1)
    return {"q": q.to(dtype).requires_grad_(), "k": k.to(dtype), "B": B}


def _clip_inputs(device, dtype, realistic):
    n, d = (1024, 512) if realistic else (8, 16)
    img = F.normalize(torch.randn(n, d, device=device), dim=1)
    txt = F.normalize(img + torch.randn_like(img), dim=1)
    return {"img": img.to(dtype).requires_grad_(), "txt": txt.to(dtype).requires_grad_(),
            "scale": torch.tensor(14.3, device=device, requires_grad=True)}


def _siglip_inputs(device, dtype, realistic):
    inputs = _clip_inputs(device, dtype, realistic)
    inputs["scale"] = torch.tensor(10.0, device=device, requires_grad=True)
    inputs["bias"] = torch.tensor(-10.0, device=device, requires_grad=True)
    return inputs


def _window_inputs(device, dtype, realistic, ws=7):
    B, nW, heads, d = (32, 64, 3, 32) if realistic else (2, 2, 2, 8)   # Swin-T stage 1 (window 7)
    ws = ws if realistic else 4
    N = ws * ws
    p = dict(device=device, dtype=dtype)
    q, k, v = (_leaf(B * nW, heads, N, d, **p) for _ in range(3))
    side = int(nW ** 0.5)
    mask = reference.shift_mask(side * ws, nW // side * ws, ws, ws // 2, device=device).to(dtype)
    return {"q": q, "k": k, "v": v, "bias": _leaf(heads, N, N, scale=0.5, **p), "mask": mask}


def _window_v2_inputs(device, dtype, realistic):
    inputs = _window_inputs(device, dtype, realistic, ws=8)   # Swin V2-T 256 stage 1 (window 8)
    inputs["logit_scale"] = torch.full((inputs["q"].shape[1], 1, 1), 2.3, device=device, requires_grad=True)
    return inputs


def _swin_inputs(device, dtype, realistic):
    B, H, W, C, heads, ws = (32, 56, 56, 96, 3, 7) if realistic else (1, 8, 8, 16, 2, 4)
    shift = ws // 2
    p = dict(device=device, dtype=dtype)
    return {"x": _leaf(B, H, W, C, **p), "qkv_weight": _leaf(3 * C, C, scale=C ** -0.5, **p),
            "qkv_bias": _leaf(3 * C, scale=0.02, **p), "proj_weight": _leaf(C, C, scale=C ** -0.5, **p),
            "proj_bias": _leaf(C, scale=0.02, **p),
            "relative_position_bias_table": _leaf((2 * ws - 1) ** 2, heads, scale=0.02, **p),
            "index": reference.relative_position_index(ws, device=device),
            "mask": reference.shift_mask(H, W, ws, shift, device=device).to(dtype),
            "window": ws, "heads": heads, "shift": shift}


def _sagan_inputs(device, dtype, realistic):
    B, C, side = (32, 256, 32) if realistic else (2, 16, 4)          # SAGAN's 32x32 layer
    N = side * side
    p = dict(device=device, dtype=dtype)
    return {"q": _leaf(B, C // 8, N, scale=0.7, **p), "k": _leaf(B, C // 8, N, scale=0.7, **p),
            "v": _leaf(B, C, N, **p), "x": _leaf(B, C, side, side, **p),
            "gamma": torch.full((1,), 0.5, device=device, requires_grad=True)}


def _se_args(i):
    return i["x"], i["fc1_weight"], i["fc1_bias"], i["fc2_weight"], i["fc2_bias"]


def _swin_eager(i):
    return eager_block(i["x"], i["qkv_weight"], i["qkv_bias"], i["proj_weight"], i["proj_bias"],
                       i["relative_position_bias_table"], i["index"], i["mask"], i["window"], i["heads"], i["shift"])


def _swin_fastnote(i):
    return fastnote.swin_window_attention(i["x"], i["qkv_weight"], i["qkv_bias"], i["proj_weight"], i["proj_bias"],
                                          i["relative_position_bias_table"], i["window"], i["heads"], i["shift"],
                                          relative_position_index=i["index"])


OPS: List[Op] = [
    Op("squeeze_excitation", _se_inputs, lambda i: eager_se(*_se_args(i)),
       lambda i: fastnote.squeeze_excitation(*_se_args(i))),
    Op("hswish_se", _se_inputs, lambda i: eager_hswish_se(*_se_args(i)), lambda i: fastnote.hswish_se(*_se_args(i))),
    Op("gram", _feature_inputs, lambda i: eager_gram(i["x"]), lambda i: fastnote.gram(i["x"])),
    Op("style_loss", _feature_inputs, lambda i: eager_style(i["x"], i["target"]),
       lambda i: fastnote.style_loss(i["x"], i["target"])),
    Op("tv_loss", _image_inputs, lambda i: eager_tv(i["y"]), lambda i: fastnote.tv_loss(i["y"])),
    Op("patch_nce_loss", _nce_inputs, lambda i: eager_patch_nce(i["q"], i["k"], i["B"]),
       lambda i: fastnote.patch_nce_loss(i["q"], i["k"], i["B"])),
    Op("clip_loss", _clip_inputs, lambda i: eager_clip(i["img"], i["txt"], i["scale"]),
       lambda i: fastnote.clip_loss(i["img"], i["txt"], i["scale"])),
    Op("siglip_loss", _siglip_inputs, lambda i: eager_siglip(i["img"], i["txt"], i["scale"], i["bias"]),
       lambda i: fastnote.siglip_loss(i["img"], i["txt"], i["scale"], i["bias"])),
    Op("window_attention_v2", _window_v2_inputs,
       lambda i: eager_core_v2(i["q"], i["k"], i["v"], i["logit_scale"], i["bias"], i["mask"]),
       lambda i: fastnote.window_attention_v2(i["q"], i["k"], i["v"], i["logit_scale"], bias=i["bias"],
                                              mask=i["mask"])),
    Op("window_attention", _window_inputs, lambda i: eager_core(i["q"], i["k"], i["v"], i["bias"], i["mask"]),
       lambda i: fastnote.window_attention(i["q"], i["k"], i["v"], bias=i["bias"], mask=i["mask"])),
    Op("swin_window_attention", _swin_inputs, _swin_eager, _swin_fastnote),
    Op("sagan_attention", _sagan_inputs,
       lambda i: eager_sagan(i["q"], i["k"], i["v"], i["x"].flatten(2), i["gamma"]).view_as(i["x"]),
       lambda i: fastnote.sagan_attention(i["q"], i["k"], i["v"], i["x"], i["gamma"])),
]
OPS_BY_NAME = {op.name: op for op in OPS}


# ------------------------------------------------------------------------------------------------
# What is timed
# ------------------------------------------------------------------------------------------------

def _noop(*args, **kwargs):
    return None


@contextlib.contextmanager
def stubbed_launches():
    """Every Triton launch ``kernel[grid](...)`` does nothing while inside, and the launch
    observers (``triton_kernels.utils.LAUNCH_OBSERVERS``: the test suite's launch records) are
    off, so what is timed is fastnote's own host work. ``utils.launch``'s own few hundred ns per
    launch stay in the figure."""
    from triton.runtime.jit import KernelInterface

    from fastnote.triton_kernels import utils

    original = KernelInterface.__getitem__
    observers = list(utils.LAUNCH_OBSERVERS)
    KernelInterface.__getitem__ = lambda self, grid: _noop
    utils.LAUNCH_OBSERVERS.clear()
    try:
        yield
    finally:
        KernelInterface.__getitem__ = original
        utils.LAUNCH_OBSERVERS[:] = observers


@contextlib.contextmanager
def one_thread():
    """torch's intra-op pool limited to one thread while inside."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def mode_callable(fn: Callable[[dict], torch.Tensor], inputs: dict, mode: str) -> Callable[[], object]:
    """The no-argument callable timed for ``mode``. ``both`` differentiates with
    ``torch.autograd.grad`` (no ``.grad`` accumulates between calls)."""
    if mode == "nograd":
        def call():
            with torch.no_grad():
                return fn(inputs)
        return call
    if mode == "fwd":
        return lambda: fn(inputs)
    if mode != "both":
        raise ValueError(f"unknown mode {mode!r}")
    leaves = harness.grad_leaves(inputs)
    out = fn(inputs)
    grad = torch.ones_like(out)
    del out
    return lambda: torch.autograd.grad(fn(inputs), leaves, grad, allow_unused=True)


def time_rounds(fns: Dict[str, Callable[[], object]], calls: int, repeats: int, warmup: int,
                sync: Optional[Callable[[], None]] = None) -> Dict[str, List[float]]:
    """Microseconds per call of each callable, one figure per round of ``calls`` calls; the
    callables take turns round by round. ``sync`` (a GPU's synchronize) runs before each round
    and after it, outside the timed region: a round times the host issuing its calls."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    if sync:
        sync()
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeats):
            for name, fn in fns.items():
                t0 = time.perf_counter_ns()
                for _ in range(calls):
                    fn()
                t1 = time.perf_counter_ns()
                if sync:
                    sync()
                samples[name].append((t1 - t0) / calls / 1e3)
    finally:
        if enabled:
            gc.enable()
    return samples


def through_custom_ops(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` with every fastnote kernel call, forward and backward, through its custom op."""
    from fastnote.ops import _fast

    def call():
        _fast.FORCE_CUSTOM_OP = True
        try:
            return fn()
        finally:
            _fast.FORCE_CUSTOM_OP = False
    return call


def through_tritons_launch(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` with every kernel launched through Triton's own launch path."""
    from fastnote.triton_kernels.utils import tritons_launch_path

    def call():
        with tritons_launch_path():
            return fn()
    return call


def provider_callable(op: Op, provider: str, inputs: dict, mode: str) -> Callable[[], object]:
    if provider == "custom_op":
        return through_custom_ops(mode_callable(op.fastnote, inputs, mode))
    if provider == "triton_launch":
        return through_tritons_launch(mode_callable(op.fastnote, inputs, mode))
    return mode_callable(getattr(op, provider), inputs, mode)


def measure_host(ops: Sequence[str], modes: Sequence[str], *, device: torch.device, dtype: torch.dtype,
                 realistic: bool, calls: int, repeats: int, warmup: int, stub: bool,
                 providers: Sequence[str] = PROVIDERS) -> Dict[tuple, List[float]]:
    """{(op, mode, provider): [us per call, one per round]}: the host time of each provider."""
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    result: Dict[tuple, List[float]] = {}
    with stubbed_launches() if stub else contextlib.nullcontext():
        for name in ops:
            op = OPS_BY_NAME[name]
            inputs = op.make_inputs(device, dtype, realistic)
            for mode in modes:
                fns = {p: provider_callable(op, p, inputs, mode) for p in providers}
                samples = time_rounds(fns, calls, repeats, warmup, sync)
                for p, s in samples.items():
                    result[(name, mode, p)] = s
            del inputs
    return result


def graph_gpu_time(fn: Callable[[], object], calls: int = CALLS_PER_GRAPH, replays: int = 10) -> float:
    """GPU microseconds per call: ``calls`` calls captured in one CUDA graph, replays timed with
    CUDA events (median)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):       # warm-up (compilation, allocator) off the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    del graph
    return statistics.median(times)


def measure_gpu_graph(ops: Sequence[str], modes: Sequence[str], dtype: torch.dtype) -> Dict[tuple, tuple]:
    """{(op, mode, provider): (us per call or NaN, note)} from CUDA-graph replays (eager and
    fastnote: the custom-op path launches the same kernels)."""
    device = torch.device("cuda")
    result: Dict[tuple, tuple] = {}
    for name in ops:
        op = OPS_BY_NAME[name]
        inputs = op.make_inputs(device, dtype, True)
        for mode in modes:
            for p in PROVIDERS:
                try:
                    result[(name, mode, p)] = (graph_gpu_time(provider_callable(op, p, inputs, mode)), "")
                except Exception as exc:  # noqa: BLE001 - an op that cannot be captured is reported, not fatal
                    try:
                        torch.cuda.synchronize()
                    except Exception:  # noqa: BLE001
                        pass
                    result[(name, mode, p)] = (float("nan"), f"{type(exc).__name__}: {exc}"[:200])
        del inputs
        torch.cuda.empty_cache()
    return result


# ------------------------------------------------------------------------------------------------
# Rows, table, CSV
# ------------------------------------------------------------------------------------------------

def _meta(device_name: str) -> dict:
    return {"gpu": device_name, "torch": torch.__version__, "triton": harness.triton_version(),
            "fastnote_commit": harness.git_commit(),
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def rows_from(samples: Dict[tuple, List[float]], metric: str, config: dict, calls: int, meta: dict,
              notes: Optional[Dict[tuple, str]] = None) -> List[dict]:
    rows = []
    for (op, mode, provider), values in samples.items():
        cfg = dict(config)
        if notes and notes.get((op, mode, provider)):
            cfg["note"] = notes[(op, mode, provider)]
        p50, p20, p80 = _quantiles(values)
        rows.append(dict(op=op, provider=provider, mode=mode, metric=metric, unit="us", x_name="calls",
                         x_value=calls, p50=p50, p20=p20, p80=p80, config=json.dumps(cfg), **meta))
    return rows


def print_table(rows: List[dict]) -> None:
    """One line per (metric, launch, op, mode): eager, fastnote, the difference and the ratio, and
    the custom-op and Triton-launch paths where measured."""
    table: Dict[tuple, Dict[str, float]] = {}
    for r in rows:
        launch = json.loads(r["config"]).get("launch", "")
        table.setdefault((r["metric"], launch, r["op"], r["mode"]), {})[r["provider"]] = float(r["p50"])
    last = None
    nan = float("nan")
    for (metric, launch, op, mode), v in table.items():
        if (metric, launch) != last:
            last = (metric, launch)
            print(f"\n{metric} us per call (launch {launch}; median)")
            print(f"  {'op':<22} {'mode':<7} {'eager':>9} {'fastnote':>9} {'diff':>9} {'ratio':>6} {'custom_op':>9}"
                  f" {'triton_launch':>13}")
        e, f = v.get("eager", nan), v.get("fastnote", nan)
        c, t = v.get("custom_op", nan), v.get("triton_launch", nan)
        print(f"  {op:<22} {mode:<7} {e:9.1f} {f:9.1f} {f - e:+9.1f} {f / e if e else nan:6.2f} {c:9.1f} {t:13.1f}")


def _read_csv(path: str) -> List[dict]:
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def stubbed_rows(ops, modes, calls, repeats, warmup, providers=ALL_PROVIDERS) -> List[dict]:
    """Part 1 in this process (needs the interpreter on and no GPU in use). One intra-op thread:
    on tiny tensors a second one only adds the wake-up latency of a busy core to eager's ops."""
    # With the launch stubbed the direct path is off (no GPU): triton_launch would time fastnote twice.
    providers = [p for p in providers if p != "triton_launch"]
    with one_thread():
        samples = measure_host(ops, modes, device=torch.device("cpu"), dtype=torch.float32, realistic=False,
                               calls=calls, repeats=repeats, warmup=warmup, stub=True, providers=providers)
    config = {"launch": "stubbed", "device": "cpu", "dtype": "fp32", "shapes": "tiny", "threads": 1}
    return rows_from(samples, "host", config, calls, _meta(harness.cpu_name()))


def gpu_rows(ops, modes, calls, repeats, warmup, providers=ALL_PROVIDERS, graph_time=True) -> List[dict]:
    """Part 2: real launches on the GPU, host time and CUDA-graph GPU time."""
    name = torch.cuda.get_device_name()
    meta = _meta(name)
    host = measure_host(ops, modes, device=torch.device("cuda"), dtype=torch.bfloat16, realistic=True,
                        calls=calls, repeats=repeats, warmup=warmup, stub=False, providers=providers)
    rows = rows_from(host, "host", {"launch": "real", "device": "cuda", "dtype": "bf16", "shapes": "realistic"},
                     calls, meta)
    if not graph_time:
        return rows
    graph = measure_gpu_graph(ops, modes, torch.bfloat16)
    rows += rows_from({k: [v[0]] * 3 for k, v in graph.items()}, "gpu",
                      {"launch": "real", "device": "cuda", "dtype": "bf16", "shapes": "realistic",
                       "timing": f"CUDA graph of {CALLS_PER_GRAPH} calls"},
                      CALLS_PER_GRAPH, meta, notes={k: v[1] for k, v in graph.items()})
    return rows


def _csv_list(text: Optional[str], allowed: Sequence[str], flag: str) -> List[str]:
    if not text:
        return list(allowed)
    items = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in items if s not in allowed]
    if unknown:
        sys.exit(f"{flag}: unknown {', '.join(unknown)}; choose from {', '.join(allowed)}")
    return items


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=DEFAULT_OUT, help=f"CSV path (default {DEFAULT_OUT})")
    p.add_argument("--ops", help="comma list of ops (default: all)")
    p.add_argument("--modes", help=f"comma list of {','.join(MODES)} (default: all)")
    p.add_argument("--calls", type=int, default=100, help="calls per timed round (launches stubbed)")
    p.add_argument("--gpu-calls", type=int, default=GPU_CALLS, help="calls per timed round (real launches)")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds (the median is reported)")
    p.add_argument("--warmup", type=int, default=10, help="untimed calls first")
    p.add_argument("--part", choices=("all", "stubbed", "gpu"), default="all",
                   help="stubbed: the launch-stubbed CPU part only; gpu: the GPU part only")
    p.add_argument("--providers", help=f"comma list of {','.join(ALL_PROVIDERS)} (default: all)")
    p.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph GPU times")
    p.add_argument("--quiet-table", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    ops = _csv_list(args.ops, list(OPS_BY_NAME), "--ops")
    modes = _csv_list(args.modes, MODES, "--modes")
    providers = _csv_list(args.providers, ALL_PROVIDERS, "--providers")
    for required in PROVIDERS:
        if required not in providers:
            sys.exit(f"--providers: {required} is always measured")
    counts = (args.calls, args.repeats, args.warmup)

    rows: List[dict] = []
    if args.part in ("all", "stubbed"):
        if not HAS_CUDA:
            rows += stubbed_rows(ops, modes, *counts, providers=providers)
        else:
            # The interpreter must be on before triton is imported, and the GPU part needs the
            # compiled kernels: the stubbed part runs in a fresh process that sees no GPU.
            with tempfile.TemporaryDirectory() as tmp:
                sub_out = os.path.join(tmp, "stubbed.csv")
                env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
                cmd = [sys.executable, os.path.abspath(__file__), "--part", "stubbed", "--out", sub_out,
                       "--ops", ",".join(ops), "--modes", ",".join(modes), "--providers", ",".join(providers),
                       "--calls", str(args.calls),
                       "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--quiet-table"]
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(proc.stdout[-4000:] + proc.stderr[-4000:])
                    return 1
                rows += _read_csv(sub_out)
    if args.part in ("all", "gpu") and HAS_CUDA:
        rows += gpu_rows(ops, modes, args.gpu_calls, args.repeats, args.warmup, providers, not args.no_graph)
    if not args.quiet_table:
        print_table(rows)
    harness.write_csv(os.path.abspath(args.out), rows)
    print(f"\nwrote {args.out} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
