"""Data sources and formats: read rows from files, the Hub or builtins; normalize per row.

``to_trl_dataset`` here is the SFT one; the preference one is
``alignkit.data.preference.to_trl_dataset``.
"""

from alignkit.data.check import (
    CheckReport,
    check_preference,
    check_prompts,
    check_sft,
    print_report,
)
from alignkit.data.preference import PreferenceData, load_preference, normalize_preference_row
from alignkit.data.prompts import PromptData, load_prompts, normalize_prompt_row, prompt_id
from alignkit.data.sft import SFTData, load_sft, normalize_sft_row, to_trl_dataset
from alignkit.data.sources import Row, RowError, load_rows

__all__ = [
    "CheckReport",
    "PreferenceData",
    "PromptData",
    "Row",
    "RowError",
    "SFTData",
    "check_preference",
    "check_prompts",
    "check_sft",
    "load_preference",
    "load_prompts",
    "load_rows",
    "load_sft",
    "normalize_preference_row",
    "normalize_prompt_row",
    "normalize_sft_row",
    "print_report",
    "prompt_id",
    "to_trl_dataset",
]
