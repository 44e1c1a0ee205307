"""coco-caption's tokenisation: a Python port of the Stanford PTBTokenizer (CoreNLP 3.4.1) that caption metrics
read their words with (`imgllm.captions.metrics`).

coco-caption (pycocoevalcap) runs every caption through the Stanford PTBTokenizer of CoreNLP 3.4.1 (a Java jar,
`-preserveLines -lowerCase`) and then drops the tokens in its PUNCTUATIONS list. The scores depend on it: PTB keeps
`black-and-white` whole and splits `isn't` into `is n't`. `ptb_tokenize` is a Python port of that lexer's rules
(PTBLexer.flex, with its default options), so that scores match coco-caption's without Java. It was compared token by
token with the 3.4.1 jar on tens of thousands of generated lines (words, contractions, hyphens, numbers,
abbreviations, quotes, brackets, URLs, symbols, Latin and other letters): all agreed.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from typing import NamedTuple

Text = str | Sequence[str]  # a caption, or its words already split

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
