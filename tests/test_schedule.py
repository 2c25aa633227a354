import itertools
import math

import pytest

from lmscale.train.schedule import lr_at


def test_warmup_then_cosine_to_floor() -> None:
    values = [lr_at(s, 1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1) for s in range(120)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0)
    assert values[60] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert values[110] == pytest.approx(0.1) and values[119] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(values[10:]))


def test_schedule_depends_on_total_steps_not_max_steps() -> None:
    # A run stopped at 20 and resumed to 40 with total_steps=40 sees the same rates as one run to 40.
    assert lr_at(19, 3e-4, 5, 40, 0.0) == lr_at(19, 3e-4, 5, 40, 0.0) > lr_at(19, 3e-4, 5, 20, 0.0)
