"""Benchmarks that print measured numbers (ratios measured in one run), one script per question:
``python bench/<name>.py``. ``bench/imports.py`` measures the import structure.

May import: anything (``search``, ``methods``, ``rewards``). Nothing imports ``bench`` but the
tests (``tests/test_architecture.py`` reads the code with ``bench.imports``).
"""
