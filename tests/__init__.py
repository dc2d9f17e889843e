"""The test suite, mirroring the packages; shared fixtures in ``conftest.py``, helpers in the
modules whose name does not start with ``test_`` (``toy_method``, ``servers``, ``procs``,
``bad_input``, ...).

May import: anything (``search``, ``methods``, ``rewards``, ``bench``). Nothing in the package
imports ``tests`` (the toy method is registered by name, ``OVSS_METHOD_MODULES``).
"""
