"""Offline verbalizability rules (paper section 5.2): classify a user message and make it speakable.

NO: directory trees, multi-line code, diffs, stack traces, markup-heavy text, long paths, non-English.
REWRITE: only syntactic formatting must go (markdown, bullets, extra whitespace, emoji); lists become prose.
DIRECT: already speakable. Code tokens, paths, numbers and quoted error messages are never altered.
"""

import re

_NOT_SPEAKABLE = {
    "code block": re.compile(r"```|~~~"),
    "diff": re.compile(r"^(?:\+\+\+ |--- |@@ .* @@|diff --git )", re.MULTILINE),
    "stack trace": re.compile(
        r"Traceback \(most recent call last\)|^\s+File \".*\", line \d+|^\s+at [\w.$<>]+\(.*\)$", re.MULTILINE
    ),
    "directory tree": re.compile(r"[├└│]──|^\s*[|`]-- ", re.MULTILINE),
    "markup": re.compile(r"(?:<(/?)[a-zA-Z][\w-]*(?:\s[^<>]*)?>.*?){4,}", re.DOTALL),
    "long path": re.compile(r"(?:[\w.~-]+/){5,}[\w.-]+|[\w./~-]{61,}"),
}
_CODE_LINE = re.compile(r"^(?: {4}|\t)\S|[;{}]\s*$|^\s*(?:def|class|import|from|return|const|let|var|fn)\b")
_EMOJI = re.compile("[\U0001f000-\U0001faff\u2600-\u27bf\u2b50\u2b55\ufe0f\u200d]")
_ENGLISH = set(
    "the a an to of and in is it for on with this that be are not can please i you we my our me "
    "fix add make why how what when should does do but so if from by at as or use".split()
)
_LIST_ITEM = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+(.*)$")
_HEADER = re.compile(r"^\s*#{1,6}\s+")
_ORDINALS = ["First", "Second", "Third", "Fourth", "Fifth", "Sixth", "Seventh", "Eighth", "Ninth", "Tenth"]


def unspeakable_reason(text: str) -> str | None:
    """Why `text` cannot be spoken faithfully (a short label), or None when it can."""
    for label, pattern in _NOT_SPEAKABLE.items():
        if pattern.search(text):
            return label
    if sum(bool(_CODE_LINE.search(line)) for line in text.splitlines()) >= 2:
        return "multi-line code"
    letters = [c for c in text if c.isalpha()]
    if letters and sum(not c.isascii() for c in letters) / len(letters) > 0.1:
        return "non-English"
    words = re.findall(r"[A-Za-z']+", text.lower())
    if len(words) >= 6 and sum(w in _ENGLISH for w in words) / len(words) < 0.12:
        return "non-English"
    return None


def needs_rewrite(text: str) -> bool:
    """True when `text` carries formatting a listener cannot hear (markdown, lists, emoji, odd spacing)."""
    return bool(
        _EMOJI.search(text)
        or "\n" in text.strip()
        or re.search(r"\*\*|`|\[[^\]]+\]\([^)]+\)|\s{2,}", text.strip())
        or re.search(r"(?<!\w)\*\S", text)
    )


def _sentence(text: str) -> str:
    text = text.strip()
    return text if not text or text[-1] in ".!?:;" else text + "."


def _inline(text: str) -> str:
    text = _EMOJI.sub("", text)
    text = re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r"\1 (\2)", text)
    text = re.sub(r"\*\*(.+?)\*\*", r"\1", text)
    text = re.sub(r"(?<![\w*])\*(\S(?:.*?\S)?)\*(?![\w*])", r"\1", text)
    text = re.sub(r"`([^`]+)`", r"\1", text)
    return re.sub(r"\s+", " ", text).strip()


def rewrite(text: str) -> str:
    """Speakable prose: formatting stripped, list items joined as 'First, ... Second, ...' sentences."""
    sentences: list[str] = []
    items: list[str] = []

    def flush_items() -> None:
        for i, item in enumerate(items):
            ordinal = _ORDINALS[i] if i < len(_ORDINALS) else "Next"
            if i == len(items) - 1 and i > 0:
                ordinal = "Finally"
            sentences.append(f"{ordinal}, {_sentence(item)}")
        items.clear()

    for line in text.splitlines():
        item = _LIST_ITEM.match(line)
        if item:
            items.append(_inline(item.group(1)))
            continue
        flush_items()
        line = _inline(_HEADER.sub("", line))
        if line:
            sentences.append(_sentence(line))
    flush_items()
    return " ".join(s for s in sentences if s)


def classify(text: str) -> tuple[str, str]:
    """(decision, spoken text): ('NO', ''), ('DIRECT', text) or ('REWRITE', rewrite(text))."""
    if unspeakable_reason(text):
        return "NO", ""
    if needs_rewrite(text):
        spoken = rewrite(text)
        return ("REWRITE", spoken) if spoken else ("NO", "")
    return "DIRECT", text
