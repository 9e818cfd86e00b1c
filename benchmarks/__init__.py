"""data_manager's benchmark suite: run it with ``python -m benchmarks`` (see ``suite.py``).

The standalone scripts beside it (``bench_l1.py``, ``bench_l2.py``, ``bench_ingest.py``) are
finer-grained probes of single components.
"""
