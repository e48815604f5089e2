"""Unit tests of embps's protos layer."""
