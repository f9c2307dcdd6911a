"""Domain helpers that must agree with the standard library exactly."""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime

from app.models import iso


def test_iso_is_exactly_datetimes_text_for_any_timestamp() -> None:
    rng = random.Random(7)
    stamps = [0.0, 1.0, 0.5, 1e-7, 0.9999995, 0.0000005, 0.0000015, 1796280370.3408985, 1796280370.9999996,
              time.time(), -1.25, 253402300799.0]
    stamps += [rng.uniform(0, 4_102_444_800) for _ in range(20_000)]  # up to the year 2100
    stamps += [1_796_280_370 + rng.randrange(1_000_000) / 1_000_000 + rng.choice((0, 5e-7, -5e-7))
               for _ in range(20_000)]  # microsecond ties: rounded half to even, as datetime does
    for ts in stamps:
        assert iso(ts) == datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"), ts
    assert iso(None) is None
