"""Unit tests of embps's service layer."""
