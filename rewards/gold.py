"""The builtin task's hidden gold reward, as the evaluation and RL stages name it.

``gold_reward(prompts, completions, **meta) -> list[float]`` (TRL's reward signature), in
[-1, 1]. It rewards content first: ``0.7 * (positive - negative sentiment words) / words``;
then +0.2 for mentioning one of the prompt's topic words and +0.1 for ending with "."; it
deducts the share of words outside the task vocabulary and 0.05 per word outside an 8-20 word
band (at most 0.5). Only meaningful on the builtin task (``builtin:sft``/``preference``/
``prompts``); the definition lives in :mod:`alignkit.builtin.task`.


``gold_content`` is its content term alone, ``(positive - negative words) / words`` in [-1, 1]:
a format-free measure of what the gold reward values.

``gold_valid`` is 1 for an answer whose every word is in the task's vocabulary, else 0: its mean
is the share of samples free of word fragments and stray bytes (the builtin model's own quality).
"""

from alignkit.builtin.task import gold_content, gold_reward, gold_valid

__all__ = ["gold_content", "gold_reward", "gold_valid"]
