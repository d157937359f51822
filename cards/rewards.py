"""Renamed cards/reward_table.py (the reward on test prompts per iteration, and its block in the dataset card).

This alias stays only until builders/quickstart.py, whose owner is changing it on another branch, imports
`cards.reward_table`; then delete this file."""

from cards.reward_table import test_reward_table  # noqa: F401
