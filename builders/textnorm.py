"""Text normalisation shared by decontamination and near-duplicate detection: what two prompts that say the same
thing have in common after case, punctuation, numbers written as words, inflections and common synonyms are set
aside. Lexical only (no embedding model is available offline), so a paraphrase that changes most of the words is
out of its reach.

>>> from builders.textnorm import content_words, normal_text
>>> content_words("David has three sisters. How many brothers does David have?")
['david', '3', 'sister', 'brother', 'david']
>>> content_words("Create a C++ program that uses recursion") == content_words("Write a C++ program using recursion")
True
>>> normal_text("  What's   the Answer?! ")
'what s the answer'
"""

from __future__ import annotations

import re
import unicodedata

# a word: a run of letters or digits in any script; CJK characters (written without spaces) one by one
_WORD = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]|[^\W_]+")

_UNITS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen"
).split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
_ORDINALS = (
    "zeroth first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth thirteenth "
    "fourteenth fifteenth sixteenth seventeenth eighteenth nineteenth twentieth"
).split()
NUMBER_WORDS: dict[str, int] = {w: i for i, w in enumerate(_UNITS)}
NUMBER_WORDS.update({w: 20 + 10 * i for i, w in enumerate(_TENS)})
# "second" is also a unit of time and "first" an adverb; as ordinals they read the same as 1st/2nd, which is what a
# paraphrase changes ("the 14th century" / "the fourteenth century")
ORDINAL_WORDS: dict[str, int] = {w: i for i, w in enumerate(_ORDINALS)}
_SCALES = {"hundred": 100, "thousand": 1000, "million": 1_000_000}
_ORDINAL_SUFFIX = re.compile(r"^(\d+)(st|nd|rd|th)$")

# Function words: they carry no topic. Negations are kept (they change the question).
STOPWORDS = frozenset(
    """a an the and or but if then so of to in on at by for with from into onto about as than that this these those
    there here is are was were be been being am do does did doing done have has had having i me my mine we us our you
    your yours he him his she her it its they them their what which who whom whose when where why how can could
    would should shall will may might must s t d ll re ve m just also very too some any each every all both other
    such only own same more most much many few up down out over under again further once while during before after
    above below between through off per via etc e g ie eg let lets please kindly""".split()
)

# Groups of words a light paraphrase swaps for one another; each maps to the group's first word. Instruction verbs
# are merged broadly (write/compose/create/develop/implement...): they say how to answer, not what about.
SYNONYMS: tuple[tuple[str, ...], ...] = (
    (
        "write",
        "compose",
        "draft",
        "create",
        "craft",
        "generate",
        "produce",
        "develop",
        "implement",
        "build",
        "built",
        "construct",
        "make",
        "made",
        "design",
        "wrote",
        "written",
        "pen",
        "code",
    ),
    ("explain", "describe", "clarify", "elaborate", "outline", "illustrate", "detail"),
    ("list", "enumerate", "name"),
    ("give", "provide", "offer", "share", "suggest", "recommend", "propose", "proposing"),
    ("tell", "say", "state"),
    ("summary", "summarize", "summarise", "summarization", "recap"),
    ("help", "assist", "aid"),
    ("use", "utilize", "utilise", "employ", "using"),
    ("find", "locate", "determine", "identify", "compute", "calculate"),
    ("show", "display", "present", "demonstrate"),
    ("main", "primary", "key", "major", "principal", "chief", "core", "central"),
    ("important", "significant", "crucial", "essential", "vital"),
    ("difference", "distinction", "contrast", "differ"),
    ("way", "method", "approach", "technique", "means", "strategy", "tactic"),
    ("big", "large", "huge", "enormous"),
    ("small", "little", "tiny"),
    ("fast", "quick", "rapid", "speedy"),
    ("begin", "start", "commence", "beginning"),
    ("end", "finish", "conclude"),
    ("improve", "enhance", "boost", "better"),
    ("increase", "raise", "grow"),
    ("decrease", "reduce", "lower", "cut"),
    ("child", "children", "kid", "kids"),
    ("people", "person", "persons", "individual", "individuals"),
    ("buy", "purchase", "bought"),
    ("answer", "reply", "respond", "response"),
    ("question", "query", "queries"),
    ("example", "instance", "sample"),
    ("movie", "film", "picture"),
    ("documentary", "documentaries"),
    ("happen", "occur", "occurred", "happened"),
    ("search", "seek", "look", "hunt"),
    ("famous", "renowned", "celebrated", "wellknown"),
    ("think", "thought", "believe", "consider"),
    ("find", "found"),
    ("learn", "study", "studies"),
    ("contain", "hold", "include", "comprise"),
    ("father", "dad"),
    ("mother", "mom", "mum"),
    ("car", "automobile", "vehicle"),
    ("job", "work", "occupation", "employment"),
    ("kind", "type", "sort"),
    ("choose", "select", "pick"),
    ("correct", "fix", "repair"),
    ("email", "mail", "e-mail"),
    ("tip", "advice", "hint", "suggestion"),
    ("essay", "article"),
)


def stem(word: str) -> str:
    """A light suffix stripper (plural, -ing, -ed, -ly, -ies): enough to match inflections, never a dictionary."""
    if len(word) <= 3 or word.isdigit():
        return word
    for suffix, repl, min_len in (
        ("ational", "ate", 8),
        ("ization", "ize", 8),
        ("isation", "ize", 8),
        ("ness", "", 6),
        ("ments", "ment", 7),
        ("ies", "y", 5),
        ("sses", "ss", 5),
        ("ises", "ize", 6),
        ("ised", "ize", 6),
        ("ising", "ize", 7),
        ("izes", "ize", 6),
        ("ized", "ize", 6),
        ("izing", "ize", 7),
        ("ing", "", 6),
        ("ied", "y", 5),
        ("ed", "", 5),
        ("ly", "", 5),
        ("es", "", 5),
        ("s", "", 4),
    ):
        if word.endswith(suffix) and len(word) >= min_len:
            if suffix == "s" and word.endswith(("ss", "us", "is")):
                return word
            if suffix == "es" and not word.endswith(("ches", "shes", "xes", "zes", "sses", "oes")):
                return word[:-1]  # "languages" -> "language", "boxes" -> "box"
            out = word[: len(word) - len(suffix)] + repl
            if suffix in ("ing", "ed") and len(out) > 2 and out[-1] == out[-2] and out[-1] not in "lsz":
                out = out[:-1]  # "running" -> "run"
            return out
    return word


_CANON: dict[str, str] = {}
for _group in SYNONYMS:
    for _w in _group:
        _CANON.setdefault(_w, _group[0])
        _CANON.setdefault(stem(_w), _group[0])


def canonical(word: str) -> str:
    """A content word's form for matching: its synonym group's head, else its light stem."""
    if word in _CANON:
        return _CANON[word]
    s = stem(word)
    return _CANON.get(s, s)


def normal_text(text: str) -> str:
    """Case-, punctuation- and whitespace-insensitive text (NFKC, lowercase, numbers as digits, words joined by one
    space)."""
    return " ".join(words(text))


def _numbers(words: list[str]) -> list[str]:
    """Spelled-out numbers as digits ("twenty five" -> "25", "fourteenth" -> "14", "14th" -> "14")."""
    out: list[str] = []
    value: int | None = None
    for w in words:
        m = _ORDINAL_SUFFIX.match(w)
        if m:
            w = m.group(1)
        if w in NUMBER_WORDS:
            value = (value or 0) + NUMBER_WORDS[w]
            continue
        if w in _SCALES and value is not None:
            value *= _SCALES[w]
            continue
        if w in ORDINAL_WORDS and w not in ("second", "first"):
            out.append(str((value or 0) + ORDINAL_WORDS[w]))
            value = None
            continue
        if value is not None:
            out.append(str(value))
            value = None
        out.append(w)
    if value is not None:
        out.append(str(value))
    return out


def words(text: str) -> list[str]:
    """Every word of the normal text, numbers as digits (stop words kept): what shingles are made of."""
    text = unicodedata.normalize("NFKC", text).lower().replace("\u2019", "'")
    text = re.sub(r"n't\b", " not", text)
    text = re.sub(r"(?<=[a-z])-(?=[a-z])", " ", text)  # "step-by-step" reads as "step by step"
    return _numbers(_WORD.findall(text))


def content_words(text: str) -> list[str]:
    """The words that carry a prompt's topic, in order: no stop words, numbers as digits, inflections stripped,
    synonyms merged."""
    return [canonical(w) for w in words(text) if w not in STOPWORDS]
