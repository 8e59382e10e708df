"""Every generation test in this directory gets a fresh torch seed and prints it."""

from random_seed import fresh_seed  # noqa: F401  (autouse fixture)
