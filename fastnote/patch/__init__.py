"""Swap eager modules in an existing model for fastnote ones, in place, and back.

>>> import torch, fastnote
>>> model = torch.nn.Sequential(torch.nn.utils.spectral_norm(torch.nn.Conv2d(3, 8, 3)), torch.nn.Hardswish())
>>> report = fastnote.patch(model)
>>> list(report)
['0.weight: torch.nn.utils.spectral_norm -> fastnote.nn.utils.spectral_norm']
>>> print(report)
fastnote.patch: 1 replaced, 0 left
  1 x torch.nn.utils.spectral_norm -> fastnote.nn.utils.spectral_norm  (0.weight)
>>> fastnote.unpatch(model)
['0.weight: fastnote.nn.utils.spectral_norm -> torch.nn.utils.spectral_norm']

What is recognised, by structure rather than by class name (so copies of the published code are
found too), with the family name ``include`` takes:

- ``SqueezeExcitation``: a module made of two 1x1 convs (C -> Cr -> C), an activation, a gate and
  at most an average pool, whose forward is ``x * gate(conv2(act(conv1(mean(x)))))`` (checked on a
  small probe input): torchvision's ``SqueezeExcitation`` (``fc1``, ``fc2``), timm's
  ``SqueezeExcite`` (``conv_reduce``, ``conv_expand``), timm's ``SEModule`` (RegNetY, SE-ResNet)
  and copies using either pair of names. The activation (ReLU, SiLU, h-swish) and gate (sigmoid,
  hard sigmoid) are known by class or, for a library's own class (timm's ``Sigmoid``), by what
  they compute.
- ``hswish_se``: in an ``nn.Sequential`` (not a subclass with a ``forward`` of its own), an
  ``nn.Hardswish`` (or such a Sequential ending in one, as torchvision's ``Conv2dNormActivation``)
  directly followed by such an SE: the h-swish becomes an ``nn.Identity`` and the SE the fused
  ``hswish_se`` module (so the Sequential that held the h-swish now returns its input). In timm's
  ``InvertedResidual`` and ``DepthwiseSeparableConv`` (MobileNetV3, EfficientNet-lite and the like)
  the h-swish is the ``act`` of the ``BatchNormAct2d`` before the SE: it becomes the Identity
  there, once the block's forward, run on a probe copy, is shown to feed it straight to the SE.
  Where the order is known neither way (a block of another class), the pair is reported as left,
  and the SE is replaced alone (the h-swish stays torch's).
- ``WindowAttention``: Swin's / timm's ``WindowAttention`` (``qkv``, ``proj``,
  ``relative_position_bias_table``, an ``[N, N]`` ``relative_position_index``) -> the core op
  module ``fastnote.nn.WindowAttention``, inside a block that keeps its own shift, pad and
  partition code (the original Swin code's blocks; timm's where the fused path below is not used).
- ``ShiftedWindowAttention``: the fused path (shift, pad, partition and their reverse done by the
  attention kernel's index arithmetic). torchvision's ``ShiftedWindowAttention`` (flat ``[N*N]``
  index, ``[B, H, W, C]`` input) -> fastnote's, in torchvision's order (pad, then roll) with its
  shift rule; timm's ``SwinTransformerBlock`` -> the same block object's class switched to
  ``fastnote.nn.timm_swin.FusedSwinTransformerBlock``, in timm's order (roll, then pad), its
  ``attn`` left as it is (the fused ``_attn`` reads its parameters).
- ``SelfAttention``: SAGAN-shaped attention (``query_conv``, ``key_conv``, ``value_conv``,
  ``gamma``; query/key width C // 8) returning ``(out, attention)`` -> ``fastnote.nn.SelfAttention``
  with ``return_attention=True``, the same return convention (set the module's
  ``return_attention = False`` to get ``(out, None)`` and O(N) memory); and BigGAN's non-local
  block (``theta``, ``phi``, ``g``, ``o``, ``gamma``; keys and values 2x2 max-pooled) ->
  ``fastnote.nn.BigGANAttention``, its convs (spectral-norm ones included) kept as they are.
- ``spectral_norm``: torch's hook (``torch.nn.utils.spectral_norm``) and parametrization
  versions, and SAGAN's ``SpectralNorm`` wrapper (``module``, ``name``, ``power_iterations``,
  ``<name>_u/_v/_bar``) -> fastnote's, on the same u and v tensors, so training continues exactly.
- ``hf_swin``: Hugging Face transformers' ``SwinLayer`` / ``Swinv2Layer`` -> the same block, its class
  switched to ``fastnote.nn.hf_swin``'s fused subclass (pad, roll, partition, attention and their
  reverse in ``swin_window_attention`` / ``swin_window_attention_v2``, the library's order).
- ``spandrel_swin``: spandrel's SwinIR / Swin2SR ``SwinTransformerBlock`` -> likewise
  (``fastnote.nn.spandrel_swin``, the block's order: roll, no pad).

A replacement reuses the original's parameter and buffer objects (an optimiser built before
patching keeps working), and keeps device, dtype, train/eval mode and the state_dict keys, so
checkpoints load before and after patching. ``fastnote.unpatch`` puts the originals back, with
any parameter or buffer object the model holds now (``model.to`` replaces buffers). Nothing is
drawn from the random generators.

The report lists what was replaced, in the ``"<path>: Old -> New"`` form (``list(report)``,
``len(report)``), and, in ``report.left``, what looked like a candidate but was left, with the
reason: a patch that stops applying shows there instead of passing silently; ``expect`` turns a
count mismatch into an error (the model left unpatched). A module that looks like attention (a
relative position bias, or query/key/value projections with a softmax) but that no family
recognises is listed there too, under the kind ``"attention"`` (the rule:
``fastnote.patch.attention_like``).

Hooks: a replaced module's own forward and backward hooks go to its replacement (the user's
handles still remove them). A fused replacement reads its submodules' parameters instead of
calling them, so a module whose submodules hold hooks (a pruning mask or ``weight_norm`` on an
SE's conv, an attention-map hook on a ``softmax``, a user's feature hook) is left, with the
reason, rather than have the hook silently stop running; so is an h-swish + SE pair where a hook
would see the h-swish's output or the SE's input, which the fused module never forms.
Parametrizations are not hooks: a parametrized weight is read through them. For the same reason a
Swin attention whose Linear layers (or the attention module itself, where a fused block reads it)
have a forward of their own, as peft's and loralib's LoRA layers and quantised Linear layers do,
is left with the reason: the fused path reads their weights and would drop what that forward adds.
Models change after patching too (``get_peft_model`` on a patched model, a hook added later): a
fused Swin block checks on every call that what it reads is still as patched and unhooked
(``fastnote.nn._reads``) and otherwise runs the library's own forward; fastnote's own fused
modules (``ShiftedWindowAttention``, the SE modules' convs) raise a ``ValueError`` there.

All or nothing: an error part way through undoes what the call had changed before it is raised.
Probes run a candidate's forward without its own hooks, on a copy where it has state to change (a
spectral-norm conv in training), and a model on the meta device has no values to probe: its
candidates are left, with that reason (patch after ``to_empty`` and loading the weights).

The code: ``engine`` (the walk, the undo records, ``patch``, ``unpatch``), ``report``,
``registry`` (the families, from which ``KINDS`` comes), ``probe`` (what the converters share),
one module per family (``squeeze_excitation``, ``window_attention``,
``self_attention``, ``spectral_norm``, ``hf_swin``, ``spandrel``) and ``attention_like``. The family modules register
themselves when imported, in the order below, which is the order of ``KINDS``.
"""
from . import registry
from . import squeeze_excitation, window_attention, self_attention, spectral_norm  # noqa: F401,I001
from . import hf_swin, spandrel  # noqa: F401
from . import attention_like  # noqa: F401
from .engine import patch, unpatch
from .report import Left, PatchReport, Replaced

KINDS = registry.kinds()
# ``fastnote.patch`` is this function once fastnote is imported (the package's name is taken by
# it), so the families are on it too: ``fastnote.patch.KINDS``
patch.KINDS = KINDS

__all__ = ["patch", "unpatch", "PatchReport", "Replaced", "Left", "KINDS"]
