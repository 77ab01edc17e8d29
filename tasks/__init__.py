from tasks import _env  # noqa: F401  (offline defaults before any tool is imported)
