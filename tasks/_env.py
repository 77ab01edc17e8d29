"""Applies the offline, quiet tool defaults (``vlgrpo.offline``) before prefect / mlflow / transformers are
imported: the `tasks` and `flows` packages import this module first, and so do the test suite and the
benchmarks (tests/__init__.py)."""
from vlgrpo import offline

offline.apply()
