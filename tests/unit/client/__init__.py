"""Unit tests of embps's client layer."""
