"""The RULER-style suite: seeded, sized to the requested prompt length, answers present in the context."""

from __future__ import annotations

import pytest

from meda_quality import ruler
from tests.tiny_models import tokenizer as word_tokenizer


@pytest.fixture(scope="module")
def tok():
    t = word_tokenizer()
    t.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return t


@pytest.mark.parametrize("task", ruler.TASKS)
def test_items_are_seeded_sized_and_answerable(task, tok):
    a = ruler.build_item(task, 1024, 3, tok)
    b = ruler.build_item(task, 1024, 3, tok)
    c = ruler.build_item(task, 1024, 4, tok)
    assert a == b  # reproducible
    assert (a.context, a.answers) != (c.context, c.answers)  # seeds differ
    got = ruler.prompt_tokens(tok, a.context, a.question)
    assert got == a.meta["prompt_tokens"] and abs(got - 1024) <= 48, got
    for ans in a.answers:
        assert ans in a.context or task == "vt" and ans.upper() in a.context
    assert a.score(" ".join(a.answers)) == 1.0 and a.score("nothing") == 0.0
    if len(a.answers) > 1:
        assert a.score(a.answers[0]) == pytest.approx(1 / len(a.answers))


def test_longer_prompts_and_suite(tok):
    long = ruler.build_item("niah_multikey", 4096, 0, tok)
    assert abs(long.meta["prompt_tokens"] - 4096) <= 64
    assert sum(f"special magic numbers for" in s for s in long.context.split(".")) == 4  # 1 needle + 3 distractors
    suite = ruler.build_suite(tok, tasks=("qa", "vt"), lengths=(512,), per_cell=2)
    assert [it.uid for it in suite] == ["qa/512/0", "qa/512/1", "vt/512/0", "vt/512/1"]


def test_frequent_words_are_the_most_frequent(tok):
    it = ruler.build_item("fwe", 2048, 0, tok)
    from collections import Counter

    counts = Counter(it.context.split())
    assert {w for w, _ in counts.most_common(3)} == set(it.answers)


def test_bad_arguments(tok):
    with pytest.raises(ValueError, match="unknown task"):
        ruler.build_item("nope", 1024, 0, tok)
    with pytest.raises(ValueError, match=">= 128"):
        ruler.build_item("qa", 64, 0, tok)
