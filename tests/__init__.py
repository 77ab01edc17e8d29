from tasks import _env  # noqa: F401  (the offline tool defaults, for tests and benchmarks alike)
