from random_seed import fresh_seed, module_seed  # noqa: F401  (autouse: a fresh, printed seed per test)
