"""Perceptual-loss modules (Johnson et al.): StyleLoss, TotalVariation and PerceptualLoss, built on
fastnote.gram / style_loss / tv_loss."""
from __future__ import annotations

from typing import Mapping, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import checks
from ..ops.gram import NORMALIZE, gram, style_loss
from ..ops.tv_loss import tv_loss

TERMS = ("content", "style", "pixel", "tv")
_TARGET = "style_gram_"   # + the layer index: PerceptualLoss's buffers of style targets


def _target_gram(features: Tensor, normalize: str) -> Tensor:
    """A style target: the Gram matrix of ``features`` in float32, without grad, and without
    autocast (which would round it to half precision: inf in fp16 with ``normalize="none"``)."""
    with torch.no_grad(), torch.autocast(features.device.type, enabled=False):
        return gram(features.detach().float(), normalize)


class StyleLoss(nn.Module):
    """Style loss against fixed target features: ``forward(x) = style_loss(x, gram(target))``.

    target_features: [1, C, H, W] (one style image, broadcast over any batch), [B, C, H, W] or
    the [.., C, N] forms; their Gram matrix is computed once, in float32 without grad or autocast,
    and kept as the buffer ``target_gram`` ([1 or B, C, C]; saved in the state_dict, moved by
    ``.to``).

    A criterion: ``forward`` returns the loss. The PyTorch tutorial's ``StyleLoss`` (same
    constructor) is a layer that returns its input and keeps the loss in ``.loss``, and its loss,
    ``mse(G, T)`` (a mean over the C x C entries), is ``H*W / C`` times this one at batch 1;
    docs/ops.md section 2.2 relates the other published style losses to this one.

    >>> import torch, fastnote
    >>> loss = fastnote.nn.StyleLoss(torch.randn(1, 8, 6, 6))
    >>> loss.target_gram.shape, loss(torch.randn(3, 8, 6, 6)).shape
    (torch.Size([1, 8, 8]), torch.Size([]))
    """

    def __init__(self, target_features: Tensor, normalize: str = "chw"):
        super().__init__()
        self.normalize = checks.choice("normalize", normalize, NORMALIZE)
        checks.tensor("target_features", target_features, ndim=(3, 4))
        self.register_buffer("target_gram", _target_gram(target_features, normalize))

    def forward(self, x: Tensor) -> Tensor:
        return style_loss(x, self.target_gram, self.normalize)

    def extra_repr(self) -> str:
        return f"channels={self.target_gram.shape[-1]}, normalize={self.normalize!r}"


class TotalVariation(nn.Module):
    """Anisotropic total variation / (C*H*W) of an image batch [B, C, H, W] (``fastnote.tv_loss``).

    >>> import torch, fastnote
    >>> fastnote.nn.TotalVariation()(torch.ones(2, 3, 4, 4))
    tensor(0.)
    """

    def forward(self, y: Tensor) -> Tensor:
        return tv_loss(y)


class PerceptualLossTerms(NamedTuple):
    """The four terms of the perceptual loss, unweighted (the seed's return value)."""
    content: Tensor
    style: Tensor
    pixel: Tensor
    tv: Tensor


class PerceptualLoss(nn.Module):
    """The perceptual loss of Johnson et al. on any feature extractor.

    ``feature_extractor(image)`` returns a sequence of feature maps (e.g. VGG-16's relu1_2,
    relu2_2, relu3_3, relu4_3). For a content image ``x`` and a generated image ``y_hat``:

    - content = ``mse(features(y_hat)[content_layer], features(x)[content_layer])``;
    - style = sum over ``style_layers`` (default: every feature map) of
      ``style_loss(features(y_hat)[j], gram(features(style_image)[j]))``;
    - pixel = ``mse(y_hat, x)``;
    - tv = ``tv_loss(y_hat)``.

    ``terms(x, y_hat)`` returns them as ``PerceptualLossTerms(content, style, pixel, tv)``;
    ``forward(x, y_hat)`` returns their weighted sum with ``weights`` (a mapping with any of the
    keys content/style/pixel/tv, or four numbers in that order; missing keys weigh 1). The style
    targets come from ``style_image`` ([1, 3, H, W]: one image, shared by every batch) at
    construction or later through ``set_style``; they are buffers ``style_gram_<layer>``. The
    extractor is used as given (put it in eval mode and freeze it, as the perceptual-loss code
    does, if it should not train).

    >>> import torch, fastnote
    >>> net = torch.nn.Conv2d(3, 4, 3, padding=1)
    >>> extractor = lambda img: (torch.relu(net(img)), torch.relu(net(img)).mean(1, keepdim=True))
    >>> loss = fastnote.nn.PerceptualLoss(extractor, content_layer=0, weights={"tv": 0.0},
    ...                                   style_image=torch.rand(1, 3, 8, 8))
    >>> x, y_hat = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8, requires_grad=True)
    >>> terms = loss.terms(x, y_hat)
    >>> torch.allclose(loss(x, y_hat), terms.content + terms.style + terms.pixel)
    True
    """

    def __init__(self, feature_extractor, content_layer: int = 1, style_layers: Optional[Sequence[int]] = None,
                 weights: Union[Mapping[str, float], Sequence[float], None] = None,
                 style_image: Optional[Tensor] = None, normalize: str = "chw"):
        super().__init__()
        if not callable(feature_extractor):
            raise TypeError(f"feature_extractor must be callable, got {type(feature_extractor).__name__}")
        self.feature_extractor = feature_extractor
        self.content_layer = checks.integer("content_layer", content_layer, minimum=0)
        if style_layers is not None:
            style_layers = [checks.integer("style_layers[]", j, minimum=0) for j in style_layers]
            if not style_layers:
                raise ValueError("style_layers must name at least one feature map (None: every one); for no style "
                                 "term, give it weight 0")
        self.style_layers = style_layers
        self.weights = self._weights(weights)
        self.normalize = checks.choice("normalize", normalize, NORMALIZE)
        self._style_names = []
        if style_image is not None:
            self.set_style(style_image)

    @staticmethod
    def _weights(weights):
        if weights is None:
            return dict.fromkeys(TERMS, 1.0)
        if isinstance(weights, Mapping):
            unknown = set(weights) - set(TERMS)
            if unknown:
                raise ValueError(f"weights keys must be among {TERMS}, got {sorted(unknown)}")
            out = dict.fromkeys(TERMS, 1.0)
            out.update({k: checks.real(f"weights[{k!r}]", v) for k, v in weights.items()})
            return out
        weights = list(weights)
        if len(weights) != len(TERMS):
            raise ValueError(f"weights must have {len(TERMS)} entries {TERMS}, got {len(weights)}")
        return {k: checks.real(f"weights[{i}]", v) for i, (k, v) in enumerate(zip(TERMS, weights))}

    def _features(self, image: Tensor):
        feats = self.feature_extractor(image)
        if isinstance(feats, Tensor) or not isinstance(feats, Sequence):
            raise TypeError("feature_extractor must return a sequence of feature maps, got "
                            f"{type(feats).__name__}")
        if self.content_layer >= len(feats):
            raise ValueError(f"content_layer must be < {len(feats)} (the extractor's feature maps), "
                             f"got {self.content_layer}")
        for j in self.style_layers or ():
            if j >= len(feats):
                raise ValueError(f"style_layers must index the extractor's {len(feats)} feature maps, got {j}")
        return feats

    def _layers(self, n: int):
        return list(range(n)) if self.style_layers is None else list(self.style_layers)

    def set_style(self, style_image: Tensor) -> None:
        """Compute and store the style targets (Gram matrices, fp32, no grad or autocast) of
        ``style_image``."""
        checks.tensor("style_image", style_image, ndim=4)
        with torch.no_grad():
            feats = self._features(style_image.detach())
        targets = {f"{_TARGET}{j}": _target_gram(feats[j], self.normalize) for j in self._layers(len(feats))}
        self._set_targets(targets)

    def _set_targets(self, targets) -> None:
        for name in self._style_names:
            delattr(self, name)
        self._style_names = []
        for name, t in targets.items():
            self.register_buffer(name, t)
            self._style_names.append(name)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # The style targets a checkpoint holds are what it was trained against: an instance built
        # without style_image (or with other layers) takes them, so training resumes without it.
        key = prefix + _TARGET
        saved = {int(k[len(key):]): v for k, v in state_dict.items() if k.startswith(key) and k[len(key):].isdigit()}
        layers = sorted(saved)
        if layers and [f"{_TARGET}{j}" for j in layers] != self._style_names:
            self._set_targets({f"{_TARGET}{j}": torch.empty_like(saved[j]) for j in layers})
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def terms(self, x: Tensor, y_hat: Tensor) -> PerceptualLossTerms:
        """The unweighted (content, style, pixel, tv) terms for content image x and output y_hat."""
        if not self._style_names:
            raise RuntimeError("PerceptualLoss has no style target: pass style_image= or call set_style()")
        checks.tensor("x", x, ndim=4)
        checks.tensor("y_hat", y_hat, ndim=4)
        checks.shape("y_hat", y_hat, list(x.shape))
        content_feats = self._features(x)
        out_feats = self._features(y_hat)
        j = self.content_layer
        content = F.mse_loss(out_feats[j], content_feats[j])
        style = sum(style_loss(out_feats[int(name.rsplit("_", 1)[1])], getattr(self, name), self.normalize)
                    for name in self._style_names)
        pixel = F.mse_loss(y_hat, x)
        return PerceptualLossTerms(content, style, pixel, tv_loss(y_hat))

    def forward(self, x: Tensor, y_hat: Tensor) -> Tensor:
        terms = self.terms(x, y_hat)
        return sum(self.weights[k] * getattr(terms, k) for k in TERMS)
