"""Every generation test in this directory gets a fresh torch seed and prints it."""

from random_seed import fresh_seed, module_seed  # noqa: F401  (autouse fixture; one seed for module fixtures)
