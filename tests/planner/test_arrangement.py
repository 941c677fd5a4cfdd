"""Just-in-time arrangement never schedules decoding past the deadline, and uses the time."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from spotserve.operator.planner import arrange, decode_steps

seconds = st.floats(0.0, 120.0, allow_nan=False)


@given(deadline=seconds, migration=seconds, step=st.floats(0.001, 5.0),
       left=st.integers(0, 300))
def test_never_past_the_deadline_and_never_idle_too_early(deadline: float, migration: float,
                                                         step: float, left: int) -> None:
    steps = decode_steps(deadline, migration, step, left)
    assert 0 <= steps <= left
    if steps:
        assert steps * step + migration <= deadline
    if steps < left and migration <= deadline:
        assert (steps + 1) * step + migration > deadline - 1e-6


def test_paper_grace_period_cases() -> None:
    (finishing, stopping, cut) = arrange(30.0, 10.0, {0: (0.05, 100), 1: (0.05, 0),
                                                      2: (0.5, 100)})
    assert finishing.finishes and finishing.action == "finish" and finishing.steps == 100
    assert stopping.steps == 0
    assert cut.steps == 40 and cut.action == "decode 40 steps then stop"
    assert cut.stop_after_s == 20.0
    (late,) = arrange(30.0, 45.0, {3: (0.05, 100)})
    assert late.steps == 0 and late.overruns and late.action == "stop-now"
