"""Toy tasks of the miniature, generated deterministically from a seed with a vocabulary of a few hundred words.

Three tasks, each with a train split and a held-out split that share no record (held-out records are
unseen combinations of seen parts, so a tiny model can generalise to them):
  - tool calls: a coding instruction (one of several phrasings) -> exactly one call of one of the TOOLS (the
    prompt lists TOOLS_PER_PROMPT schemas: the expected one and seeded distractors, to keep prompts short);
  - transcription: short English sentences to be spoken and written back;
  - spoken questions: a question (arithmetic on number words, or a fact) with a one-or-two-word answer.
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from typing import Any


def _tool(name: str, description: str, *params: str) -> dict[str, Any]:
    """One OpenAI function schema with required string parameters (kept short: the schemas are in every prompt)."""
    properties = {p: {"type": "string"} for p in params}
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": properties, "required": list(params)},
        },
    }


TOOLS: list[dict[str, Any]] = [
    _tool("read_file", "Read a file", "path"),
    _tool("run_tests", "Run tests", "path"),
    _tool("search_code", "Search the code", "query"),
    _tool("rename_symbol", "Rename a function", "old", "new"),
    _tool("delete_file", "Delete a file", "path"),
]

TOOLS_PER_PROMPT = 2  # all five schemas would make ~90% of every prompt a constant ~275-token prefix

DIRS = ["src", "lib", "app", "core", "utils", "api"]
MODULES = ["parser", "server", "client", "config", "models", "cache", "router", "logger", "views", "auth"]
WORDS = ["token", "user", "error", "buffer", "stream", "socket", "queue", "worker", "timeout", "session"]
VERBS = ["get", "load", "save", "parse", "send", "read", "build", "check"]

TEMPLATES: dict[str, list[str]] = {
    "read_file": [
        "Open {path} and show it to me.",
        "What is inside {path}?",
        "Please read the file {path}.",
        "Show me the contents of {path}.",
    ],
    "run_tests": [
        "Run the tests in {path}.",
        "Please check that {path} passes.",
        "Can you run {path} for me?",
        "Execute the test file {path}.",
    ],
    "search_code": [
        "Find where {query} is used.",
        "Search the code for {query}.",
        "Where do we mention {query}?",
        "Look for {query} in the project.",
    ],
    "rename_symbol": [
        "Rename {old} to {new}.",
        "Please change the name {old} into {new}.",
        "Give {old} the new name {new}.",
        "Replace {old} with {new} everywhere.",
    ],
    "delete_file": [
        "Delete {path}.",
        "Remove the file {path} please.",
        "We no longer need {path}, delete it.",
        "Get rid of {path}.",
    ],
}


def _arguments(tool: str) -> list[dict[str, str]]:
    """Every argument assignment of `tool` in the task's vocabulary (sorted, so the order is fixed). Identifiers
    are single words: with `verb_word` compounds the 4-layer model, in the demo's budget, copied the verb but
    answered one fixed `_word` suffix (search 1/35, rename 2/16 held-out exact)."""
    if tool == "read_file" or tool == "delete_file":
        return [{"path": f"{d}/{m}.py"} for d in DIRS for m in MODULES]
    if tool == "run_tests":
        return [{"path": f"tests/{m}.py"} for m in MODULES] + [{"path": f"{d}/tests"} for d in DIRS]
    if tool == "search_code":
        return [{"query": w} for w in WORDS + VERBS]
    if tool == "rename_symbol":
        return [{"old": a, "new": b} for a, b in itertools.permutations(WORDS, 2)]
    raise KeyError(tool)


# Tools whose held-out split may hold whole argument values never used in training: each of their values is made
# of parts that other training values put in the same place. A search query is one word: holding one out would
# ask for a word the model never wrote there, so search_code holds out (phrasing, value) pairs only.
WHOLE_VALUES_HELD_OUT = ("read_file", "run_tests", "rename_symbol", "delete_file")


@dataclass(frozen=True)
class Split:
    """Records of one task: `train` and `heldout`, disjoint by construction."""

    train: list[dict[str, Any]]
    heldout: list[dict[str, Any]]


def _heldout_part(key: str, seed: int, fraction: float) -> bool:
    """A stable, seeded coin for `key`: the same key lands in the same split for a given seed."""
    return random.Random(f"{seed}:{key}").random() < fraction


def tool_call_tasks(seed: int = 0, n_train: int = 2000, n_heldout: int = 200) -> Split:
    """Instructions -> one tool call. Held out: (template, argument) pairs and whole argument values never
    used in training (a held-out path is a seen directory with a seen module, in a combination not seen; see
    WHOLE_VALUES_HELD_OUT)."""
    rng = random.Random(seed)
    pools: dict[str, dict[str, list[tuple[int, dict[str, str]]]]] = {"train": {}, "heldout": {}}
    for tool, templates in TEMPLATES.items():
        for split in pools.values():
            split[tool] = []
        whole = tool in WHOLE_VALUES_HELD_OUT
        pair_fraction = 0.05 if whole else 0.25  # single-word values: more held-out pairs instead
        for args in _arguments(tool):
            key = json.dumps(args, sort_keys=True)
            value_out = whole and _heldout_part(f"{tool}:{key}", seed, 0.15)
            for t in range(len(templates)):
                held = value_out or _heldout_part(f"{tool}:{t}:{key}", seed, pair_fraction)
                pools["heldout" if held else "train"][tool].append((t, args))
    tools = list(TEMPLATES)
    # Tools are drawn uniformly (their argument pools differ in size by 9x); held-out records without repeats,
    # interleaved tool by tool so that any prefix of the held-out split (a benchmark's first N) covers every tool.
    per_tool = [
        [
            (tool, *entry)
            for entry in rng.sample(pools["heldout"][tool], min(n_heldout // len(tools), len(pools["heldout"][tool])))
        ]
        for tool in tools
    ]
    chosen = {
        "train": [(tool, *rng.choice(pools["train"][tool])) for tool in rng.choices(tools, k=n_train)],
        "heldout": [r for row in itertools.zip_longest(*per_tool) for r in row if r is not None],
    }
    return Split(*(_tool_records(split, chosen[split], rng) for split in ("train", "heldout")))


def _prompt_tools(tool: str, rng: random.Random) -> list[dict[str, Any]]:
    """The expected tool and TOOLS_PER_PROMPT - 1 distractors drawn by `rng`, in TOOLS order."""
    names = [t["function"]["name"] for t in TOOLS]
    picked = {tool, *rng.sample([n for n in names if n != tool], TOOLS_PER_PROMPT - 1)}
    return [t for t in TOOLS if t["function"]["name"] in picked]


def _tool_records(
    split: str, chosen: list[tuple[str, int, dict[str, str]]], rng: random.Random
) -> list[dict[str, Any]]:
    return [
        {
            "id": f"tool-{split}-{i:05d}",
            "instruction": TEMPLATES[tool][t].format(**args),
            "tools": _prompt_tools(tool, rng),
            "answer": {"name": tool, "arguments": dict(args)},
        }
        for i, (tool, t, args) in enumerate(chosen)
    ]


def tool_call_chat(record: dict[str, Any], call_id: str = "call_0") -> dict[str, Any]:
    """A tool-call record as an OpenAI chat (user instruction, assistant tool call) with its tools."""
    call = {
        "id": call_id,
        "type": "function",
        "function": {"name": record["answer"]["name"], "arguments": json.dumps(record["answer"]["arguments"])},
    }
    return {
        "messages": [
            {"role": "user", "content": record["instruction"]},
            {"role": "assistant", "content": None, "tool_calls": [call]},
        ],
        "tools": record["tools"],
    }


SUBJECTS = ["the cat", "the dog", "my friend", "the teacher", "a child", "the doctor", "her mother", "the farmer"]
SENTENCE_VERBS = ["sees", "finds", "likes", "paints", "carries", "opens", "washes", "sells"]
OBJECTS = ["a red ball", "the green door", "a small box", "the old car", "a big apple", "the blue cup", "a warm coat"]
PLACES = ["in the garden", "at home", "near the river", "after lunch", "every morning", "on the table"]


def transcription_tasks(seed: int = 0, n_train: int = 600, n_heldout: int = 40) -> Split:
    """Short sentences (subject verb object [place]); held out: whole sentences never used in training."""
    rng = random.Random(seed + 1)
    sentences = [
        " ".join([s, v, o] + ([p] if p else [])).capitalize() + "."
        for s, v, o, p in itertools.product(SUBJECTS, SENTENCE_VERBS, OBJECTS, [None, *PLACES])
    ]
    rng.shuffle(sentences)
    heldout, train = sentences[:n_heldout], sentences[n_heldout:]
    train = rng.sample(train, min(n_train, len(train)))
    as_records = lambda split, texts: [  # noqa: E731
        {"id": f"asr-{split}-{i:05d}", "text": t} for i, t in enumerate(texts)
    ]
    return Split(as_records("train", train), as_records("heldout", heldout))


NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
NUMBERS += ["eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen"]
FACTS = {
    "What color is the sky?": "Blue.",
    "What color is grass?": "Green.",
    "What animal says meow?": "A cat.",
    "What animal barks?": "A dog.",
    "How many legs does a spider have?": "Eight.",
    "How many days are in a week?": "Seven.",
    "What do bees make?": "Honey.",
    "What is frozen water called?": "Ice.",
    "Which star gives us light by day?": "The sun.",
    "What do we drink when we are thirsty?": "Water.",
}


def spoken_qa_tasks(seed: int = 0, n_heldout: int = 20) -> Split:
    """Questions with short answers: 'What is A plus B?' over number words, and FACTS (all in train).
    Held out: arithmetic pairs never seen in training."""
    rng = random.Random(seed + 2)
    sums = [(a, b) for a in range(10) for b in range(10)]
    rng.shuffle(sums)
    held, train_sums = sums[:n_heldout], sums[n_heldout:]

    def qa(split: str, pairs: list[tuple[int, int]], facts: dict[str, str]) -> list[dict[str, str]]:
        items = [(f"What is {NUMBERS[a]} plus {NUMBERS[b]}?", NUMBERS[a + b].capitalize() + ".") for a, b in pairs]
        items += list(facts.items())
        return [{"id": f"qa-{split}-{i:05d}", "question": q, "answer": a} for i, (q, a) in enumerate(items)]

    return Split(qa("train", train_sums, FACTS), qa("heldout", held, {}))


def vocabulary() -> set[str]:
    """Every word the three tasks use (lower case, punctuation stripped): the size check of the docstring."""
    words: set[str] = set()
    texts = [t for ts in TEMPLATES.values() for t in ts] + SUBJECTS + SENTENCE_VERBS + OBJECTS + PLACES
    texts += NUMBERS + list(FACTS) + list(FACTS.values()) + DIRS + MODULES + WORDS + VERBS
    for text in texts:
        words.update(w.strip(".,?{}").lower() for w in text.split())
    return {w for w in words if w}


CODE_TEMPLATES = [
    "def {verb}_{word}(path):\n    return {verb}(path)\n",
    "from {dir}.{module} import {verb}_{word}\n",
    "class {Module}:\n    def {verb}(self, {word}):\n        return self.{word}\n",
    "def test_{verb}_{word}():\n    assert {verb}_{word}('{dir}/{module}.py')\n",
    "import {module}\n\n{word} = {module}.{verb}('{dir}')\n",
]


def base_corpus(seed: int = 0, n_sentences: int = 500, n_code: int = 500) -> list[str]:
    """The common base's pretraining documents: English sentences (train sentences only, never held-out
    ones) and short Python snippets over the coding vocabulary, shuffled."""
    rng = random.Random(seed + 3)
    sentences = [r["text"] for r in transcription_tasks(seed).train]
    qa = spoken_qa_tasks(seed).train
    docs = rng.sample(sentences, min(n_sentences, len(sentences)))
    docs += [f"{r['question']} {r['answer']}" for r in qa]
    for _ in range(n_code):
        module = rng.choice(MODULES)
        fields = {"verb": rng.choice(VERBS), "word": rng.choice(WORDS), "dir": rng.choice(DIRS), "module": module}
        docs.append(rng.choice(CODE_TEMPLATES).format(Module=module.capitalize(), **fields))
    rng.shuffle(docs)
    return docs
