"""Scale-out on torch's own engines: the patched SAGAN (examples/sagan.py) and the patched Swin
(examples/swin_classifier.py, timm) trained by 2 CPU processes over gloo, under DDP and under FSDP2
(``fully_shard``), against one process training the same model on the combined batch.

What is checked, per model and engine:
- fastnote's kernels ran in every worker (the backend is Triton and kernels were launched);
- the ranks end with the same parameters and buffers, bitwise (under FSDP2 the gathered
  parameters are one tensor by construction, so there the per-rank buffers carry the check);
- the parameters equal single-process training on the combined batch.

How close to one process. Both sides run the same fp32 kernels; what differs is the batch each
reduction sees (a batch of 2n against two of n, then gloo's average of the two gradients), so
each gradient is rounded differently, by a few unit roundoffs (u = 2**-24 ~ 6e-8) times the
square root of the reduction depth: ~1e-6 RMS-relative. SGD (with momentum) turns gradient
differences into parameter differences linearly, scaled by the learning rate; Adam is not used
here because its first step is ~lr * sign(g), which turns rounding noise on a gradient entry that
is zero in exact arithmetic (the key conv's bias under the softmax) into a difference of 2 * lr.
Two bounds, both RMS-relative:
- ``BOUND`` = 2e-4 (the fp32 tolerance for matmul-based ops, docs/design.md section 3.1) on each parameter tensor;
- ``BOUND`` on the whole model's parameter update (all tensors, after minus before, concatenated):
  the parameters barely move in two small steps, so this is the check a wrong gradient (a rank's
  share dropped or counted twice: off by 0.5 or more) fails.
Measured (both engines alike): at most 4.5e-7 on a parameter tensor and 5.9e-7 on the update.
"""
import functools
import io
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import fastnote
from fastnote.testing import assert_rms_close, load_example, rms_relative_error

WORLD = 2
STEPS = 2
BOUND = 2e-4
# local batch per rank: the combined batch is WORLD times it
LOCAL_BATCH = {"sagan": 2, "swin": 1}


def _examples():
    return load_example("sagan"), load_example("swin_classifier")


def _need_timm():
    _, swin_classifier = _examples()
    try:
        swin_classifier._common.import_timm()
    except ImportError as e:
        pytest.skip(f"the Swin model needs timm: {e}")


def _need_distributed():
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")


# ------------------------------------------------------------------------------------------------
# The models and one training step, shared by the workers and the single-process run
# ------------------------------------------------------------------------------------------------

def _build(name):
    """name -> module of the patched model, seeded as the example seeds it."""
    sagan, swin_classifier = _examples()
    if name == "sagan":
        G, D, _ = sagan.build(use_fastnote=True, seed=0)
        # Batch norm normalises with the statistics of the batch it sees: a rank's half is not the
        # combined batch, so in training mode no engine reproduces one process without
        # SyncBatchNorm (GPU only). Running statistics make the generator batch-independent.
        for m in G.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
        modules = {"G": G, "D": D}
    else:
        model, _ = swin_classifier.build(use_fastnote=True, seed=0)
        model.train()
        # timm's Swin-T has stochastic depth (drop_path_rate 0.1): each sample's residual branches
        # are dropped at random, drawn per rank, so no two-process run can equal one process on
        # the combined batch. Its DropPath modules are put in eval mode (identity); the rest of
        # the model trains (no dropout, no batch-coupled layer: layer norms only).
        timm = swin_classifier._common.import_timm()
        for m in model.modules():
            if isinstance(m, (timm.layers.DropPath, torch.nn.Dropout)):
                m.eval()
        modules = {"swin": model}
    return modules


def _data(name, step, rows):
    """Step ``step``'s combined batch (every rank draws all of it), sliced to ``rows``."""
    gen = torch.Generator().manual_seed(1000 + step)
    b = WORLD * LOCAL_BATCH[name]
    if name == "sagan":
        sagan, _ = _examples()
        size, z_dim = sagan.SMOKE["image_size"], sagan.SMOKE["z_dim"]
        real = torch.rand(b, 3, size, size, generator=gen) * 2 - 1
        z_d, z_g = torch.randn(b, z_dim, generator=gen), torch.randn(b, z_dim, generator=gen)
        return real[rows], z_d[rows], z_g[rows]
    _, swin_classifier = _examples()
    size, classes = swin_classifier.SMOKE["image_size"], swin_classifier.SMOKE["classes"]
    images = torch.randn(b, 3, size, size, generator=gen)
    labels = torch.randint(0, classes, (b,), generator=gen)
    return images[rows], labels[rows]


def _step(name, models, opts, batch):
    """One optimiser step per module. Losses are means over the local batch: averaged over equal
    shares by DDP / FSDP2, that is the mean over the combined batch."""
    if name == "sagan":
        G, D = models["G"], models["D"]
        real, z_d, z_g = batch
        n = real.shape[0]
        with torch.no_grad():
            fake = G(z_d)
        # real and fake through one call (the discriminator has no batch-coupled layer), so each
        # step runs one power iteration per spectral norm on every side alike
        scores = D(torch.cat([real, fake]))
        d_loss = F.relu(1.0 - scores[:n]).mean() + F.relu(1.0 + scores[n:]).mean()
        opts["D"].zero_grad()
        d_loss.backward()
        opts["D"].step()
        g_loss = -D(G(z_g)).mean()
        opts["G"].zero_grad()
        opts["D"].zero_grad()
        g_loss.backward()
        opts["G"].step()
    else:
        images, labels = batch
        loss = F.cross_entropy(models["swin"](images), labels)
        opts["swin"].zero_grad()
        loss.backward()
        opts["swin"].step()


def _optimisers(modules):
    return {k: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for k, m in modules.items()}


def _state(modules, gather=False):
    """name -> (kind, tensor) for every parameter ("param") and buffer ("buffer"), on plain CPU
    tensors; ``gather``: FSDP2's sharded parameters are gathered first (a collective)."""
    out = {}
    for key, m in modules.items():
        for n, p in m.named_parameters():
            t = p.full_tensor() if gather and hasattr(p, "full_tensor") else p
            out[f"{key}.{n}"] = ("param", t.detach().clone())
        for n, b in m.named_buffers():
            out[f"{key}.{n}"] = ("buffer", b.detach().clone())
    return out


# ------------------------------------------------------------------------------------------------
# Workers
# ------------------------------------------------------------------------------------------------

def _count_launches():
    from triton.runtime.jit import KernelInterface

    counter = [0]
    original = KernelInterface.__getitem__

    def counting(self, grid):
        counter[0] += 1
        return original(self, grid)

    KernelInterface.__getitem__ = counting
    return counter


def _compiled_kernels():
    """fastnote's loaded kernels that triton compiled instead of interpreting: those decorated
    while TRITON_INTERPRET was not yet set."""
    from triton.runtime.jit import JITFunction, KernelInterface

    found = []
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or not mod_name.startswith("fastnote.triton_kernels."):
            continue
        for attr, obj in vars(mod).items():
            while isinstance(obj, KernelInterface) and not isinstance(obj, JITFunction) and hasattr(obj, "fn"):
                obj = obj.fn   # an autotuner or heuristics wrapper
            if isinstance(obj, JITFunction):
                found.append(f"{mod_name}.{attr}")
    return found


def _worker(rank, name, engine, store_path, results):
    import torch.distributed as dist

    try:
        # TRITON_INTERPRET came with the environment (the parent's ``interpreted_children``): set
        # here it would be too late, fastnote and triton being imported before this runs
        assert os.environ.get("TRITON_INTERPRET") == "1", "TRITON_INTERPRET=1 was not inherited"
        torch.set_num_threads(1)
        launches = _count_launches()
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD)
        assert fastnote.backend.use_triton(torch.device("cpu")), "fastnote would not run its Triton kernels"
        modules = _build(name)
        if engine == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            # broadcast_buffers (the default): rank 0's spectral-norm u / v go to every rank
            # before each forward. The ranks start from one seed and the power iteration depends
            # on the weight and u only, never on the data, so the broadcast changes nothing, and
            # each rank does what one process does: one power iteration per forward.
            wrapped = {k: DDP(m) for k, m in modules.items()}
        else:
            from torch.distributed.fsdp import fully_shard

            # Only parameters are sharded; u / v stay per rank, each updated by the same power
            # iteration on the same gathered weight.
            for m in modules.values():
                for block in getattr(m, "layers", []):   # Swin's stages: one unit each
                    fully_shard(block)
                fully_shard(m)
            wrapped = modules
        opts = _optimisers(modules)
        b = LOCAL_BATCH[name]
        rows = slice(rank * b, (rank + 1) * b)
        for step in range(STEPS):
            _step(name, wrapped, opts, _data(name, step, rows))
        state = _state(modules, gather=engine == "fsdp2")
        assert launches[0] > 0, "no fastnote kernel was launched"
        compiled = _compiled_kernels()
        assert not compiled, f"compiled (not interpreted) kernels on CPU tensors: {compiled}"
        buf = io.BytesIO()
        torch.save({"state": state, "launches": launches[0]}, buf)
        dist.destroy_process_group()
        results.put((rank, "ok", buf.getvalue()))
    except BaseException as e:  # reported to the parent
        results.put((rank, f"{type(e).__name__}: {e}", None))
        raise
    finally:
        results.close()
        results.join_thread()
    # Leave without running C++ static destructors: gloo's teardown at interpreter exit sometimes
    # aborts after all the work is done; the parent checks every rank's report instead.
    os._exit(0)


@functools.lru_cache(maxsize=None)
def _single_process(name):
    """(state before, state after) of one process on the combined batch: the same for both
    engines, so computed once per model (the tests only read it)."""
    modules = _build(name)
    before = _state(modules)
    opts = _optimisers(modules)
    for step in range(STEPS):
        _step(name, modules, opts, _data(name, step, slice(None)))
    return before, _state(modules)


def _run(name, engine, tmp_path, interpreted_children):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with interpreted_children():   # the workers run fastnote's kernels on CPU tensors
        procs = mp.spawn(_worker, args=(name, engine, str(tmp_path / "store"), results), nprocs=WORLD,
                         join=False)
    try:
        # one process on the combined batch, while the workers run
        before, want = _single_process(name)
        reports = {}
        for _ in range(WORLD):
            rank, status, payload = results.get(timeout=600)
            reports[rank] = (status, payload)
    finally:
        procs.join()
    assert sorted(reports) == list(range(WORLD)), reports
    failed = {r: s for r, (s, _) in reports.items() if s != "ok"}
    assert not failed, failed
    got = [torch.load(io.BytesIO(reports[r][1])) for r in range(WORLD)]
    for r, g in enumerate(got):
        assert g["launches"] > 0, f"rank {r} launched no kernel"
    states = [g["state"] for g in got]
    assert list(states[0]) == list(want), "the workers' model has other parameters / buffers"

    # every rank the same, bitwise
    for key, (_, t0) in states[0].items():
        for r in range(1, WORLD):
            assert torch.equal(states[r][key][1], t0), f"{key}: rank {r} differs from rank 0"

    # as one process on the combined batch
    param_errors, update_got, update_want = [], [], []
    for key, (kind, t) in states[0].items():
        e = want[key][1]
        assert t.shape == e.shape and t.dtype == e.dtype, key
        if kind == "param":
            assert_rms_close(t, e, BOUND, msg=f"{engine} {key}")
            param_errors.append(rms_relative_error(t, e))
            update_got.append((t - before[key][1]).flatten())
            update_want.append((e - before[key][1]).flatten())
        elif t.is_floating_point():       # spectral-norm u / v
            assert_rms_close(t, e, BOUND, msg=f"{engine} buffer {key}")
        else:
            assert torch.equal(t, e), key
    update_got, update_want = torch.cat(update_got), torch.cat(update_want)
    assert update_want.abs().max() > 0, "the single-process run did not move the parameters"
    assert_rms_close(update_got, update_want, BOUND, msg=f"{engine} parameter update")
    return max(param_errors), rms_relative_error(update_got, update_want)


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------

def test_ddp_sagan(tmp_path, interpreted_children):
    _need_distributed()
    print("max parameter error %.3g, update error %.3g" % _run("sagan", "ddp", tmp_path, interpreted_children))


def test_ddp_swin(tmp_path, interpreted_children):
    _need_distributed()
    _need_timm()
    print("max parameter error %.3g, update error %.3g" % _run("swin", "ddp", tmp_path, interpreted_children))


def test_fsdp2_sagan(tmp_path, interpreted_children):
    _need_distributed()
    print("max parameter error %.3g, update error %.3g" % _run("sagan", "fsdp2", tmp_path, interpreted_children))


def test_fsdp2_swin(tmp_path, interpreted_children):
    _need_distributed()
    _need_timm()
    print("max parameter error %.3g, update error %.3g" % _run("swin", "fsdp2", tmp_path, interpreted_children))
