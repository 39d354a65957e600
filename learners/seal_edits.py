"""SEAL self-edits: the prompt templates of each format and the parsing of a self-edit into training sequences.

A self-edit is what the model writes about a passage (its "implications", a few rewrites, or question/answer
pairs). As in SEAL, it becomes training data as one sequence per non-empty line, plus the passage itself.
Model output is often malformed (numbering, bullets, headers, a line repeated, one very long line, or
garbage): :func:`parse_self_edit` cleans it so that only usable lines are trained on.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping

__all__ = [
    "DEFAULT_TEMPLATES",
    "SELF_EDIT_FORMATS",
    "check_template",
    "format_prompt",
    "parse_self_edit",
    "passage_text",
    "training_sequences",
]

SELF_EDIT_FORMATS = ("implications", "rewrite", "self-qa")

DEFAULT_TEMPLATES: dict[str, str] = {
    "implications": (
        "Read the following passage and list the implications that follow from it, directly or indirectly. "
        "Write each implication as one complete, self-contained sentence on its own line. Name people, places, "
        "numbers and dates explicitly.\n\nPassage:\n{passage}\n\nImplications:"
    ),
    "rewrite": (
        "Read the following passage and rewrite it in several different ways. Write each rewrite on its own "
        "line, keep every fact, name and number.\n\nPassage:\n{passage}\n\nRewrites:"
    ),
    "self-qa": (
        "Read the following passage and write question-answer pairs that cover every fact in it. Write each "
        "pair as \"Question: ...\" on one line and \"Answer: ...\" on the next; each question must make sense "
        "without the passage.\n\nPassage:\n{passage}\n\nQuestions and answers:"
    ),
}
"""Prompt of each format; ``{passage}`` is the document (its title on the first line), ``{title}`` the title."""

_FIELDS = {"passage", "title"}
# A list marker: bullets, "1.", "(2)", "3)", "a)", "Implication 4:", "#", ">" ... possibly repeated ("- 1. ").
_MARKER = re.compile(
    r"^(?:[-*\u2022\u00b7\u2013\u2014+>#]+|\(?\d{1,3}[.):\]]|\(?[a-zA-Z][.)](?=\s)|\[\d{1,3}\]"
    r"|(?:implication|rewrite|fact|point|statement|note)\s*\d{0,3}\s*[:.)\-])\s*",
    re.IGNORECASE,
)
_HEADER = re.compile(r"^(?:implications?|rewrites?|questions?(?: and answers)?|answers?|passage|summary|notes?)\s*:?$",
                     re.IGNORECASE)
_QUESTION = re.compile(r"^(?:q(?:uestion)?\s*\d{0,3}\s*[:.)])\s*", re.IGNORECASE)
_ANSWER = re.compile(r"^(?:a(?:nswer)?\s*\d{0,3}\s*[:.)])\s*", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_PRINTABLE = set(string.printable)


def check_template(template: str, fmt: str = "") -> str:
    """Return ``template`` if it formats with ``{passage}`` (and optionally ``{title}``); else raise ``ValueError``."""
    where = f"template for {fmt!r}" if fmt else "template"
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise ValueError(f"{where}: not a format string ({exc}); write literal braces as {{{{ and }}}}") from None
    unknown = names - _FIELDS
    if unknown:
        raise ValueError(f"{where}: unknown placeholder(s) {sorted(unknown)}; use {{passage}} and {{title}}")
    if "passage" not in names:
        raise ValueError(f"{where}: must contain {{passage}}")
    return template


def passage_text(text: str, title: str | None = None) -> str:
    """The passage as SEAL trains on it: the title on the first line (when there is one), then the text."""
    text = text.strip()
    return f"{title.strip()}\n{text}" if title and title.strip() else text


def format_prompt(
    fmt: str, text: str, title: str | None = None, templates: Mapping[str, str] | None = None
) -> list[dict[str, str]]:
    """The chat prompt asking for a self-edit of ``fmt`` about the document (``templates`` override defaults)."""
    template = (templates or {}).get(fmt) or DEFAULT_TEMPLATES.get(fmt)
    if template is None:
        raise ValueError(f"unknown self-edit format {fmt!r}; use one of {', '.join(SELF_EDIT_FORMATS)}")
    content = check_template(template, fmt).format(passage=passage_text(text, title), title=(title or "").strip())
    return [{"role": "user", "content": content}]


def _key(line: str) -> str:
    return " ".join(re.sub(r"[^0-9a-z ]", " ", line.lower()).split())


def _strip_markers(line: str) -> str:
    line = line.strip()
    for _ in range(4):  # "- 1. **Implication 2:** text"
        line = line.strip("*_` \t")
        stripped = _MARKER.sub("", line, count=1)
        if stripped == line:
            break
        line = stripped
    return line.strip("*_` \t")


def _drop_repeated_sentences(line: str) -> str:
    """A line that loops ("X. X. X.") keeps each sentence once."""
    sentences = _SENTENCE_END.split(line)
    if len(sentences) < 2:
        return line
    seen: set[str] = set()
    kept = []
    for sentence in sentences:
        key = _key(sentence)
        if key and key not in seen:
            seen.add(key)
            kept.append(sentence)
    return " ".join(kept)


def _split_long(line: str, max_chars: int) -> list[str]:
    """Cut a too-long line at sentence ends, then at word boundaries, into pieces of at most ``max_chars``."""
    if len(line) <= max_chars:
        return [line]
    pieces: list[str] = []
    current = ""
    for sentence in _SENTENCE_END.split(line):
        while len(sentence) > max_chars:  # no sentence end in reach: cut at the last space (or hard)
            cut = sentence.rfind(" ", 0, max_chars + 1)
            cut = cut if cut > max_chars // 2 else max_chars
            if current:
                pieces.append(current)
                current = ""
            pieces.append(sentence[:cut].strip())
            sentence = sentence[cut:].strip()
        if current and len(current) + 1 + len(sentence) > max_chars:
            pieces.append(current)
            current = sentence
        else:
            current = f"{current} {sentence}".strip()
    if current:
        pieces.append(current)
    return [p for p in pieces if p]


def _looks_like_text(line: str, min_chars: int) -> bool:
    if len(line) < min_chars or _HEADER.match(line):
        return False
    letters = sum(c.isalpha() for c in line)
    if letters < max(3, len(line) // 4):  # digits/punctuation soup
        return False
    if sum(c in _PRINTABLE for c in line) < 0.8 * len(line):  # mostly non-ASCII bytes
        return False
    words = line.split()
    return len(words) >= 2 and len(set(words)) >= min(2, len(words))


def _pair_questions(lines: list[str]) -> list[str]:
    """self-qa: join a question line with the answer line after it into one "Question: ... Answer: ..." line."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        q = _QUESTION.match(line)
        if q and i + 1 < len(lines) and _ANSWER.match(lines[i + 1]):
            answer = _ANSWER.sub("", lines[i + 1], count=1).strip()
            out.append(f"Question: {line[q.end():].strip()} Answer: {answer}")
            i += 2
            continue
        out.append(line)
        i += 1
    return out


def parse_self_edit(
    text: str,
    fmt: str = "implications",
    *,
    passage: str | None = None,
    max_lines: int = 32,
    max_line_chars: int = 400,
    min_line_chars: int = 12,
) -> list[str]:
    """The usable lines of a self-edit, one training sequence each.

    Splits on newlines; strips list markers (bullets, ``1.``, ``(2)``, ``Implication 3:``), markdown emphasis
    and control characters; keeps each sentence of a looping line once; drops headers ("Implications:"),
    lines shorter than ``min_line_chars`` or without two distinct words of mostly letters, and lines that
    repeat an earlier one or the passage (compared after normalisation); cuts lines longer than
    ``max_line_chars`` at sentence ends (then word boundaries); keeps at most ``max_lines``. For ``self-qa``
    a ``Question:`` line and the ``Answer:`` line after it become one sequence. Never raises on model
    output: garbage gives ``[]``.
    """
    if fmt not in SELF_EDIT_FORMATS:
        raise ValueError(f"unknown self-edit format {fmt!r}; use one of {', '.join(SELF_EDIT_FORMATS)}")
    if not text:
        return []
    raw = [_CONTROL.sub(" ", line) for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    lines = [_strip_markers(line) for line in raw]
    lines = [" ".join(line.split()) for line in lines if line.strip()]
    if fmt == "self-qa":
        lines = _pair_questions(lines)
    seen = {_key(passage)} if passage else set()
    out: list[str] = []
    for line in lines:
        for piece in _split_long(_drop_repeated_sentences(line), max_line_chars):
            key = _key(piece)
            if not key or key in seen or not _looks_like_text(piece, min_line_chars):
                continue
            seen.add(key)
            out.append(piece)
            if len(out) >= max_lines:
                return out
    return out


def training_sequences(lines: list[str], passage: str | None, *, include_passage: bool = True) -> list[str]:
    """The sequences one self-edit trains on: its lines, plus the passage (SEAL's default)."""
    out = list(lines)
    if include_passage and passage and passage.strip():
        out.append(passage.strip())
    return out
