"""Prompt normalization and the per-prompt filters: pure functions of one string.

The order matters: HTML entities are decoded first (``&nbsp;`` becomes a space only through NFKC, ``&#8203;`` a
zero-width space that must go), control characters go before NFKC (so that removing one cannot leave a sequence
that NFKC would have composed), and whitespace is collapsed last, after the removals that leave gaps behind.
"""

from __future__ import annotations

import html
import re
import sys
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

# Midjourney parameters (docs.midjourney.com, v4–v6). They end a prompt, but JourneyDB also has them mid-prompt.
# Flags take no value; --no takes a list up to the next parameter; every other one takes one value.
_MJ_FLAGS = "fast|relax|turbo|tile|hd|test|testp|creative|uplight|upbeta|upanime|video|draft|remix"
_MJ_ONE_VALUE = ("ar|aspect|v|version|q|quality|s|stylize|c|chaos|seed|sameseed|stop|style|niji|iw|w|weird|r|repeat"
                 "|cref|cw|sref|sw|p|personalize|exp|h|width|height")
# "—" and "–": macOS and phones turn "--" into a dash, and such prompts reached Midjourney anyway.
_DASHES = r"(?:--|\u2014|\u2013)"
_MJ_PARAM = re.compile(
    rf"(?<!\S){_DASHES}(?:(?:{_MJ_FLAGS})(?!\S)"
    rf"|no(?:\s+(?!{_DASHES})[^\s]+)*(?!\S)"
    rf"|(?:{_MJ_ONE_VALUE})(?:\s+(?!{_DASHES})[^\s]+)?(?!\S))",
    re.IGNORECASE,
)
# Multi-prompt weights: "hot dog::1.5 cat::-0.5" is "hot dog cat" with weights.
_MJ_WEIGHT = re.compile(r"::\s*-?(?:\d+(?:\.\d*)?|\.\d+)?")
_URL = re.compile(r"<?\b(?:https?://|www\.)[^\s<>]+>?", re.IGNORECASE)
_HTML_TAG = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*(?:\s[^<>]*)?/?>")
_ENTITY = re.compile(r"&(?:#\d+|#x[0-9a-fA-F]+|[a-zA-Z][a-zA-Z0-9]*);")
_ASCII_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")
_NOT_WORD = re.compile(r"[^\w\s]|_")
_ASCII_LETTERS = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


@lru_cache(maxsize=1)
def _unicode_control() -> re.Pattern:
    """Control, format (zero-width, bidi), private-use and surrogate code points; whitespace controls are spared
    here because ``str.split`` turns them into single spaces afterwards."""
    ranges, start, prev = [], None, None
    for cp in range(sys.maxunicode + 1):
        ch = chr(cp)
        hit = unicodedata.category(ch) in ("Cc", "Cf", "Co", "Cs") and not ch.isspace()
        if hit and start is None:
            start = cp
        elif not hit and start is not None:
            ranges.append((start, prev))
            start = None
        prev = cp
    if start is not None:
        ranges.append((start, prev))
    cls = "".join(f"\\U{a:08x}" if a == b else f"\\U{a:08x}-\\U{b:08x}" for a, b in ranges)
    return re.compile(f"[{cls}]")


@dataclass(frozen=True)
class NormalizeRules:
    strip_midjourney_params: bool = True
    strip_urls: bool = True
    strip_html_tags: bool = True
    blocklist: tuple[str, ...] = ()


def unescape_html(text: str) -> str:
    """Decode entities until none is left (LAION captions are often escaped twice: ``&amp;amp;``)."""
    for _ in range(3):
        if "&" not in text or not _ENTITY.search(text):
            break
        text = html.unescape(text)
    return text


def remove_control_chars(text: str) -> str:
    if text.isascii():
        return _ASCII_CONTROL.sub("", text)
    return _unicode_control().sub("", text)


def strip_midjourney_params(text: str) -> str:
    if "-" in text or "\u2014" in text or "\u2013" in text:
        text = _MJ_PARAM.sub(" ", text)
    if "::" in text:
        text = _MJ_WEIGHT.sub(" ", text)
    return text


def strip_urls(text: str) -> str:
    if "http" in text or "www." in text or "HTTP" in text or "WWW." in text:
        text = _URL.sub(" ", text)
    return text


def strip_html_tags(text: str) -> str:
    return _HTML_TAG.sub(" ", text) if "<" in text else text


def collapse_whitespace(text: str) -> str:
    return " ".join(text.split())


def normalize_prompt(text: str, rules: NormalizeRules = NormalizeRules()) -> str:
    """Entities decoded, NFKC, control characters removed, HTML tags, URLs and Midjourney parameters stripped,
    whitespace collapsed."""
    text = remove_control_chars(unescape_html(text))
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text)
    if rules.strip_html_tags:
        text = strip_html_tags(text)
    if rules.strip_urls:
        text = strip_urls(text)
    if rules.strip_midjourney_params:
        text = strip_midjourney_params(text)
    text = collapse_whitespace(text)
    # Removals can leave separators dangling at the ends ("a cat, --ar 2:3" -> "a cat,").
    return text.strip(" ,;|")


def dedup_key(prompt: str) -> str:
    """The exact-duplicate key: case-folded words without punctuation ("A cat, sitting." == "a cat sitting")."""
    folded = prompt.lower() if prompt.isascii() else prompt.casefold()
    return " ".join(_NOT_WORD.sub(" ", folded).split())


def letter_fraction(prompt: str) -> float:
    """Letters over non-space characters (0 for an empty string)."""
    if prompt.isascii():
        raw = prompt.encode()
        dense = len(raw) - raw.count(b" ")
        letters = len(raw) - len(raw.translate(None, _ASCII_LETTERS))
    else:
        dense = sum(not c.isspace() for c in prompt)
        letters = sum(c.isalpha() for c in prompt)
    return letters / dense if dense else 0.0


def blocklist_pattern(words: tuple[str, ...]) -> re.Pattern | None:
    """One case-insensitive pattern matching any blocklisted word or phrase as whole words."""
    words = tuple(w for w in (collapse_whitespace(w) for w in words) if w)
    if not words:
        return None
    alts = "|".join(r"\s+".join(map(re.escape, w.split())) for w in sorted(set(words), key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alts})(?!\w)", re.IGNORECASE)


def drop_reason(prompt: str, min_chars: int, min_words: int, min_letter_fraction: float,
                blocked: re.Pattern | None) -> str | None:
    """Why a normalized prompt is dropped before token counting, or None to keep it."""
    if not prompt:
        return "empty"
    if len(prompt) < min_chars or prompt.count(" ") + 1 < min_words:
        return "too_short"
    if letter_fraction(prompt) < min_letter_fraction:
        return "non_text"
    if blocked is not None and blocked.search(prompt):
        return "blocked"
    return None
