"""Fidelity check: a rewrite must keep every path, number, quoted string and code token of its input."""

import re

# Markdown list markers and headers are formatting, not content: their numbers need not survive.
_FORMATTING = re.compile(r"^\s*(?:#{1,6}\s+|[-*+]\s+|\d+[.)]\s+)", re.MULTILINE)
_PROTECTED = [
    re.compile(r"`([^`\n]+)`"),  # inline code
    re.compile(r"'([^'\n]{1,80})'|\"([^\"\n]{1,80})\""),  # quoted strings (error messages, keys)
    re.compile(r"(?:[\w.~-]+/)+[\w.-]+"),  # paths and URLs parts
    re.compile(r"\b[\w-]+\.[A-Za-z]{1,5}\b"),  # file names
    re.compile(r"\b\w*_\w*\b"),  # snake_case, dunder names
    re.compile(r"\b[a-z]+[A-Z]\w*|\b[A-Z][a-z0-9]+[A-Z]\w*"),  # camelCase, PascalCase (KeyError)
    re.compile(r"\b\w+\(\)"),  # calls
    re.compile(r"(?<![\w.])-{1,2}[a-z][\w-]*"),  # command-line flags
    re.compile(r"\d+(?:[.:]\d+)*"),  # numbers, versions, times
]


def protected_tokens(text: str) -> list[str]:
    """Tokens of `text` that a spoken rewrite must reproduce exactly, in first-seen order."""
    content = _FORMATTING.sub("", text)
    tokens: dict[str, None] = {}
    for pattern in _PROTECTED:
        for match in pattern.finditer(content):
            token = next((g for g in match.groups() if g), match.group(0)) if match.groups() else match.group(0)
            if token.strip("_"):
                tokens[token] = None
    return list(tokens)


def lost_tokens(original: str, spoken: str) -> list[str]:
    """Protected tokens of `original` missing from `spoken` (empty list: the rewrite is faithful)."""
    return [t for t in protected_tokens(original) if t not in spoken]
