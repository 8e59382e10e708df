"""A module whose import fails on a missing dependency (for the spec tests)."""

import not_a_real_dependency_of_aligner  # noqa: F401
