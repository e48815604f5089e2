"""Pure ``@njit`` kernels over arrays: the hash map (``hashmap``), the count-min sketch
(``sketch``), optimizer updates and initializers (``optim``), gathers, norms and row
touches (``rows``). They return counts and masks and allocate little; locking, growth,
validation and accounting live in ``embps.server.tables``. Of embps they import only
the key hashes (``embps.protos.routing``): an import contract checks it."""
