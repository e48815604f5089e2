"""Unit tests of embps's durability layer."""
