"""soft_overlong (against TRL's); fluency is in test_rewards.py."""
import pytest

from vlgrpo import rewards as R
from vlgrpo.config import RewardsConfig
from vlgrpo.rewards import RewardContext


# ------------------------------------------------------------------------------------------ soft_overlong


@pytest.mark.parametrize("max_len,buffer", [(8, 2), (20, 5), (100, 20)])
def test_soft_overlong_equals_trl(max_len, buffer):
    from trl.rewards import get_soft_overlong_punishment

    lengths = list(range(0, max_len + 4))
    trl = get_soft_overlong_punishment(max_len, buffer)([[1] * n for n in lengths])
    fn = R.setup_rewards(["soft_overlong"],
                         RewardContext(RewardsConfig(overlong_buffer=buffer, overlong_max_length=max_len)))
    ours = fn["soft_overlong"](["q"] * len(lengths), ["x"] * len(lengths), completion_length=lengths)
    assert ours == pytest.approx(trl, abs=1e-12)
    assert min(ours) == -1.0 and ours[0] == 0.0


def test_soft_overlong_defaults_to_train_length_and_needs_lengths():
    fn = R.setup_rewards(["soft_overlong"], RewardContext(RewardsConfig(overlong_buffer=2), max_completion_length=8))
    out = R.compute_rewards({"soft_overlong": 1.0}, ["q"] * 3, ["a", "b", "c"],
                            {"completion_length": [6, 7, 8]}, rewards=fn)
    assert out.per_reward["soft_overlong"] == [0.0, -0.5, -1.0]
    with pytest.raises(R.RewardError, match="completion_length"):
        R.compute_rewards({"soft_overlong": 1.0}, ["q"], ["a"], {"id": ["x"]}, rewards=fn)
