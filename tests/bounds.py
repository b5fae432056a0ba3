"""Time bounds for tests, so that every test passes on a machine 3x slower or 3x faster than this one.

- A lower bound is the code's own deadline: it cannot finish earlier by construction.
- An upper bound is the code's deadline plus the work around it, that work allowed SLOWER times
  what it takes here (`upper()`); where the property is "did not wait for a deadline" (fail fast,
  end the grace early), it is a fraction of that deadline, which a mutant that waits exceeds.
- How fast something is (figures, ratios) belongs in benchmarks/, never in a test.
"""

SLOWER = 3.0


def upper(deadline: float, work: float = 1.0) -> float:
    """At most `deadline` seconds of waiting plus `work` seconds (on this machine) of doing."""
    return deadline + SLOWER * work
