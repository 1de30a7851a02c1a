import math

import pytest

from tests.results_factory import result, spec
from wwcli.gate import ExitCode, GatePolicy, exit_code, trip_reason

LAYER = spec(1, "dense", shape=(300, 100))


@pytest.mark.parametrize(
    ("alphas", "policy", "expected"),
    [
        ([3.0, 4.0], GatePolicy(), ExitCode.OK),
        ([3.0, 1.9], GatePolicy(), ExitCode.GATE),
        ([2.0], GatePolicy(), ExitCode.OK),  # the line is strict: alpha < 2 trips
        ([1.9], GatePolicy(exit_zero=True), ExitCode.OK),
        ([1.9], GatePolicy(fail_below=None), ExitCode.OK),
        ([2.4], GatePolicy(fail_below=2.5), ExitCode.GATE),
        ([7.0], GatePolicy(), ExitCode.OK),
        ([7.0], GatePolicy(fail_above=6.0), ExitCode.GATE),
        ([6.0], GatePolicy(fail_above=6.0), ExitCode.OK),
        ([math.nan], GatePolicy(), ExitCode.OK),
        ([math.nan], GatePolicy(fail_on_failed_fit=True), ExitCode.GATE),
        ([math.nan], GatePolicy(fail_on_failed_fit=True, exit_zero=True), ExitCode.OK),
        ([], GatePolicy(), ExitCode.OK),
    ],
)
def test_exit_code_follows_the_policy(
    alphas: list[float], policy: GatePolicy, expected: ExitCode
) -> None:
    assert exit_code([result(LAYER, alpha) for alpha in alphas], policy) is expected


def test_a_failed_fit_is_never_over_trained_for_the_gate() -> None:
    failed = result(LAYER, math.nan, message="non-finite weights")
    assert trip_reason(failed, GatePolicy(fail_below=10.0)) is None


def test_trip_reason_says_which_line_was_crossed() -> None:
    assert trip_reason(result(LAYER, 1.5), GatePolicy()) == "alpha 1.500 < 2"
    assert trip_reason(result(LAYER, 7.25), GatePolicy(fail_above=6)) == "alpha 7.250 > 6"


def test_exit_codes_are_the_documented_numbers() -> None:
    assert (ExitCode.OK, ExitCode.GATE, ExitCode.ERROR) == (0, 1, 2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fail_below": 3.0, "fail_above": 2.0}, "must not exceed"),
        ({"fail_below": math.nan}, "fail_below must be a finite number"),
        ({"fail_above": math.inf}, "fail_above must be a finite number"),
    ],
)
def test_inconsistent_policies_are_refused(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GatePolicy(**kwargs)  # type: ignore[arg-type]


def test_a_failed_fit_trips_only_when_asked_and_says_why() -> None:
    failed = result(LAYER, math.nan, message="non-finite weights")
    assert trip_reason(failed, GatePolicy()) is None
    assert (
        trip_reason(failed, GatePolicy(fail_on_failed_fit=True))
        == "power-law fit failed: non-finite weights"
    )
