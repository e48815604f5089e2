"""``embps bench``: every benchmark, each beside its baseline in the same run, and the
report helpers they share. Benchmarks may import any part of embps; nothing imports
them but the command line and their tests."""
