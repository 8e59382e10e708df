"""Every test in this directory gets a fresh, printed seed; reward-function fixtures importable by spec."""

from random_seed import fresh_seed  # noqa: F401  (autouse fixture)
