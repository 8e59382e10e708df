"""Every loss test in this directory gets fresh random inputs and prints its seed."""

from random_seed import fresh_seed  # noqa: F401  (autouse fixture)
