"""Unit tests of embps's tables layer."""
