"""CUDA graphs over patched models: a whole training step (forward, backward and optimiser step)
captured once with ``torch.cuda.graph`` and replayed, and ``torch.compile(mode="reduce-overhead")``
(cudagraph trees), each against the same patched training run step by step in eager mode. This is
how a small model sheds the host cost of every launch (docs/design.md section 10).

What makes fastnote's ops capturable: no host synchronisation inside an op (no ``.item()``, no
data-dependent shapes), scalars turned into tensors by a fill kernel rather than a host-to-device
copy, every buffer from torch's allocator (the graph's private pool during capture), and Triton
kernels compiled before capture by the warm-up steps.

The trainings here draw no random numbers inside a step (no dropout, drop path or random patch
sampling): a graph replays its captured RNG offsets, which the eager twin would not match."""
import copy

import pytest
import torch
from torch.utils._pytree import tree_map

import fastnote
from fastnote.compat import import_timm, import_torchvision_models
from fastnote.testing import assert_rms_close, load_example

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("no_tf32")]
WARMUP = 3
STEPS = 3
BOUND = 2e-4     # tests/test_examples.py's: the same run in another launch order


def _capturable(training):
    """The optimisers with their step counters on the device (``capturable``): a captured step
    may not touch host state."""
    for phase in training.phases:
        for group in phase.optimizer.param_groups:
            if "capturable" in group:
                group["capturable"] = True
    return training


def _example_training(name, device):
    return _capturable(load_example(name).training(True, device=device))


def _classifier_training(build, device):
    classifier = load_example("mobilenetv3")   # for its _common module
    model = build().to(device)
    fastnote.patch(model)
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    sizes = {"batch": 4, "image_size": 64, "classes": 10}
    common = classifier._common
    return _capturable(common.classifier_training("classifier", model, opt, sizes, torch.device(device), 0, None))


def _timm_swin():
    timm = import_timm()
    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=64, num_classes=10,
                             embed_dim=32, depths=(2, 2), num_heads=(1, 2), drop_path_rate=0.0)


def _mobilenet():
    models = import_torchvision_models()
    torch.manual_seed(0)
    return models.mobilenet_v3_small(num_classes=10, dropout=0.0)


def _trainings(make):
    """Two identical patched trainings and the batches they will see."""
    a, b = make(), make()
    for ma, mb in zip(a.modules.values(), b.modules.values()):
        mb.load_state_dict(ma.state_dict())
    batches = [a.next_batch() for _ in range(WARMUP + STEPS)]
    return a, b, batches


def _same_state(a, b, bound=BOUND):
    for name, ma in a.modules.items():
        mb = b.modules[name]
        for (key, pa), (_, pb) in zip(ma.named_parameters(), mb.named_parameters()):
            assert_rms_close(pa.detach(), pb.detach(), bound, f"{name}.{key}")
            if pa.grad is not None:
                assert_rms_close(pa.grad, pb.grad, bound, f"{name}.{key} gradient")


MAKERS = {
    "sagan": lambda device: _example_training("sagan", device),
    "style_transfer": lambda device: _example_training("style_transfer", device),
    "clip_step": lambda device: _example_training("clip_step", device),
    "siglip_step": lambda device: _example_training("siglip_step", device),
    "timm_swin": lambda device: _classifier_training(_timm_swin, device),
    "mobilenet_v3_small": lambda device: _classifier_training(_mobilenet, device),
}


@pytest.mark.parametrize("name", list(MAKERS))
def test_whole_step_captured_in_a_cuda_graph(name, device):
    graphed, eager, batches = _trainings(lambda: MAKERS[name](device))
    # warm-up on a side stream (compiles every Triton kernel, fills the optimiser state), as
    # torch.cuda.graphs' whole-network recipe does; the eager twin takes the same steps
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for batch in batches[:WARMUP]:
            graphed.step(batch)
    torch.cuda.current_stream().wait_stream(side)
    for batch in batches[:WARMUP]:
        eager.step(batch)

    static = tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, batches[WARMUP])
    graph = torch.cuda.CUDAGraph()
    graphed.zero_grad()
    with torch.cuda.graph(graph):
        static_losses = graphed.step(static)
    for batch in batches[WARMUP:]:
        tree_map(lambda dst, src: dst.copy_(src) if isinstance(dst, torch.Tensor) else None, static, batch)
        graph.replay()
        want = eager.step(batch)
        for key, loss in want.items():
            assert_rms_close(static_losses[key].reshape(1), loss.reshape(1), BOUND, f"{name} loss {key}")
    torch.cuda.synchronize()
    _same_state(graphed, eager)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sagan", "timm_swin"])
def test_reduce_overhead_compile(name, device):
    compiled, eager, batches = _trainings(lambda: MAKERS[name](device))
    compiled.compile(mode="reduce-overhead")
    for batch in batches:
        got, want = compiled.step(batch), eager.step(batch)
        for key, loss in want.items():
            # cudagraph trees may reuse a step's output memory on the next replay: read it now
            assert_rms_close(got[key].clone().reshape(1), loss.reshape(1), BOUND, f"{name} loss {key}")
    torch.cuda.synchronize()
    _same_state(compiled, eager)
