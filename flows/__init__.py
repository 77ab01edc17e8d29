import tasks  # noqa: F401  (offline defaults before any tool is imported)
