"""Data sources and formats: read rows from files, the Hub or builtins; normalize per row."""

from alignkit.data.check import CheckReport, check_sft, print_report
from alignkit.data.sft import SFTData, load_sft, normalize_sft_row, to_trl_dataset
from alignkit.data.sources import Row, RowError, load_rows

__all__ = [
    "CheckReport",
    "Row",
    "RowError",
    "SFTData",
    "check_sft",
    "load_rows",
    "load_sft",
    "normalize_sft_row",
    "print_report",
    "to_trl_dataset",
]
