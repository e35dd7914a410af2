"""English word tokenizer of the Gopher rules: spaCy's rule-based English tokenizer
(`spacy.blank("en")`, which datatrove's Gopher filters use), without spaCy.

spaCy splits the text at whitespace, then each piece: a special case (an abbreviation such as
`e.g.` or `Mr.`, a contraction such as `don't` -> `do`, `n't`) is looked up whole; else it
strips prefixes (opening punctuation, quotes, currency) and suffixes (closing punctuation,
quotes, `'s`, a period after a lower-case letter or digit) one at a time, re-checking the
special cases, and splits what is left at infixes (an ellipsis, a symbol, a hyphen between
a letter or digit and a letter, `:<>=/` before a letter, a period between a lower-case and an
upper-case letter); special cases split across affixes (`):`) are joined again. So `--`,
`3.11`, `sys.path` and `UTF-8` stay one token, as in spaCy. The affix patterns below are
spaCy's English ones (spacy/lang/punctuation.py, spacy/lang/en/punctuation.py) with its
Unicode letter classes narrowed to the main scripts (case: Latin-1) and its symbol class to
the common blocks; the special cases are its English abbreviations and emoticons kept
whole, and its contractions (`don't`, `dont`, `cannot`, `6am`).
"""

# ruff: noqa: RUF001, SIM905  (spaCy's punctuation and quote lists, as it writes them)

from __future__ import annotations

import re

_PUNCT = (
    "… …… , : ; \\! \\? ¿ ؟ ¡ \\( \\) \\[ \\] \\{ \\} < > _ # \\* & "
    "。 ？ ！ ， 、 ； ： ～ · । ، ۔ ؛ ٪"
)
_QUOTES = "\\' \" ” “ ` ‘ ´ ’ ‚ , „ » « 「 」 『 』 （ ） 〔 〕 【 】 《 》 〈 〉 〈 〉 ⟦ ⟧"
_CURRENCY = (
    "\\$ £ € ¥ ฿ US\\$ C\\$ A\\$ ₽ ﷼ ₴ ₠ ₡ ₢ ₣ ₤ ₥ ₦ ₧ ₨ ₩ ₪ ₫ ₭ ₮ ₯ ₰ ₱ ₲ ₳ ₵ ₶ ₷ ₸ ₹ ₺ ₻ ₼ ₾ ₿"
)
_UNITS = (
    "km km² km³ m m² m³ dm dm² dm³ cm cm² cm³ mm mm² mm³ ha µm nm yd in ft kg g mg µg t lb "
    "oz m/s km/h kmh mph hPa Pa mbar mb MB kb KB gb GB tb TB T G M K %"
)
_HYPHENS = "- – — -- --- —— ~"
# Letters (Latin, Greek, Cyrillic, Hebrew, Arabic, Devanagari, kana, CJK, Hangul), lower and
# upper case: spaCy's classes, narrowed.
_ALPHA = (
    "a-zA-ZªµºÀ-ÖØ-öø-ɏɐ-ʯͰ-ϿЀ-ԯ\u0590-\u05ff\u0600-\u06ff\u0900-\u097f"
    "\u1e00-\u1eff\u3040-\u30ff\u4e00-\u9fff\uac00-\ud7af"
)
_LOWER = "a-zß-öø-ÿ"
_UPPER = "A-ZÀ-ÖØ-Þ"
# Symbols spaCy splits off everywhere (its icons, Unicode category So): the common blocks.
_ICONS = "[¦©®°\u2190-\u21ff\u2300-\u23ff\u2500-\u27bf\u2b00-\u2bff\U0001f000-\U0001faff]"
_ELLIPSES = ["\\.\\.+", "…"]

# datatrove's PUNCTUATION_SET: a token of these characters only is a symbol, not a word.
PUNCTUATION = frozenset(
    "!/—”:％１〈&(、━\\【#%「」，】；+^]~“《„';’{|∶´[=-`*．（–？！：$～«〉,><》)?）。…@_.\"}►»"
    "？．﹗፧"
    + "".join(chr(x) for a, b in ((0, 9), (11, 13), (13, 32), (127, 160)) for x in range(a, b))
)


def _merge(chars: str) -> str:
    return "|".join(chars.split())


def _group(chars: str) -> str:
    return "".join(chars.split())


_PREFIXES = [
    "§",
    "%",
    "=",
    "—",
    "–",
    "\\+(?![0-9])",
    *_PUNCT.split(),
    *_ELLIPSES,
    *_QUOTES.split(),
    *_CURRENCY.split(),
    _ICONS,
]
_SUFFIXES = [
    *_PUNCT.split(),
    *_ELLIPSES,
    *_QUOTES.split(),
    _ICONS,
    "'s",
    "'S",
    "’s",
    "’S",
    "—",
    "–",
    "(?<=[0-9])\\+",
    "(?<=°[FfCcKk])\\.",
    f"(?<=[0-9])(?:{_merge(_CURRENCY)})",
    f"(?<=[0-9])(?:{_merge(_UNITS)})",
    f"(?<=[0-9{_LOWER}%²\\-\\+{_group(_PUNCT)}(?:{_group(_QUOTES)})])\\.",
    f"(?<=[{_UPPER}][{_UPPER}])\\.",
]
_INFIXES = [
    *_ELLIPSES,
    _ICONS,
    "(?<=[0-9])[+\\-\\*^](?=[0-9-])",
    f"(?<=[{_LOWER}{_group(_QUOTES)}])\\.(?=[{_UPPER}{_group(_QUOTES)}])",
    f"(?<=[{_ALPHA}]),(?=[{_ALPHA}])",
    f"(?<=[{_ALPHA}0-9])(?:{_merge(_HYPHENS)})(?=[{_ALPHA}])",  # English: after a digit too
    f"(?<=[{_ALPHA}0-9])[:<>=/](?=[{_ALPHA}])",
]
_PREFIX = re.compile("|".join("^" + p for p in _PREFIXES))
_SUFFIX = re.compile("|".join(p + "$" for p in _SUFFIXES))
_INFIX = re.compile("|".join(_INFIXES))
# spaCy's URL_MATCH, shortened: a scheme or a dotted host name with a lower-case top level.
_URL = re.compile(
    r"^(?:(?:[\w+\-.]{2,})://)?(?:\S+(?::\S*)?@)?"
    r"(?:(?:[A-Za-z0-9\u00a1-\uffff][A-Za-z0-9\u00a1-\uffff_-]{0,62})?[A-Za-z0-9\u00a1-\uffff]\.)+"
    r"[a-z\u00df-\u00f6\u00f8-\u00ff]{2,63}\.?(?::\d{2,5})?(?:[/?#]\S*)?$"
)
# Abbreviations spaCy's English special cases keep whole (with their period), and others.
_KEEP = frozenset(
    """Adm. Ak. Ala. Apr. Ariz. Ark. Aug. Bros. C++ Calif. Co. Colo. Conn. Corp. D.C. Dec.
    Del. Dr. E.G. E.g. Feb. Fla. Ga. Gen. Gov. I.E. I.e. Ia. Id. Ill. Inc. Ind. Jan. Jr. Jul.
    Jun. Kan. Kans. Ky. La. Ltd. Mar. Mass. Md. Messrs. Mich. Minn. Miss. Mo. Mont. Mr. Mrs.
    Ms. Mt. N.C. N.D. N.H. N.J. N.M. N.Y. Neb. Nebr. Nev. Nov. Oct. Okla. Ore. Pa. Ph.D.
    Prof. Rep. Rev. S.C. Sen. Sep. Sept. St. Tenn. Va. Wash. Wis. a.m. and/or co. e.g. i.e.
    p.m. v.s. vs. w/o ä. ö. ü. \\n \\t '' ’’ 'em 'bout 'cause 'nuff o'clock ma'am ol'
    ' ’ <3 ^_^ -_- o.O O.o o_o O_O (: ): (; (= =( =) =/ =[ =] [: [= ]= [-: :] :[ 8) 8-)
    :) :( :-) :-( ;) ;-) :D :P :/ :-/ :-] :-[ :-P :-D :-p :-| :| :> :O :o :3 :'( :')""".split()
) | frozenset(f"{c}." for c in "abcdefghijklmnopqrstuvwxyz")
# Contractions written without an apostrophe, split as spaCy's English special cases do
# (lower case; a capitalised first letter too): `dont` -> `do` `nt`, `cannot` -> `can` `not`.
_RUN_ON = {
    "".join(parts): parts
    for parts in (
        entry.split("|")
        for entry in (
            "ai|nt are|nt can|not ca|nt ca|nt|ve could|nt could|nt|ve could|ve dare|nt did|nt "
            "did|nt|ve does|nt does|nt|ve do|nt do|nt|ve gon|na got|ta had|nt had|nt|ve "
            "has|nt have|nt he|d he|d|ve he|ll|ve he|s how|d how|d|ve how|ll how|ll|ve how|re "
            "how|s how|ve i|d i|d|ve i|ll|ve i|m i|m|a is|nt it|d it|d|ve it|ll it|ll|ve i|ve "
            "may|nt may|nt|ve might|nt might|nt|ve might|ve must|nt must|nt|ve must|ve "
            "need|nt need|nt|ve not|ve ought|nt ought|nt|ve sha|nt sha|nt|ve she|d|ve "
            "she|ll|ve she|s should|nt should|nt|ve should|ve that|d that|d|ve that|ll "
            "that|ll|ve that|s there|d there|d|ve there|ll there|ll|ve there|re there|s "
            "there|ve these|d these|d|ve these|ll these|ll|ve these|re these|ve they|d "
            "they|d|ve they|ll they|ll|ve they|re they|ve this|d this|d|ve this|ll this|ll|ve "
            "this|s those|d those|d|ve those|ll those|ll|ve those|re those|ve was|nt we|d "
            "we|d|ve we|ll|ve were|nt we|ve what|d what|d|ve what|ll what|ll|ve what|re "
            "what|s what|ve when|d when|d|ve when|ll when|ll|ve when|re when|s when|ve "
            "where|d where|d|ve where|ll where|ll|ve where|re where|s where|ve who|d who|d|ve "
            "who|ll who|ll|ve who|s who|ve why|d why|d|ve why|ll why|ll|ve why|re why|s "
            "why|ve wo|nt wo|nt|ve would|nt would|nt|ve would|ve y|all you|d you|d|ve you|ll "
            "you|ll|ve you|re you|ve"
        ).split()
    )
}
_RUN_ON.update(
    {word.capitalize(): [parts[0].capitalize(), *parts[1:]] for word, parts in _RUN_ON.items()}
)
_TIME = re.compile(r"^(1[0-2]|[1-9])([ap]m)$")
# Contractions: `n't` and the clitics split off a word (`don't` -> `do` `n't`, `I'm` -> `I`
# `'m`, `can't` -> `ca` `n't`); times: `6am` -> `6` `am`.
_CLITIC = re.compile(r"^([^\W\d_]+?)((?:[nN]['’][tT])|['’](?:[sS]|[mM]|[dD]|ll|LL|re|RE|ve|VE))$")
_PLAIN = re.compile(r"^[^\W_]+$")  # nothing to split: letters and digits only


def _special(piece: str) -> list[str] | None:
    if piece in _KEEP:
        return [piece]
    parts = _RUN_ON.get(piece)
    if parts is not None:
        return parts
    match = _CLITIC.match(piece) or _TIME.match(piece)
    if match:
        return [match.group(1), match.group(2)]
    return None


def _split(piece: str, out: list[str]) -> None:
    """spaCy's Tokenizer._split_affixes and _attach_tokens for one whitespace-free piece."""
    prefixes: list[str] = []
    suffixes: list[str] = []
    special = _special(piece)
    while piece and special is None:
        size = len(piece)
        pre = _PREFIX.search(piece)
        pre_len = pre.end() if pre else 0
        if pre_len:
            rest = piece[pre_len:]
            found = _special(rest) if rest else None
            if found is not None:
                prefixes.append(piece[:pre_len])
                piece, special = rest, found
                break
        suf = _SUFFIX.search(piece[pre_len:])
        suf_len = len(suf.group()) if suf else 0
        if suf_len:
            rest = piece[:-suf_len]
            found = _special(rest) if rest else None
            if found is not None:
                suffixes.append(piece[-suf_len:])
                piece, special = rest, found
                break
        if pre_len and suf_len and pre_len + suf_len <= len(piece):
            prefixes.append(piece[:pre_len])
            suffixes.append(piece[-suf_len:])
            piece = piece[pre_len:-suf_len]
        elif pre_len:
            prefixes.append(piece[:pre_len])
            piece = piece[pre_len:]
        elif suf_len:
            suffixes.append(piece[-suf_len:])
            piece = piece[:-suf_len]
        if len(piece) == size:
            break
        special = _special(piece) if piece else None
    out.extend(prefixes)
    if special is not None:
        out.extend(special)
    elif piece:
        if _URL.match(piece):
            out.append(piece)
        else:
            start = 0
            for match in _INFIX.finditer(piece):
                if match.start() == start:
                    continue
                if match.start() > start:
                    out.append(piece[start : match.start()])
                if match.group():
                    out.append(match.group())
                start = match.end()
            if start < len(piece):
                out.append(piece[start:])
    out.extend(reversed(suffixes))


def _merge_specials(tokens: list[str], start: int) -> None:
    """spaCy matches special cases that span affixes afterwards (`):` split as `)` `:`)."""
    i = start
    while i < len(tokens) - 1:
        for width in (3, 2):
            if i + width <= len(tokens) and "".join(tokens[i : i + width]) in _KEEP:
                tokens[i : i + width] = ["".join(tokens[i : i + width])]
                break
        i += 1


def split_words(text: str) -> list[str]:
    """The tokens of `text` as spaCy's English tokenizer splits it (whitespace dropped)."""
    out: list[str] = []
    for piece in text.split():
        if _PLAIN.match(piece) and piece not in _RUN_ON and not _TIME.match(piece):
            out.append(piece)
        else:
            start = len(out)
            _split(piece, out)
            if len(out) - start > 1:
                _merge_specials(out, start)
    return out
