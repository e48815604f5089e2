"""What the tests share: the one launcher of real ``embps serve`` processes on loopback
(``cluster``), test certificates (``certs``), the reference models the engine is checked
against (``reference``, ``sharded_model``). Imported as ``support.*`` (pytest puts
``tests/`` on the path)."""
