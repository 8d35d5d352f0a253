"""ARM keyframes on constructed demos, each expectation worked out by hand in its comment."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st
import numpy as np
import pytest

from robot_r1_jax.data.demo import Demo, DemoError, Observation
from robot_r1_jax.data.keyframes import discover_keyframes

OPEN, CLOSED = 1.0, 0.0


def _demo(gripper: list[float], still: set[int], speed: float = 1.0) -> Demo:
  """Frames in `still` have all joint velocities 0; the others move at `speed` rad/s."""
  return Demo([Observation(gripper_open=g,
                           joint_velocities=np.full(7, 0.0 if i in still else speed))
               for i, g in enumerate(gripper)])


CASES = {
    # Moving throughout; the gripper closes at 4. Keyframes: the toggle and the last frame.
    "gripper_toggle": ([OPEN] * 4 + [CLOSED] * 6, set(), [4, 9]),
    # A 10-frame pause (5..14): a stop at 5 arms the buffer (4); it counts down 3, 2, 1, 0 over
    # frames 6..9, so the next stop is 10, and 15 would be next but the arm moves again.
    "long_pause": ([OPEN] * 20, set(range(5, 15)), [5, 10, 19]),
    # Two short pauses (5-6 and 8): 5 stops; the buffer is 2 at frame 8, so 8 does not count.
    "short_pauses_inside_buffer": ([OPEN] * 20, {5, 6, 8}, [5, 19]),
    # Still at the second-to-last frame (10 of 12): never a stop there; 11 is the last frame.
    "stop_at_second_to_last": ([OPEN] * 12, {10}, [11]),
    # Toggles at 3 and 8, last frame 9: 8 and 9 are adjacent, so 8 is dropped.
    "adjacent_final_keyframes": ([OPEN] * 3 + [CLOSED] * 5 + [OPEN] * 2, set(), [3, 9]),
    # Gripper changes at 5 (a toggle keyframe). Still over 4..7: 4 (gripper[5] differs), 5 and 6
    # (gripper[i-1] or [i-2] differs) are not steady; 7 is the first steady still frame.
    "still_around_a_toggle": ([OPEN] * 5 + [CLOSED] * 7, {4, 5, 6, 7}, [5, 7, 11]),
    # Wrap-around at i = 0: the episode ends open, as it starts, so gripper[-1] == gripper[-2] ==
    # gripper[0] and the still frame 0 is a stop; it is never a keyframe itself but arms the buffer,
    # which suppresses the still frame 2 (buffer 3 there).
    "wrap_frame0_same_end_state": ([OPEN] * 4 + [CLOSED] * 4 + [OPEN] * 4, {0, 2}, [4, 8, 11]),
    # Same motion but the episode ends closed: frame 0 is not steady (gripper[-1] differs), the
    # buffer stays negative and frame 2 is a stop.
    "wrap_frame0_other_end_state": ([OPEN] * 4 + [CLOSED] * 8, {0, 2}, [2, 4, 11]),
    # Wrap-around at i = 1: gripper[1-2] is the last frame. Ends open like frame 0 -> 1 is a stop.
    "wrap_frame1_same_end_state": ([OPEN] * 12, {1}, [1, 11]),
    # Ends closed -> gripper[-1] != gripper[0], frame 1 is not steady; only the toggle and the end.
    "wrap_frame1_other_end_state": ([OPEN] * 6 + [CLOSED] * 6, {1}, [6, 11]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_hand_worked_keyframes(name):
  gripper, still, expected = CASES[name]
  assert discover_keyframes(_demo(gripper, still)) == expected


def test_stopped_buffer_is_configurable():
  gripper, still, _ = CASES["long_pause"]
  # Buffer 2: stops at 5, then the buffer reads 2, 1, 0 at frames 6, 7, 8 -> next stops 8, 11, 14.
  assert discover_keyframes(_demo(gripper, still), stopped_buffer=2) == [5, 8, 11, 14, 19]


def test_stopping_delta_is_inclusive_and_configurable():
  gripper = [OPEN] * 12
  # Every joint moves at exactly 0.1 rad/s, which ARM's allclose(atol=0.1) calls still: frame 0 is
  # a (wrapped, steady) stop that arms the buffer, so stops land on 5; the buffer then runs out at
  # 10, the second-to-last frame, which never stops; 11 is the end.
  assert discover_keyframes(_demo(gripper, still=set(), speed=0.1)) == [5, 11]
  assert discover_keyframes(_demo(gripper, set(), speed=0.1001)) == [11]
  assert discover_keyframes(_demo(gripper, set(), speed=0.1001), stopping_delta=0.2) == [5, 11]


def test_accepts_a_list_of_observations_and_tiny_demos():
  gripper, still, expected = CASES["gripper_toggle"]
  assert discover_keyframes(list(_demo(gripper, still))) == expected
  assert discover_keyframes(_demo([OPEN], set())) == []
  assert discover_keyframes(_demo([OPEN, CLOSED], set())) == [1]


def test_missing_fields_are_named():
  demo = _demo([OPEN] * 5, set())
  demo.observations[3].joint_velocities = None
  with pytest.raises(DemoError, match="observation 3 has no joint_velocities"):
    discover_keyframes(demo)
  demo.observations[2].gripper_open = None
  with pytest.raises(DemoError, match="observation 2 has no gripper_open"):
    discover_keyframes(demo)


def _arm_literal(demo, stopping_delta=0.1):
  """ARM's demo_loading_utils.keypoint_discovery, transcribed statement by statement."""

  def is_stopped(i, obs, stopped_buffer):
    next_is_not_final = i == (len(demo) - 2)
    gripper_state_no_change = (
        i < (len(demo) - 2) and
        (obs.gripper_open == demo[i + 1].gripper_open and
         obs.gripper_open == demo[i - 1].gripper_open and
         demo[i - 2].gripper_open == demo[i - 1].gripper_open))
    small_delta = np.allclose(obs.joint_velocities, 0, atol=stopping_delta)
    return (stopped_buffer <= 0 and small_delta and (not next_is_not_final)
            and gripper_state_no_change)

  keypoints = []
  prev_gripper_open = demo[0].gripper_open
  stopped_buffer = 0
  for i, obs in enumerate(demo):
    stopped = is_stopped(i, obs, stopped_buffer)
    stopped_buffer = 4 if stopped else stopped_buffer - 1
    last = i == (len(demo) - 1)
    if i != 0 and (obs.gripper_open != prev_gripper_open or last or stopped):
      keypoints.append(i)
    prev_gripper_open = obs.gripper_open
  if len(keypoints) > 1 and (keypoints[-1] - 1) == keypoints[-2]:
    keypoints.pop(-2)
  return keypoints


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.sampled_from([0.0, 0.05, 0.1, 0.2, -0.1, -0.3])),
                min_size=1, max_size=40))
def test_matches_arm_on_random_demos(frames):
  demo = Demo([Observation(gripper_open=float(g), joint_velocities=np.full(7, v))
               for g, v in frames])
  assert discover_keyframes(demo) == _arm_literal(demo)
