"""The miniature's toy tasks: deterministic per seed, held-out splits disjoint from training, small vocabulary."""

from __future__ import annotations

import json
import re

from megatron_ext.data.chat import ChatEncoder, load_tokenizer
from megatron_ext.miniature.tasks import (
    TOOLS,
    TOOLS_PER_PROMPT,
    spoken_qa_tasks,
    tool_call_chat,
    tool_call_tasks,
    transcription_tasks,
    vocabulary,
)
from megatron_ext.tokenizer.tekken_builder import build_tekken, devstral_spec, write_tekken

GENERATORS = (tool_call_tasks, transcription_tasks, spoken_qa_tasks)


def test_same_seed_same_records_other_seed_other_records() -> None:
    for make in GENERATORS:
        assert make(seed=3) == make(seed=3)
        assert make(seed=3).train != make(seed=4).train, make.__name__


def test_heldout_disjoint_from_train() -> None:
    tools = tool_call_tasks()
    train_instructions = {r["instruction"] for r in tools.train}
    assert tools.heldout and not train_instructions & {r["instruction"] for r in tools.heldout}
    asr = transcription_tasks()
    assert asr.heldout and not {r["text"] for r in asr.train} & {r["text"] for r in asr.heldout}
    qa = spoken_qa_tasks()
    assert qa.heldout and not {r["question"] for r in qa.train} & {r["question"] for r in qa.heldout}


def test_heldout_tool_calls_use_unseen_values_of_seen_parts() -> None:
    tools = tool_call_tasks()
    train_values = {json.dumps(r["answer"]["arguments"], sort_keys=True) for r in tools.train}
    heldout_values = {json.dumps(r["answer"]["arguments"], sort_keys=True) for r in tools.heldout}
    assert heldout_values - train_values  # some argument values never appear in training
    seen = {  # (argument, part) the model wrote in training: every held-out part must be among them
        (arg, part)
        for r in tools.train
        for arg, value in r["answer"]["arguments"].items()
        for part in re.split(r"[/.]", value)
    }
    for record in tools.heldout:
        for arg, value in record["answer"]["arguments"].items():
            for part in re.split(r"[/.]", value):
                assert (arg, part) in seen, (record["id"], part)
    assert {r["answer"]["name"] for r in tools.heldout[: len(TOOLS)]} == {t["function"]["name"] for t in TOOLS}


def test_every_tool_call_is_one_valid_call_of_a_listed_tool() -> None:
    names = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    split = tool_call_tasks(n_train=300)
    assert {r["answer"]["name"] for r in split.train} == set(names)
    for record in split.train + split.heldout:
        params = names[record["answer"]["name"]]
        assert set(record["answer"]["arguments"]) == set(params["required"])
        for value in record["answer"]["arguments"].values():
            assert value in record["instruction"]


def test_each_prompt_lists_the_expected_tool_and_distractors_in_a_fixed_order() -> None:
    split = tool_call_tasks(n_train=300)
    order = [t["function"]["name"] for t in TOOLS]
    distractors = set()
    for record in split.train + split.heldout:
        listed = [t["function"]["name"] for t in record["tools"]]
        assert len(listed) == TOOLS_PER_PROMPT and record["answer"]["name"] in listed
        assert listed == sorted(listed, key=order.index)
        distractors.update(n for n in listed if n != record["answer"]["name"])
    assert distractors == set(order)  # every tool serves as a distractor somewhere


def test_vocabulary_is_a_few_hundred_words() -> None:
    assert 100 <= len(vocabulary()) <= 400


def test_tool_call_chat_encodes_with_the_loss_on_the_call(tmp_path) -> None:
    write_tekken(build_tekken(devstral_spec(2048)), tmp_path / "tekken.json")
    tok = load_tokenizer(tmp_path / "tekken.json")
    record = tool_call_tasks(n_train=1).train[0]
    doc = ChatEncoder(tok, None, None).encode(tool_call_chat(record))
    target = tok.instruct_tokenizer.tokenizer.decode([int(t) for t in doc.tokens[doc.loss_mask]])
    assert record["answer"]["name"] in target and json.dumps(record["answer"]["arguments"]) in target
