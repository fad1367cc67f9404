"""Input checks shared by every op: each error names the argument, what was expected and what came.

Every op validates through these helpers (in its ``fastnote/ops/<op>.py`` entry point, before the
backend choice), so the same mistake gets the same message everywhere. ``contiguous`` is the one
place where optional tensors are made contiguous before a kernel launch.
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence, Tuple

import torch

# float64 is taken too, and runs the plain-PyTorch reference (backend.kernels_for)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# The exact tensor types the ops' quick checks accept; others (subclasses) go through the full checks
PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def dtype_name(dtype: torch.dtype) -> str:
    """``float32`` for ``torch.float32``: how every message names a dtype."""
    return str(dtype).replace("torch.", "")


def tensor(name: str, t, *, ndim: Optional[Sequence[int] | int] = None, dtypes=FLOAT_DTYPES) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(dtype_name(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {dtype_name(t.dtype)}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(t.shape)}")
    return t


def same_device(**tensors: Optional[torch.Tensor]) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        desc = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"all tensors must be on one device, got {desc}")


def same_dtype(**tensors: Optional[torch.Tensor]) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    dtypes = {v.dtype for v in present.values()}
    if len(dtypes) > 1:
        desc = ", ".join(f"{k} {dtype_name(v.dtype)}" for k, v in present.items())
        raise TypeError(f"all tensors must have one dtype, got {desc}")


def shape(name: str, t: torch.Tensor, expected: Sequence[Optional[int]]) -> None:
    """``expected`` may hold None for a free dimension."""
    ok = t.dim() == len(expected) and all(e is None or e == s for e, s in zip(expected, t.shape))
    if not ok:
        want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")


def choice(name: str, value: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
    return value


def positive(name: str, value: float) -> float:
    if not value > 0:  # also rejects NaN
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def integer(name: str, value, minimum: Optional[int] = None, below: Optional[int] = None,
            what: str = "") -> int:
    """An int (not a bool) with ``minimum <= value < below``; ``what`` explains a bound."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if (minimum is not None and value < minimum) or (below is not None and value >= below):
        if below is None:
            bound = f">= {minimum}"
        elif minimum is None:
            bound = f"< {below}"
        else:
            bound = f"in [{minimum}, {below})"
        raise ValueError(f"{name} must be {bound}{what}, got {value}")
    return int(value)


def real(name: str, value, *, positive: bool = False, nonnegative: bool = False) -> float:
    """A finite real number (not a bool); ``positive``: also > 0; ``nonnegative``: also >= 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    # value - value == 0 is False only for inf and nan, and traces on a symbolic float (a default
    # argument torch.compile(dynamic=True) made one), where math.isfinite cannot
    if not value - value == 0 or (positive and not value > 0) or (nonnegative and not value >= 0):
        bound = " > 0" if positive else " >= 0" if nonnegative else ""
        raise ValueError(f"{name} must be a finite number{bound}, got {value}")
    return float(value)


def scale(value, head_dim: int) -> float:
    """Attention scale: ``head_dim ** -0.5`` when None, else a finite float."""
    return head_dim ** -0.5 if value is None else real("scale", value)


def window_pair(name: str, window_size) -> Tuple[int, int]:
    """An int or a pair of ints >= 1, as ``(height, width)``."""
    if isinstance(window_size, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {window_size!r}")
    if isinstance(window_size, int):
        pair = (window_size, window_size)
    elif isinstance(window_size, (tuple, list)) and len(window_size) == 2 \
            and all(isinstance(w, int) and not isinstance(w, bool) for w in window_size):
        pair = (int(window_size[0]), int(window_size[1]))
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {window_size!r}")
    if min(pair) < 1:
        raise ValueError(f"{name} must be >= 1, got {window_size!r}")
    return pair


def contiguous(*tensors: Optional[torch.Tensor]):
    """Each tensor made contiguous (no copy when it already is); None stays None. One tensor in,
    one out; several in, a tuple out."""
    out = tuple(t.contiguous() if t is not None else None for t in tensors)
    return out[0] if len(out) == 1 else out


# Whether autocast is on for any device type (one call; torch._C has had it since 2.4).
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None)


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype active for ``device``'s type, or None."""
    if _any_autocast is not None and not _any_autocast():   # the common case, without device.type
        return None
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def scalar(name: str, t) -> torch.Tensor:
    """A float tensor holding one value (0-dim or one element), as a learnable scale or bias."""
    tensor(name, t)
    if t.numel() != 1:
        raise ValueError(f"{name} must be a scalar tensor (0-dim or one element), got shape {list(t.shape)}")
    return t


def scalar_operand(name: str, value, like) -> torch.Tensor:
    """A loss's one-value operand (``logit_scale``, ``logit_bias``) as the ops take it: a tensor
    as it is, but an fp64 one with lower-precision embeddings ``like`` cast to fp32 (differentiably:
    its gradient comes back in fp64; the kernels read an fp32 value); a Python real as a 0-dim
    tensor on ``like``'s device, fp32 (fp64 with fp64 embeddings), made by a fill kernel, not a
    host-to-device copy (capturable in a CUDA graph). Other tensors are left to ``scalar``."""
    wide = isinstance(like, torch.Tensor) and like.dtype is torch.float64
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype is torch.float64 and not wide else value
    real(name, value)
    return torch.full((), float(value), dtype=torch.float64 if wide else torch.float32,
                      device=like.device if isinstance(like, torch.Tensor) else None)


def boolean(name: str, value) -> bool:
    """A real bool (not 0/1, not a tensor): flags that pick a code path."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def process_group(owner: str, rank, world_size, group):
    """The process group of an open_clip-style loss module built with ``rank`` and ``world_size``:
    None for one process (``world_size`` 1 and no ``group``), else ``group`` (default the world
    group, as open_clip uses), checked to have ``world_size`` ranks with this process at ``rank``;
    None again for a group of one."""
    if world_size <= 1 and group is None:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{owner}(world_size={world_size}) needs torch.distributed to be "
                           "initialised (dist.init_process_group)")
    group = group if group is not None else dist.group.WORLD
    size, me = dist.get_world_size(group), dist.get_rank(group)
    if size != world_size:
        raise ValueError(f"{owner} was built with world_size={world_size}, but its process group has {size} ranks")
    if me != rank:
        raise ValueError(f"{owner} was built with rank={rank}, but this process is rank {me} of its process group")
    return group if size > 1 else None


def has_channels(name: str, t: torch.Tensor, dim: int = 1, what: str = "") -> None:
    """At least one channel along ``dim`` (``what`` names it, e.g. "d_qk >= 1")."""
    if t.shape[dim] == 0:
        note = f" ({what})" if what else ""
        raise ValueError(f"{name} must have at least one channel{note}, got shape {list(t.shape)}")


def module(name: str, m) -> torch.nn.Module:
    if not isinstance(m, torch.nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(m).__name__}")
    return m


def autocast(*tensors: Optional[torch.Tensor]):
    """Each tensor in the autocast dtype when autocast is on for the first one's device (as
    torch.bmm would cast it: float64 tensors stay as they are); None stays None. One tensor in,
    one out; several in, a tuple out."""
    dtype = autocast_dtype(tensors[0].device)
    if dtype is not None:
        tensors = tuple(t.to(dtype) if t is not None and t.dtype != dtype and t.dtype is not torch.float64 else t
                        for t in tensors)
    return tensors[0] if len(tensors) == 1 else tuple(tensors)


def embedding_pair(image_emb, text_emb, logit_scale, logit_bias=None) -> None:
    """The contrastive losses' inputs: two [n, d] embeddings of one dtype, d >= 1, and one-value
    tensors ``logit_scale`` (and ``logit_bias`` where the loss has one), all on one device. The
    common case passes in a few comparisons (host time per call); anything else goes through the
    checks, for the message."""
    if (type(image_emb) in PLAIN_TENSORS and type(text_emb) in PLAIN_TENSORS and type(logit_scale) in PLAIN_TENSORS
            and image_emb.dtype in FLOAT_DTYPES and text_emb.dtype == image_emb.dtype
            and logit_scale.dtype in FLOAT_DTYPES and image_emb.dim() == 2
            and text_emb.shape == image_emb.shape and image_emb.shape[1] and logit_scale.numel() == 1
            and image_emb.device == text_emb.device == logit_scale.device
            and (logit_bias is None or (type(logit_bias) in PLAIN_TENSORS and logit_bias.dtype in FLOAT_DTYPES
                                        and logit_bias.numel() == 1 and logit_bias.device == image_emb.device))):
        return
    tensor("image_emb", image_emb, ndim=2)
    tensor("text_emb", text_emb, ndim=2)
    shape("text_emb", text_emb, list(image_emb.shape))
    has_channels("image_emb", image_emb)
    scalar("logit_scale", logit_scale)
    if logit_bias is not None:
        scalar("logit_bias", logit_bias)
    same_device(image_emb=image_emb, text_emb=text_emb, logit_scale=logit_scale, logit_bias=logit_bias)
    same_dtype(image_emb=image_emb, text_emb=text_emb)
