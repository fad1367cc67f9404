"""Module utilities (spectral norm front ends)."""
from . import parametrizations
from .spectral_norm import remove_spectral_norm, spectral_norm

__all__ = ["parametrizations", "remove_spectral_norm", "spectral_norm"]
