"""Logic rewards that explain themselves: rules (rules.py), the composite (literary.py), a judge (judge.py).

    tifa reward score data/demo/sft.jsonl     # inspect every rule's score and message per dialogue
"""

from tifaforge.config import RewardConfig  # the `reward:` section, re-exported beside the code it configures
from tifaforge.rewards.literary import LogicReward, RewardResult, combine, score_command, score_file, summarize
from tifaforge.rewards.rules import (
    RULES,
    RewardContext,
    RuleResult,
    cross_turn_overlap,
    distinct_n,
    ngram_repetition_rate,
    repeated_sentences,
)

__all__ = [
    "RULES", "LogicReward", "RewardConfig", "RewardContext", "RewardResult", "RuleResult", "combine",
    "cross_turn_overlap", "distinct_n", "ngram_repetition_rate", "repeated_sentences", "score_command",
    "score_file", "summarize",
]
