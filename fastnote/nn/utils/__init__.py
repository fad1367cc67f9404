"""Module utilities (spectral norm front ends)."""
