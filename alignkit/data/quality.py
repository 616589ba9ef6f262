"""Row-level rules of data cleaning: the texts of a normalized row, the filters, the PII scrub.

Pure functions over one row; :mod:`alignkit.data.clean` runs them in order and keeps the report.
A normalized row is any of the loaders' shapes (``messages``/``text`` for SFT, ``prompt``/
``chosen``/``rejected`` for pairs, ``prompt``/``reference`` for prompts), so one set of rules
serves every kind.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable

WORD = re.compile(r"\w+")
MESSAGE_LISTS = ("messages", "prompt", "chosen", "rejected")
#: Keys whose string values are labels, not text: never scrubbed or searched.
LABEL_KEYS = frozenset({"role", "from", "id"})

Turn = tuple[str, str]  # (where in the row, e.g. "chosen[0] assistant", text)


def turns(example: dict) -> list[Turn]:
    """Every text of a normalized row with its place: message contents, ``text``, ``reference``."""
    out: list[Turn] = []
    for key in ("text", "reference"):
        if isinstance(example.get(key), str):
            out.append((key, example[key]))
    for key in MESSAGE_LISTS:
        messages = example.get(key)
        if isinstance(messages, list):
            out.extend((f"{key}[{i}] {m['role']}", m["content"]) for i, m in enumerate(messages))
    return out


def words(text: str) -> list[str]:
    """Lower-cased word tokens (letters, digits, underscore): what n-grams and shingles use."""
    return WORD.findall(text.lower())


def canonical(parts: list[Turn]) -> str:
    """One string per row for exact duplicates: places and texts, lower-cased, spaces collapsed."""
    return "\x1e".join(f"{place}\x1f{' '.join(text.lower().split())}" for place, text in parts)


def preview(example: dict, limit: int = 200) -> str:
    """A one-line rendering of a row for the report."""
    text = " | ".join(f"{place}: {' '.join(text.split())}" for place, text in turns(example))
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- filters: each returns why the row goes, or None --------------------------------------------


def empty_turn(parts: list[Turn]) -> str | None:
    for place, text in parts:
        if not text.strip():
            return f"{place} is empty"
    return None


# C0/C1 controls except tab/newline/CR, surrogates, private use, U+FFFD (failed decoding).
_NON_TEXT = re.compile(
    "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff\ue000-\uf8ff\ufffd\U000f0000-\U0010ffff]"
)


def non_text(parts: list[Turn]) -> str | None:
    for place, text in parts:
        found = _NON_TEXT.search(text)
        if found:
            return f"U+{ord(found.group()):04X} in {place}"
    return None


def row_length(example: dict, count: Callable[[str], int]) -> int:
    """Length of the longest sequence a row trains on: every turn, except that a pair counts its
    prompt once and the longer of chosen and rejected."""
    sides = {"chosen": 0, "rejected": 0}
    total = 0
    for place, text in turns(example):
        side = place.split("[")[0]
        if side in sides:
            sides[side] += count(text)
        else:
            total += count(text)
    return total + max(sides.values())


def length(
    example: dict, count: Callable[[str], int], low: int | None, high: int | None, unit: str
) -> str | None:
    if low is None and high is None:
        return None
    n = row_length(example, count)
    if low is not None and n < low:
        return f"{n} {unit} < min_length {low}"
    if high is not None and n > high:
        return f"{n} {unit} > max_length {high}"
    return None


def repeated_ngrams(parts: list[Turn], n: int, max_share: float | None) -> str | None:
    """A turn whose n-grams mostly repeat earlier ones (looping text). Turns with fewer than four
    n-grams are too short to judge."""
    if max_share is None:
        return None
    for place, text in parts:
        tokens = words(text)
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        if len(grams) < 4:
            continue
        share = 1 - len(set(grams)) / len(grams)
        if share > max_share:
            return f"{share:.0%} of the {n}-grams of {place} repeat"
    return None


def identical_pair(example: dict) -> str | None:
    chosen, rejected = example.get("chosen"), example.get("rejected")
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        return None
    side = [canonical([(m["role"], m["content"]) for m in msgs]) for msgs in (chosen, rejected)]
    return "chosen equals rejected (up to case and spacing)" if side[0] == side[1] else None


# --- PII scrub -----------------------------------------------------------------------------------

_KEY = re.compile(
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----"
    r"|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"  # AWS access key id
    r"|\bsk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}"  # OpenAI / Anthropic style
    r"|\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{22,})"  # GitHub
    r"|\bxox[abprs]-[A-Za-z0-9-]{10,}"  # Slack
    r"|\bAIza[0-9A-Za-z_-]{35}"  # Google
    r"|\bhf_[A-Za-z0-9]{30,}",  # Hugging Face
    re.S,
)
_SECRET_VALUE = re.compile(
    r"(?i)\b(api[_-]?key|secret|token|password|passwd|pwd)(\s*[:=]\s*)([\"']?)([^\s\"']{6,})"
)
_LONG_TOKEN = re.compile(r"[A-Za-z0-9+/_-]{32,}={0,2}")
_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\d.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\d.])")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{1,4}(?![\w:])")
_PHONE = re.compile(r"(?<![\w+])\+?\(?\d[\d\s().-]{7,}\d(?![\w])")
_DIGIT = re.compile(r"\d")


def _long_token(match: re.Match) -> str:
    s = match.group()
    mixed = any(c.isupper() for c in s) and any(c.islower() for c in s)
    return "[KEY]" if mixed and any(c.isdigit() for c in s) else s


def _ipv6(match: re.Match) -> str:
    s = match.group()  # times (12:30:45) share the shape: ask for 5+ groups, "::" or a hex letter
    groups = s.count(":") + 1
    hexy = any(c in "abcdefABCDEF" for c in s)
    return "[IP]" if groups >= 5 or "::" in s or (hexy and groups >= 3) else s


def _phone(match: re.Match) -> str:
    s = match.group()
    digits = len(_DIGIT.findall(s))
    separated = s.startswith("+") or "(" in s or len(re.findall(r"[\s.-]", s)) >= 2
    return "[PHONE]" if 9 <= digits <= 15 and separated else s


def _secret_value(match: re.Match) -> str:
    return f"{match.group(1)}{match.group(2)}{match.group(3)}[KEY]"


#: (kind, pattern, replacement): keys first (a key may hold digits or an @), phones last (an IP
#: or a key would otherwise read as digits).
_SCRUBS: tuple[tuple[str, re.Pattern, str | Callable[[re.Match], str]], ...] = (
    ("key", _KEY, "[KEY]"),
    ("key", _SECRET_VALUE, _secret_value),
    ("key", _LONG_TOKEN, _long_token),
    ("email", _EMAIL, "[EMAIL]"),
    ("ip", _IPV4, "[IP]"),
    ("ip", _IPV6, _ipv6),
    ("phone", _PHONE, _phone),
)


#: Literal parts a pattern cannot match without: a text lacking all of them skips the pattern
#: (``in`` on a string is much faster than a failed regex search over it).
_NEEDS = {
    id(_KEY): ("PRIVATE KEY", "AKIA", "ASIA", "sk-", "_", "xox", "AIza"),
    id(_SECRET_VALUE): ("=", ":"),
    id(_EMAIL): ("@",),
    id(_IPV4): (".",),
    id(_IPV6): (":",),
}


def scrub_text(text: str, kinds: frozenset[str], found: Counter) -> str:
    """``text`` with the PII ``kinds`` masked; adds the masks made to ``found`` (kind -> count).
    A regex scrub: it finds the common shapes, not every piece of personal data."""
    for kind, pattern, replacement in _SCRUBS:
        if kind not in kinds:
            continue
        needs = _NEEDS.get(id(pattern))
        if needs is not None and not any(part in text for part in needs):
            continue
        before = text
        text = pattern.sub(replacement, text)
        if text != before:
            found[kind] += text.count(f"[{kind.upper()}]") - before.count(f"[{kind.upper()}]")
    return text


def scrub(value, kinds: frozenset[str], found: Counter):
    """Scrub every text in a (raw or normalized) row, leaving labels (role, id) alone."""
    if isinstance(value, str):
        return scrub_text(value, kinds, found)
    if isinstance(value, list):
        return [scrub(v, kinds, found) for v in value]
    if isinstance(value, dict):
        return {k: v if k in LABEL_KEYS else scrub(v, kinds, found) for k, v in value.items()}
    return value


def texts_in(value) -> list[str]:
    """Every text in a raw row of any format (labels left out): what an eval set holds."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [t for v in value for t in texts_in(v)]
    if isinstance(value, dict):
        return [t for k, v in value.items() if k not in LABEL_KEYS for t in texts_in(v)]
    return []
