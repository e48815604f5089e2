"""Unit tests of embps's kernels layer."""
