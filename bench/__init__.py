"""The inferbox benchmark suite (not part of the test suite).

``python -m bench.run_all [--quick]`` runs every part and writes the results
page; each part is also a module with its own ``python -m bench.<part>``:
:mod:`bench.inprocess`, :mod:`bench.http`, :mod:`bench.audit_onoff`,
:mod:`bench.batch_vs_inprocess`, :mod:`bench.coldstart`, :mod:`bench.memory`.
Helpers: :mod:`bench.common` (timing, statistics, tables, JSON, charts),
:mod:`bench.corpus` (texts), :mod:`bench.roofline` (FLOPs and peaks),
:mod:`bench.server` (a real server subprocess).  Nothing heavy is imported here.
"""

__all__: list[str] = []
