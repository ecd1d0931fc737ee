"""Prompt normalization rules, the per-prompt filters, and exact CLIP token counts (pure functions)."""

import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sb2.prompts.normalize import (
    NormalizeRules,
    blocklist_pattern,
    dedup_key,
    drop_reason,
    letter_fraction,
    normalize_prompt,
)


@pytest.mark.parametrize("raw, expected", [
    # NFKC: full-width letters, ligatures, superscripts, no-break spaces
    ("ｆｕｌｌｗｉｄｔｈ robot", "fullwidth robot"),
    ("a ﬁne ﬂower²", "a fine flower2"),
    ("a\u00a0cat", "a cat"),
    # control and format characters removed; whitespace controls become one space
    ("a\x00b\x07c", "abc"),
    ("a glass\u200b teapot\ufeff", "a glass teapot"),
    ("tab\tand\nnewline\r\nend", "tab and newline end"),
    ("soft\u00adhyphen and \u202eright-to-left", "softhyphen and right-to-left"),
    # whitespace collapsed, dangling separators stripped
    ("  a   cat  ,  ", "a cat"),
    # HTML entities, once or twice escaped; tags
    ("Tom &amp; Jerry", "Tom & Jerry"),
    ("mug &amp;amp; rim &quot;gold&quot; &#39;x&#39; &#x41;", "mug & rim \"gold\" 'x' A"),
    ("poster <br> railway <i>alps</i>", "poster railway alps"),
    ("a < b > c, i <3 you", "a < b > c, i <3 you"),
    ("AT&T tower", "AT&T tower"),
    # URLs (Midjourney image prompts put them first, sometimes in angle brackets)
    ("https://s.mj.run/xYz12AbC portrait of a man", "portrait of a man"),
    ("<https://cdn.example.com/a.png> a cat", "a cat"),
    ("see www.example.com/x?y=1 now", "see now"),
    # Midjourney parameters
    ("a cat --ar 16:9 --v 5", "a cat"),
    ("a cat --q 2 --s 750 --seed 1234 --c 20", "a cat"),
    ("a cat --style raw --niji 5 --iw -0.5", "a cat"),
    ("a fox --no text, watermark --ar 2:3", "a fox"),
    ("a fox --no text, watermark", "a fox"),
    ("a tiled pattern --tile --v 6.0", "a tiled pattern"),
    ("a cat \u2014ar 3:2 \u2013v 5", "a cat"),
    ("--ar 3:2 a cat", "a cat"),
    ("a cat --AR 16:9", "a cat"),
    ("hot air balloons::2 over the desert::1 at sunrise", "hot air balloons over the desert at sunrise"),
    ("hot dog::1.5 cat::-0.5 space:: ship", "hot dog cat space ship"),
    # look like parameters, are not
    ("a well--known place", "a well--known place"),
    ("a -- b", "a -- b"),
    ("a cat --nothing else", "a cat --nothing else"),
    ("time 10:30", "time 10:30"),
    # everything removed
    ("--ar 1:1 --v 5", ""),
    ("", ""),
])
def test_normalization_rules(raw, expected):
    assert normalize_prompt(raw) == expected


def test_rules_can_be_switched_off():
    rules = NormalizeRules(strip_midjourney_params=False, strip_urls=False, strip_html_tags=False)
    assert normalize_prompt("a <b>cat</b> http://x.io --ar 2:3", rules) == "a <b>cat</b> http://x.io --ar 2:3"


def test_dedup_key():
    assert dedup_key("A cat, sitting.") == dedup_key("a  cat sitting") == "a cat sitting"
    assert dedup_key("Don't PANIC!!!") == "don t panic"
    assert dedup_key("Straße_Ü") == "strasse ü"
    assert dedup_key("!!!") == ""


def test_letter_fraction():
    assert letter_fraction("abc 123") == pytest.approx(0.5)
    assert letter_fraction("ÄÖü ☺☺☺") == pytest.approx(0.5)
    assert letter_fraction("") == 0.0


def test_blocklist_matches_whole_words_case_insensitively():
    pat = blocklist_pattern(("nsfw", "gore  scene", ""))
    assert pat.search("an NSFW image") and pat.search("a Gore scene")
    assert not pat.search("nsfwx nsfw_") and not pat.search("gore, scene")
    assert blocklist_pattern(()) is None


@pytest.mark.parametrize("prompt, reason", [
    ("", "empty"),
    ("ab", "too_short"),
    ("one", None),
    ("2048 x 1536 0045", "non_text"),
    ("😀😀😀😀 cat", "non_text"),
    ("😀😀😀 cat", None),  # exactly half letters
    ("a bloody gore scene", "blocked"),
    ("a cat in a hat", None),
])
def test_drop_reasons(prompt, reason):
    assert drop_reason(prompt, 3, 1, 0.5, blocklist_pattern(("gore",))) == reason


def test_min_words():
    assert drop_reason("cat", 3, 2, 0.5, None) == "too_short"
    assert drop_reason("a cat", 3, 2, 0.5, None) is None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200) | st.text(alphabet=st.sampled_from(list("-:&;<>/ \t\n#aA1.—x:\u200b\x00")), max_size=80))
def test_normalizer_survives_hostile_text(text):
    out = normalize_prompt(text)
    assert out == out.strip() and "  " not in out
    assert not any(unicodedata.category(c) in ("Cc", "Cf", "Cs") for c in out)
    dedup_key(out)
    letter_fraction(out)
    out.encode("utf-8")  # no lone surrogates left


@pytest.fixture(scope="module")
def counter():
    from sb2.models.loading import load_tokenizer
    from sb2.prompts.tokens import TokenCounter

    return TokenCounter(load_tokenizer("tiny:teacher").backend_tokenizer.to_str(), 75)


def _real_count(counter, text):
    return len(counter.tokenizer.encode(text, add_special_tokens=False).ids)


def test_token_counts_are_exact(counter):
    texts = ["a cat", "I'm here, they'll go; it's 2024!!! wow!great", "x" * 300, "Ünïcödé wörds 😀 and ascii",
             "<|endoftext|> hi <|ENDOFTEXT|>", "a " * 100, ""]
    assert counter.fast
    assert counter.count(texts) == [_real_count(counter, t) for t in texts]


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=400))
def test_fast_token_count_and_cut_match_the_tokenizer(text):
    from sb2.prompts.tokens import TokenCounter

    c = _COUNTER[0] if _COUNTER else None
    if c is None:
        from sb2.models.loading import load_tokenizer

        c = TokenCounter(load_tokenizer("tiny:teacher").backend_tokenizer.to_str(), 20)
        _COUNTER.append(c)
    text = normalize_prompt(text)
    assert c.count([text]) == [_real_count(c, text)]
    cut = c.truncate(text)
    assert text.startswith(cut) and _real_count(c, cut) <= 20
    c.fast = False  # the tokenizer's own offsets give the same cut
    try:
        assert c.truncate(text) == cut
    finally:
        c.fast = True


_COUNTER: list = []


def test_truncation_keeps_whole_pre_tokens(counter):
    long = "a steampunk airship docking at a floating city above the clouds, " * 8
    cut = counter.truncate(long)
    assert _real_count(counter, cut) <= 75 < _real_count(counter, long)
    assert long.startswith(cut) and long[len(cut)] in " ,"
    assert counter.truncate("a short one") == "a short one"
