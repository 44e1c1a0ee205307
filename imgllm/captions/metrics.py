"""Caption metrics: corpus BLEU, CIDEr-D, ROUGE-L and exact match, on coco-caption's tokenisation; distinct-n and
class read-back, which need no reference.

Implemented here (pure Python, no Java) and checked in tests/test_metrics.py against the published values of
NLTK's `corpus_bleu` docstring and against coco-caption's reference implementation (pycocoevalcap: its
PTBTokenizer, `Bleu` and `Cider`) on fixed examples.

All metrics take hypotheses as a sequence of strings and references as a sequence (one entry per hypothesis)
of non-empty sequences of strings. Strings are tokenised by `tokenize_caption` unless already lists of words.

Tokenisation. coco-caption (pycocoevalcap) runs every caption through the Stanford PTBTokenizer of CoreNLP 3.4.1
(a Java jar, `-preserveLines -lowerCase`) and then drops the tokens in its PUNCTUATIONS list. The scores depend
on it: PTB keeps `black-and-white` whole and splits `isn't` into `is n't`. `ptb_tokenize` is a Python port of
that lexer's rules (PTBLexer.flex, with its default options), so that scores match coco-caption's without Java.
It was compared token by token with the 3.4.1 jar on tens of thousands of generated lines (words, contractions,
hyphens, numbers, abbreviations, quotes, brackets, URLs, symbols, Latin and other letters): all agreed.
"""

from __future__ import annotations

import collections
import functools
import math
import re
from collections.abc import Callable, Sequence
from typing import NamedTuple

Text = str | Sequence[str]

# ------------------------------------------------------------------------------- PTB tokenisation (coco-caption)
#
# The lexer reads the longest match of any rule at the current position, counting a rule's trailing context
# (what must follow the token, `tail`) in its length, and takes the first rule listed on a tie (JFlex's
# semantics). The rule names in comments are those of PTBLexer.flex. JFlex rules are case-insensitive in their
# literal strings and case-sensitive in character classes; (?i:...) and (?-i:...) below say the same. The jar
# holds no source: the rules follow PTBLexer.flex of the CoreNLP releases around 3.4.1, corrected wherever the
# 3.4.1 jar tokenised differently (its abbreviation lists, e-mail, file name and smiley rules, among others).


def _char_class(predicate: Callable[[str], bool]) -> str:
    """A regex character-class body listing the Basic Multilingual Plane characters for which `predicate` holds."""
    ranges, start = [], None
    for code in range(0x10001):
        if code < 0x10000 and predicate(chr(code)):
            start = code if start is None else start
        elif start is not None:
            ranges.append(f"\\u{start:04x}" if start == code - 1 else f"\\u{start:04x}-\\u{code - 1:04x}")
            start = None
    return "".join(ranges)


# Java's letters are Python's (str.isalpha); Python's [^\W\d_] also holds numerals such as ½ and ², which are not.
_LETTER = rf"(?:(?![{_char_class(lambda c: c.isnumeric() and not c.isdecimal() and not c.isalpha())}])[^\W\d_])"
_WORD_LETTER = rf"(?:{_LETTER}|[\u00AD\u0237-\u024F\u02C2-\u02C5\u02D2-\u02DF\u02E5-\u02FF\u0300-\u036F])"
_DIGIT = r"\d"
_ALNUM = rf"(?:{_LETTER}|\d)"
_SPACE = r"[ \t\u00A0\u2000-\u200A\u3000]"
_NEWLINE = r"(?:\r\n|[\r\n\u2028\u2029\u000B\u000C\u0085])"
_SPACE_OR_NEWLINE = rf"(?:{_SPACE}|{_NEWLINE})"
_APOS = r"(?:['\u0092\u2019]|&apos;)"
_APOS_ETC = rf"(?:{_APOS}|[`\u0091\u2018\u201B])"
_SGML = (
    r"<(?:[!?][A-Za-z\-][^>\r\n]*|[A-Za-z][A-Za-z0-9_:.\-]*(?:[ ]+(?:[A-Za-z][A-Za-z0-9_:.\-]*(?:[ ]*=[ ]*"
    r"(?:'[^']*'|\"[^\"]*\"))?))*[ ]*/?|/[A-Za-z][A-Za-z0-9_:.\-]*)[ ]*>"
)
_SENTENCE_END = rf"{_SPACE_OR_NEWLINE}(?:{_SPACE_OR_NEWLINE}|[A-Z]|{_SGML})"
_NUM = rf"(?:{_DIGIT}*(?:[.:,\u00AD\u066B\u066C]{_DIGIT}+)+|{_DIGIT}+)"
_WORD = rf"{_WORD_LETTER}(?:{_WORD_LETTER}|{_DIGIT})*(?:[.!?]{_WORD_LETTER}(?:{_WORD_LETTER}|{_DIGIT})*)*"
_REDAUX = rf"{_APOS}(?:[msdMSD]|(?i:re|ve|ll))"  # 's 'm 'd 're 've 'll
_SWORD = r"[A-Za-z\u00AD]*[A-MO-Za-mo-z]\u00AD*"  # a word before n't ("do" of "don't")
_SREDAUX = rf"(?i:n){_APOS_ETC}(?i:t)"
_HYPHEN = r"[\-_\u058A\u2010\u2011]"
_THING = rf"(?:[dDoOlL]{_APOS_ETC}{_ALNUM})?{_ALNUM}+(?:{_HYPHEN}(?:[dDoOlL]{_APOS_ETC}{_ALNUM})?{_ALNUM}+)*"
_THINGA = r"[A-Z]+(?:(?:[+&]|&amp;)[A-Z]+)+"  # AT&T
_THING3 = r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}"  # and/or
_ACRO_SPECIAL = r"(?i:(?:canada|sino|korean|eu|japan|non)-u\.s|u\.s\.-(?:u\.s\.s\.r|u\.k))"
_ACRO = rf"(?:{_ACRO_SPECIAL}|[A-Za-z](?:\.[A-Za-z])+)"
_HTHING = rf"[A-Za-z0-9][A-Za-z0-9.,\u00AD]*(?:-(?:[A-Za-z0-9\u00AD]+|{_ACRO}\.))+"  # hyphenated words
_APOWORDS = (
    rf"{_APOS}(?i:n){_APOS}?",
    rf"[lLdDjJ]{_APOS}",
    rf"(?i:dunkin|somethin|ol){_APOS}",
    rf"{_APOS}(?i:em)",
    rf"[A-HJ-XZn]{_APOS_ETC}{_LETTER}{{2}}{_LETTER}*",
    rf"{_APOS}[2-9]0(?i:s)",
    rf"{_APOS}(?i:till?)",
    rf"{_LETTER}+[aeiouyAEIOUY]{_APOS_ETC}[aeiouA-Z]{_LETTER}*",
    rf"{_APOS}(?i:cause)",
    r"(?i:cont'd\.?)",
    r"(?i:nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l)",
)  # words kept whole: o'clock ma'am 'em '90s
_ABBREV1 = (
    r"(?i:jan|feb|mar|apr|jun|jul|aug|sept?|oct|nov|dec|mon|tues?|wed|thu(?:rs)?|fri"  # months, days
    r"|ala|ariz|(?-i:A)z|(?-i:A)rk|calif|colo|conn|ct|dak|(?-i:D)el|fla|ga|(?-i:I)ll|ind|kans?|ky|(?-i:L)a"
    r"|(?-i:M)ass|md|mich|minn|(?-i:M)iss|mo|mont|neb|nev|okla|(?-i:O)re|(?-i:P)a|penn|tenn|(?-i:T)ex|va|vt"
    r"|(?-i:W)ash|wisc?|wyo"  # states
    r"|inc|cos?|corp|pp?t[ye]s?|ltd|plc|rt|bancorp|bhd|assn|univ|intl|sys|tel|est|ext|sq"
    r"|jr|sr|bros|(?:ed|ph)\.d|blvd|rd|esq|etc|al|seq|bldg)\."
)
_ABBREV2 = (
    _ACRO,
    r"(?i:mrs?|ms|(?-i:M)iss|drs?|profs?|sens?|reps?|attys?|lt|col|gen|messrs|govs?|adm|rev|maj|sgt"
    r"|cpl|pvt|capt|ste?|ave|pres|lieut|hon|brig|co?mdr|pfc|spc|supts?|det|mt|ft|adj|adv|asst|assoc"
    r"|ens|insp|mlle|mme|msgr|sfc|vs|(?-i:v)|alex|wm|jos|cie|a\.k\.a|cf|treas|ph|invt|elec|natl"
    r"|m[ft]g|dept|blvd|rd|ave)",
    r"[A-Za-z]",
)
_ABBREV3 = r"(?i:ca|figs?|prop|nos?|art|bldg|pp|op)\."  # abbreviations only before a number
_ACRONYM_FOLLOWERS = "|".join(
    f"{word[0]}(?i:{word[1:]})"
    for word in (
        "About According Additionally After An A As At But Earlier He Her Here However If In It Last Many More Mr\\. "
        "Ms\\. Now Once One Other Our She Since So Some Such That The Their Then There These They This We When While "
        "What Yet You"
    ).split()
)
_PHONE = (
    r"(?:\([0-9]{2,3}\)[ \u00A0]?|(?:\+\+?)?(?:[0-9]{2,4}[\- \u00A0])?[0-9]{2,4}[\- \u00A0])[0-9]{3,4}"
    r"[\- \u00A0]?[0-9]{3,5}|(?:(?:\+\+?)?[0-9]{2,4}\.)?[0-9]{2,4}\.[0-9]{3,4}\.[0-9]{3,5}"
)
_QUOTES = (
    rf"(?:{_APOS}|''|[`\u0092\u2018\u2019\u201A\u201B\u201C\u201D\u0091\u0093\u0094\u201E\u201F\u2039"
    r"\u203A\u00AB\u00BB]{1,2})"
)
_FULL_URL = r"(?i:https?)://[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},\-]"
_LIKELY_URL = (
    r"(?:(?i:www)\.(?:[^ \t\n\f\r\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4}|(?:[^ \t\n\f\r\"`'<>|.!?(){},-_$]+\.)+"
    r"(?i:com|net|org|edu))(?:/[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},\-])?"
)
_EMAIL = (
    r"(?:&lt;|<)?[a-zA-Z0-9][^ \t\n\f\r\"<>|()\u00A0{}]*@(?:[^ \t\n\f\r\"<>|(){}.\u00A0]+\.)*"
    r"[^ \t\n\f\r\"<>|(){}.\u00A0]+(?:&gt;|>)?"
)
_FILENAME = (
    rf"(?:{_WORD_LETTER}|{_DIGIT})+(?:\.(?:{_WORD_LETTER}|{_DIGIT})+)*\.(?i:bat|bmp|bz2|c|class|cgi|cpp|dll"
    r"|doc|docx|exe|gif|gz|h|htm|html|jar|java|jpeg|jpg|mov|mp3|pdf|php|pl|png|ppt|ps|py|sql|tar|txt|wav"
    r"|x|xml|zip)"
)
_SMILEY = r"[<>]?[:;=][\-o*']?[()DPdpO\\{@|\[\]]"
_ASIAN_SMILEY = (
    r"[\-^x=~<>']_[\-^x=~<>']|\([\-^x=~<>'][_.]?[\-^x=~<>']\)|\([\^x=~<>']-[\^x=~<>'`]\)"
    r"|\u00AF\\_\(\u30C4\)_/\u00AF"
)
_MISC_SYMBOL = (
    r"[\u00A6-\u00A9\u00AC\u00AE-\u00BA\u00D7\u00F7\u0387\u2020-\u2023\u2032-\u2038\u2044\u207A-\u207F"
    r"\u208A-\u208E\u2100-\u214F\u2190-\u21FF\u2200-\u22FF\u2600-\u26FF]"
)

# What a rule makes of the text it matched: the tokens it emits, and how many of the matched characters it puts
# back to be read again (PTBLexer's yypushback).
Action = Callable[[str], tuple[list[str], int]]


def _keep(text: str) -> tuple[list[str], int]:
    return [text], 0


def _drop(text: str) -> tuple[list[str], int]:
    return [], 0


def _emit(token: str) -> Action:
    """The action that emits `token` in place of the matched text (a dash as --, a bracket as -LRB-)."""
    return lambda text: ([token], 0)


def _map(function: Callable[[str], str]) -> Action:
    """The action that emits function(matched text)."""
    return lambda text: ([function(text)], 0)


def _give_back(count: int) -> Action:
    """Emits all but the last `count` characters, which are read again: cannot -> can not, gonna -> gon na."""
    return lambda text: ([text[:-count]], count)


def _sentence_final(text: str) -> tuple[list[str], int]:
    """An abbreviation that ends a sentence: emitted with its period, and the period is read again as "."."""
    return [text], 1


def _acronym(text: str) -> tuple[list[str], int]:
    """Like `_sentence_final`, except that a single letter ("I.") is emitted without its period."""
    return [text[0] if len(text) == 2 else text], 1


def _latex_quotes(text: str, opening: bool) -> str:
    """Quotes as PTB writes them: `` and ` opening, '' and ' closing (straight quotes by `opening`)."""
    text = re.sub(r"&apos;|'", "`" if opening else "'", text)
    text = re.sub(r"\"|&quot;", "``" if opening else "''", text)
    text = re.sub("[\u0091\u2018\u201b\u2039]", "`", text)
    text = re.sub("[\u0092\u2019\u203a]", "'", text)
    text = re.sub("[\u0093\u201c\u00ab]", "``", text)
    return re.sub("[\u0094\u201d\u00bb]", "''", text)


def _without_soft_hyphens(text: str) -> str:
    return text.replace("\u00ad", "") or "-"


def _round_brackets(text: str) -> str:
    return text.replace("(", "-LRB-").replace(")", "-RRB-")


def _no_break_spaces(text: str) -> str:
    """Spaces inside one token (5 1/2, an SGML tag) become U+00A0, so that tokens never hold a space."""
    return text.replace(" ", "\u00a0")


def _currency(text: str) -> str:
    return re.sub("[\u0080\u00a4\u20a0\u20ac]", "$", text.replace("\u00a2", "cents").replace("\u00a3", "#"))


_FRACTIONS = {"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3"}


class _Rule(NamedTuple):
    """One lexer rule: a token pattern, what must follow it, and what it emits."""

    pattern: str  # the token
    tail: str | None  # trailing context: must follow the token, counts in the match length, is not consumed
    action: Action
    longest: bool = False  # the pattern's alternatives can stop early in Python's re: search the longest match


_OPENING, _CLOSING = _map(lambda t: _latex_quotes(t, True)), _map(lambda t: _latex_quotes(t, False))
_AFTER_ABBREVIATION_1 = r"(?s:..)"  # ABBREV1 followed by any two characters: not at a sentence end
_RULES = (
    _Rule(r"(?i:c\+\+|[cf]#)", None, _keep),  # PROG_LANGS
    _Rule(r"(?i:cannot)|'(?i:twas)", None, _give_back(3)),  # ASSIMILATIONS3
    _Rule(r"'(?i:tis)|(?i:gonna|gotta|lemme|gimme|wanna)", None, _give_back(2)),  # ASSIMILATIONS2
    _Rule(_SGML, None, _map(_no_break_spaces)),
    _Rule(r"&(?:MD|mdash|ndash);|[\u0096\u0097\u2013\u2014\u2015]", None, _emit("--")),  # SPMDASH
    _Rule(r"(?i:&amp;)", None, _emit("&")),
    _Rule(r"&(?:HT|TL|UR|LR|QC|QL|QR|odq|cdq|#[0-9]+);", None, _keep),  # SPPUNC
    _Rule(_WORD, _REDAUX, _map(_without_soft_hyphens)),
    _Rule(_SWORD, _SREDAUX, _map(_without_soft_hyphens)),
    _Rule(_WORD, None, _map(_without_soft_hyphens)),
    *(_Rule(apoword, None, _keep) for apoword in _APOWORDS),
    _Rule(r"(?i:y)" + _APOS, _LETTER, _keep),  # y'all
    _Rule(_FULL_URL, None, _keep),
    _Rule(_LIKELY_URL, None, _keep),
    _Rule(_EMAIL, None, _keep),
    _Rule(rf"@[a-zA-Z_][a-zA-Z_0-9]*|#{_WORD_LETTER}+", None, _keep),  # TWITTER
    _Rule(_REDAUX, r"[^A-Za-z]", _CLOSING),
    _Rule(_SREDAUX, None, _CLOSING),
    _Rule(rf"{_DIGIT}{{1,2}}[\-/]{_DIGIT}{{1,2}}[\-/]{_DIGIT}{{2,4}}", None, _keep),  # DATE
    _Rule(rf"[\-+]?{_NUM}", None, _map(_without_soft_hyphens)),  # NUMBER
    _Rule(r"[\u207A\u207B\u208A\u208B]?(?:[\u2070\u00B9\u00B2\u00B3\u2074-\u2079]+|[\u2080-\u2089]+)", None, _keep),
    _Rule(
        rf"(?:{_DIGIT}{{1,4}}[\- \u00A0])?{_DIGIT}{{1,4}}(?:\\?/|\u2044){_DIGIT}{{1,4}}", None, _map(_no_break_spaces)
    ),  # FRAC
    _Rule(r"[\u00BC\u00BD\u00BE\u2153-\u215E]", None, _map(lambda t: _FRACTIONS.get(t, t))),
    *(
        _Rule(tbspec, None, _map(lambda t: t.replace("&amp;", "&")))
        for tbspec in (  # TBSPEC
            r"-(?i:RRB|LRB|RCB|LCB|RSB|LSB)-",
            r"(?i:C\.D\.s|pro-|anti-|S(?:&|&amp;)P-500|S(?:&|&amp;)Ls)",
            rf"(?i:Cap){_APOS}(?i:n)",
            rf"(?i:c){_APOS}(?i:est)",
        )
    ),
    _Rule(_THING3, None, _keep),
    _Rule(r"[A-Z]*\$|#", None, _keep),  # DOLSIGN
    _Rule(
        r"[\u00A2\u00A3\u00A4\u00A5\u0080\u20A0\u20AC\u060B\u0E3F\u20A4\uFFE0\uFFE1\uFFE5\uFFE6]", None, _map(_currency)
    ),
    _Rule(
        rf"(?:{_ACRO_SPECIAL}|[A-Za-z](?:\.[A-Za-z])*)\.",  # ACRONYM
        rf"{_SPACE_OR_NEWLINE}+(?:{_ACRONYM_FOLLOWERS}){_SPACE_OR_NEWLINE}",
        _acronym,
    ),
    _Rule(_ABBREV3, rf"{_SPACE_OR_NEWLINE}?{_DIGIT}", _keep),
    _Rule(_ABBREV1, _SENTENCE_END, _sentence_final),
    _Rule(_ABBREV1, _AFTER_ABBREVIATION_1, _keep),
    _Rule(_ABBREV1, None, _sentence_final),
    *(_Rule(rf"{abbrev}\.", None, _keep) for abbrev in _ABBREV2),
    *(_Rule(abbrev, _SPACE, _keep) for abbrev in _ABBREV2),
    _Rule(_ACRO, _SPACE_OR_NEWLINE, _keep),
    _Rule(rf"{_APOS}[0-9][0-9]", _SPACE_OR_NEWLINE, _keep),  # TBSPEC2 '90
    _Rule(_FILENAME, rf"{_SPACE_OR_NEWLINE}|[.?!,]", _keep),
    _Rule(rf"{_WORD}\.", r"[,;:]", _map(_without_soft_hyphens)),
    _Rule(_PHONE, None, _map(lambda t: _round_brackets(_no_break_spaces(t)))),
    _Rule(_SMILEY, r"[^A-Za-z0-9]", _map(_round_brackets)),
    _Rule(_ASIAN_SMILEY, None, _map(_round_brackets)),
    _Rule(r"\"|&quot;", r"[A-Za-z0-9$]", _OPENING),
    _Rule(r"\"|&quot;", None, _CLOSING),
    _Rule(r"[+%&\u2030\u2031~^|\\]", None, _keep),
    _Rule(r"<<|>>", None, _keep),
    _Rule(r"[<>]", None, _keep),
    _Rule(r"\{", None, _emit("-LCB-")),
    _Rule(r"\}", None, _emit("-RCB-")),
    _Rule(r"\[", None, _emit("-LSB-")),
    _Rule(r"\]", None, _emit("-RSB-")),
    _Rule(r"\(", None, _emit("-LRB-")),
    _Rule(r"\)", None, _emit("-RRB-")),
    _Rule(r"-+", None, _map(lambda t: "--" if 3 <= len(t) <= 4 else t)),  # HYPHENS
    _Rule(r"\.{3,5}|(?:\.[ \u00A0]){2,4}\.|[\u0085\u2026]", None, _emit("...")),  # LDOTS
    _Rule(r"@+|#+|_+", None, _keep),
    _Rule(r"\*+|(?:\\\*){1,3}", None, _keep),
    _Rule(r"[,;:]", None, _keep),
    _Rule(r"[?!]+", None, _keep),
    _Rule(r"[.\u00A1\u00BF\u037E\u0589\u061F\u06D4\u0700-\u0702\u07FA]", None, _keep),
    _Rule(r"=", None, _keep),
    _Rule(r"/", None, _keep),
    _Rule(rf"{_HTHING}\.", r"[,;:]", _map(_without_soft_hyphens), longest=True),
    _Rule(_HTHING, None, _map(_without_soft_hyphens), longest=True),
    _Rule(rf"{_THING}\.", r"[,;:]", _keep, longest=True),
    _Rule(_THING, None, _keep, longest=True),
    _Rule(rf"{_THINGA}\.", r"[,;:]", _map(lambda t: t.replace("&amp;", "&"))),
    _Rule(_THINGA, None, _map(lambda t: t.replace("&amp;", "&"))),
    _Rule(r"'", r"[A-Za-z][^ \t\n\r\u00A0]", _OPENING),
    _Rule(_REDAUX, None, _CLOSING),
    _Rule(_QUOTES, None, _CLOSING, longest=True),
    _Rule(_MISC_SYMBOL, None, _keep),
    _Rule(rf"\x00|{_SPACE}+|[\u200B\u200E\u200F\uFEFF]|{_NEWLINE}|&nbsp;", None, _drop),
    _Rule(r".", None, _drop),  # a character no rule knows: deleted, as PTBLexer does
)
_NON_BLANK_RUN = re.compile(r"[^ \t\n\r\u00A0\u2000-\u200A\u3000\u2028\u2029\u000B\u000C\u0085]*")
# Fast paths, equivalent to the rules: blanks, and a word of ASCII letters (hyphenated or not) before a blank.
_BLANKS = re.compile(r"[ \t]+")
_PLAIN_WORD = re.compile(r"[A-Za-z]+(?:-[A-Za-z]+)*(?=[ \t\n]|$)")
_ASSIMILATIONS = frozenset({"cannot", "gonna", "gotta", "lemme", "gimme", "wanna"})

# pycocoevalcap's PUNCTUATIONS (tokenizer/ptbtokenizer.py), dropped after tokenisation. Its bracket entries are
# upper case and the tokens lower case, so -lrb- and -rrb- stay, as they do in coco-caption.
PTB_PUNCTUATION = frozenset(
    {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
)


@functools.cache
def _compiled_rules() -> tuple[tuple[re.Pattern, _Rule], ...]:
    """Each rule as one regex (its token, then its trailing context), compiled on first use (a tenth of a second)."""
    return tuple(
        (re.compile(rf"(?P<token>{rule.pattern})" + (rf"(?:{rule.tail})" if rule.tail else ""), re.DOTALL), rule)
        for rule in _RULES
    )


def _longest_match(text: str, pos: int) -> tuple[int, Action]:
    """The end of the token at `pos` and its rule's action: the longest match, trailing context included, of any
    rule (the first rule listed on a tie)."""
    best_length, best, run_end = -1, None, None
    for regex, rule in _compiled_rules():
        match = regex.match(text, pos)
        if match is None:
            continue
        if rule.longest:  # Python's re takes the first alternative that matches, JFlex the longest
            run_end = run_end or _NON_BLANK_RUN.match(text, pos).end()
            match = next(
                (full for end in range(run_end, match.end(), -1) if (full := regex.fullmatch(text, pos, end))), match
            )
        if match.end() - pos > best_length:
            best_length, best = match.end() - pos, (match.end("token"), rule.action)
    return best


def ptb_tokens(text: str) -> list[str]:
    """The tokens of Stanford PTBTokenizer (CoreNLP 3.4.1, default options) for `text`, before lowercasing.

    `text` is read as one line followed by a line break, as coco-caption's tokenizer reads each caption but the last.
    """
    text, pos, tokens = text + "\n", 0, []
    while pos < len(text):
        if blanks := _BLANKS.match(text, pos):
            pos = blanks.end()
            continue
        if word := _PLAIN_WORD.match(text, pos):
            word_text = word.group()
            tokens += [word_text[:3], word_text[3:]] if word_text.lower() in _ASSIMILATIONS else [word_text]
            pos = word.end()
            continue
        end, action = _longest_match(text, pos)
        emitted, given_back = action(text[pos:end])
        tokens += emitted
        pos = end - given_back
    return tokens


def ptb_tokenize(text: str) -> str:
    """A caption as coco-caption (pycocoevalcap's PTBTokenizer) tokenises it: PTB tokens, lower case, without
    punctuation tokens, joined by spaces. "A black-and-white cat isn't there." -> "a black-and-white cat is n't there".

    pycocoevalcap tokenises all captions as the lines of one file, and a few PTB rules look past the end of a line
    into the next caption. Here each caption is read on its own, followed by a line break; the rare differences:
    a caption ending in "No." (or "fig.", "ca.") keeps the period when the next caption starts with a digit, and
    one ending in a single letter and a period ("... the letter X.") loses it when the next caption starts with
    "A", "The", "It" or a few other words.
    """
    tokens = (token.lower() for token in ptb_tokens(text.replace("\n", " ")))
    return " ".join(token for token in tokens if token not in PTB_PUNCTUATION)


def tokenize_caption(text: Text) -> list[str]:
    """The words of `text` as coco-caption's metrics see them: `ptb_tokenize`, split at white space.

    A list/tuple of words is returned unchanged, so callers may tokenise themselves.
    """
    if isinstance(text, str):
        return ptb_tokenize(text).split()
    return list(text)


def _ngram_counts(words: Sequence[str], max_n: int) -> collections.Counter:
    """Counts every n-gram of `words` for n = 1..max_n (keys are tuples)."""
    counts = collections.Counter()
    for n in range(1, max_n + 1):
        for i in range(len(words) - n + 1):
            counts[tuple(words[i : i + n])] += 1
    return counts


def _check_pairs(hypotheses: Sequence[Text], references: Sequence[Sequence[Text]]) -> None:
    """Raises a clear error when hypotheses and references do not pair up one-to-one."""
    if isinstance(hypotheses, str):
        raise TypeError("hypotheses must be a sequence of captions, got a single string")
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    if not hypotheses:
        raise ValueError("no hypotheses to score")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"references[{i}] must be a non-empty list of captions, got {refs!r}")


def corpus_bleu(hypotheses: Sequence[Text], references: Sequence[Sequence[Text]], max_n: int = 4) -> float:
    """Corpus-level BLEU (Papineni et al. 2002) with uniform weights over 1..max_n-grams, no smoothing.

    Clipped n-gram matches and candidate n-gram totals are summed over the corpus before the geometric mean;
    the brevity penalty uses, per hypothesis, the reference length closest to it (shorter on ties). This is
    NLTK's `corpus_bleu` default, and coco-caption's `Bleu` up to the 1e-15 and 1e-9 that it adds to its counts
    (a relative difference of 1e-9 at most; it gives a tiny positive score where this one is 0.0). Returns 0.0
    when some n-gram order has no match.
    """
    _check_pairs(hypotheses, references)
    matches = [0] * max_n
    totals = [0] * max_n
    hyp_length = ref_length = 0
    for hyp, refs in zip(hypotheses, references):
        hyp_words = tokenize_caption(hyp)
        ref_words = [tokenize_caption(r) for r in refs]
        hyp_counts = _ngram_counts(hyp_words, max_n)
        max_ref_counts = collections.Counter()
        for words in ref_words:
            max_ref_counts |= _ngram_counts(words, max_n)
        for ngram, count in hyp_counts.items():
            matches[len(ngram) - 1] += min(count, max_ref_counts[ngram])
        for n in range(1, max_n + 1):
            totals[n - 1] += max(len(hyp_words) - n + 1, 0)
        hyp_length += len(hyp_words)
        ref_length += min((len(w) for w in ref_words), key=lambda r: (abs(r - len(hyp_words)), r))
    if min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / max_n
    brevity = 1.0 if hyp_length > ref_length else math.exp(1.0 - ref_length / max(hyp_length, 1))
    return brevity * math.exp(log_precision)


def bleu4(hypotheses: Sequence[Text], references: Sequence[Sequence[Text]]) -> float:
    """Corpus BLEU-4 (see `corpus_bleu`)."""
    return corpus_bleu(hypotheses, references, max_n=4)


def cider_d_scores(
    hypotheses: Sequence[Text], references: Sequence[Sequence[Text]], *, max_n: int = 4, sigma: float = 6.0
) -> list[float]:
    """Per-hypothesis CIDEr-D (Vedantam et al. 2015, as in the coco-caption code).

    TF-IDF vectors of 1..max_n-grams, with document frequencies counted over the reference sets of this corpus
    (one document per image); for each reference, the cosine similarity with the hypothesis' counts clipped to
    the reference's, times a Gaussian penalty exp(-(len_h - len_r)^2 / (2 sigma^2)); averaged over n and over
    references, times 10.
    """
    _check_pairs(hypotheses, references)
    hyp_counts = [_ngram_counts(tokenize_caption(h), max_n) for h in hypotheses]
    ref_counts = [[_ngram_counts(tokenize_caption(r), max_n) for r in refs] for refs in references]
    document_frequency = collections.Counter()
    for refs in ref_counts:
        document_frequency.update({ngram for counts in refs for ngram in counts})
    log_num_documents = math.log(len(references))

    def tfidf(counts):
        vectors = [dict() for _ in range(max_n)]
        for ngram, tf in counts.items():
            vectors[len(ngram) - 1][ngram] = tf * (log_num_documents - math.log(max(1.0, document_frequency[ngram])))
        norms = [math.sqrt(sum(v * v for v in vec.values())) for vec in vectors]
        length = sum(tf for ngram, tf in counts.items() if len(ngram) == 1)
        return vectors, norms, length

    scores = []
    for hyp, refs in zip(hyp_counts, ref_counts):
        hyp_vec, hyp_norm, hyp_len = tfidf(hyp)
        total = 0.0
        for ref in refs:
            ref_vec, ref_norm, ref_len = tfidf(ref)
            penalty = math.exp(-((hyp_len - ref_len) ** 2) / (2 * sigma**2))
            for n in range(max_n):
                dot = sum(min(w, ref_vec[n].get(g, 0.0)) * ref_vec[n].get(g, 0.0) for g, w in hyp_vec[n].items())
                if hyp_norm[n] != 0 and ref_norm[n] != 0:
                    dot /= hyp_norm[n] * ref_norm[n]
                total += dot * penalty
        scores.append(10.0 * total / (max_n * len(refs)))
    return scores


def cider_d(hypotheses: Sequence[Text], references: Sequence[Sequence[Text]]) -> float:
    """Corpus CIDEr-D: the mean of `cider_d_scores`. 0 for a single image, as in coco-caption (`cider_note`)."""
    scores = cider_d_scores(hypotheses, references)
    return sum(scores) / len(scores)


def cider_note(num_images: int) -> str | None:
    """Why CIDEr-D means nothing for `num_images` images (fewer than two), else None: its n-gram weights are
    document frequencies over the images scored together, and with one image every weight is log(1/1) = 0."""
    if num_images >= 2:
        return None
    return (
        f"CIDEr-D needs at least 2 images (got {num_images}): its n-gram weights come from the images scored "
        "together, and for one image they are all 0"
    )


def normalize_caption(text: str) -> str:
    """The caption's words joined by single spaces (case, punctuation and spacing ignored, as `tokenize_caption`)."""
    return " ".join(tokenize_caption(text))


def exact_match(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Fraction of hypotheses equal to one of their references after `normalize_caption`."""
    _check_pairs(hypotheses, references)
    hits = sum(normalize_caption(h) in {normalize_caption(r) for r in refs} for h, refs in zip(hypotheses, references))
    return hits / len(hypotheses)


def caption_metrics(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """{"bleu4", "cider", "rouge_l", "exact_match"} for a corpus of generated captions and their references.

    "cider" is 0.0 for a single image, a number without meaning: reports should say so (`cider_note`).
    """
    return {
        "bleu4": bleu4(hypotheses, references),
        "cider": cider_d(hypotheses, references),
        "rouge_l": rouge_l(hypotheses, references),
        "exact_match": exact_match(hypotheses, references),
    }


# ------------------------------------------------------------------------ without references: diversity, read-back


def distinct_n(captions: Sequence[Text], n: int) -> float:
    """distinct-n (Li et al. 2016): distinct n-grams over all n-grams of a corpus of captions (1.0: no n-gram
    repeats; a captioner writing one sentence for every image tends to 0). 0.0 when no caption has n words."""
    if n < 1:
        raise ValueError(f"distinct-n needs n >= 1, got {n}")
    grams = [tuple(words[i : i + n]) for words in map(tokenize_caption, captions) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def classes_named(caption: Text, names: Sequence[Sequence[str]]) -> list[int]:
    """Indices of the classes a caption names: class i is named when one of names[i] (each one or more words, e.g.
    ("automobile", "car"), "fire truck") occurs in it as whole words, case and punctuation ignored."""
    words = f" {' '.join(tokenize_caption(caption))} "
    return [
        i
        for i, synonyms in enumerate(names)
        if any(f" {' '.join(tokenize_caption(name))} " in words for name in synonyms)
    ]


def read_back(captions: Sequence[Text], predicted: Sequence[int], names: Sequence[Sequence[str]]) -> dict[str, float]:
    """How often each caption names its image's predicted class: {"names_predicted": the fraction naming it,
    "names_other": naming another class (it may name both), "names_none": naming no class}."""
    if len(captions) != len(predicted) or not len(captions):
        raise ValueError(
            f"read-back needs one predicted class per caption, got {len(captions)} captions and "
            f"{len(predicted)} classes"
        )
    named = [classes_named(caption, names) for caption in captions]
    count = len(captions)
    return {
        "names_predicted": sum(int(p) in n for n, p in zip(named, predicted)) / count,
        "names_other": sum(any(i != int(p) for i in n) for n, p in zip(named, predicted)) / count,
        "names_none": sum(not n for n in named) / count,
    }


# ---------------------------------------------------------------------------------------------------- ROUGE-L

ROUGE_L_BETA = 1.2  # coco-caption's weight of recall against precision in ROUGE-L's F-measure


def lcs_length(first: Sequence[str], second: Sequence[str]) -> int:
    """The length of the longest common subsequence of two word sequences (in order, not necessarily adjacent)."""
    previous = [0] * (len(second) + 1)
    for word in first:
        current = [0]
        for j, other in enumerate(second):
            current.append(previous[j] + 1 if word == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l_scores(
    hypotheses: Sequence[Text], references: Sequence[Sequence[Text]], *, beta: float = ROUGE_L_BETA
) -> list[float]:
    """Per-hypothesis ROUGE-L (Lin 2004) as coco-caption's `Rouge` computes it.

    For each reference, precision = LCS / hypothesis length and recall = LCS / reference length (`lcs_length` of
    the words); the best precision and the best recall over the references (possibly of different references)
    give F = (1 + beta^2) P R / (R + beta^2 P), 0 when either is 0. A caption without words counts as one empty
    word, as coco-caption's split(" ") of an empty string does. Words are `tokenize_caption`'s, split at any white
    space; coco-caption's Rouge splits at spaces only, so a PTB token holding a no-break space ("5 1/2") is one
    word there and two here (BLEU and CIDEr-D split as here).
    """
    _check_pairs(hypotheses, references)
    scores = []
    for hyp, refs in zip(hypotheses, references):
        hyp_words = tokenize_caption(hyp) or [""]
        precision = recall = 0.0
        for ref in refs:
            ref_words = tokenize_caption(ref) or [""]
            common = lcs_length(ref_words, hyp_words)
            precision, recall = max(precision, common / len(hyp_words)), max(recall, common / len(ref_words))
        if precision == 0 or recall == 0:
            scores.append(0.0)
        else:
            scores.append((1 + beta**2) * precision * recall / (recall + beta**2 * precision))
    return scores


def rouge_l(hypotheses: Sequence[Text], references: Sequence[Sequence[Text]]) -> float:
    """Corpus ROUGE-L: the mean of `rouge_l_scores` over the images, as coco-caption reports it."""
    scores = rouge_l_scores(hypotheses, references)
    return sum(scores) / len(scores)
