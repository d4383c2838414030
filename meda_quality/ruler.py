"""A RULER-style long-context task suite, generated here from a seed (no data download).

Tasks (after RULER, Hsieh et al. 2024, the suite kvpress's leaderboard uses):

* ``niah_single``: one needle "One of the special magic numbers for {key} is: {value}." in filler;
  asked for the number of that key.
* ``niah_multikey``: four needles with different keys (three distractors); asked for one key.
* ``niah_multivalue``: four values for the same key; asked for all of them (score: fraction found).
* ``vt`` (variable tracking): a chain ``VAR A = 12345``, ``VAR B = VAR A``, ... spread through the
  filler; asked for every variable that holds the value (score: fraction found).
* ``fwe`` (frequent words): a list of made-up words in which three occur far more often than the
  rest; asked for the three most frequent (score: fraction found).
* ``qa``: short synthetic documents about made-up towns (mayor, industry, river); asked one fact
  of one town. The other documents are distractors of the same form.

Each item is a (context, question, answers) triple; `build_item(task, n_tokens, seed, tokenizer)`
sizes the filler so that the rendered chat prompt has about ``n_tokens`` tokens (measured with the
model's tokenizer, within a few percent). Items depend only on (task, n_tokens, seed): the suite is
reproducible, and a `Suite` lists them. Scoring is string containment after lower-casing (RULER's
``string_match_all``), so a chatty answer that contains the value is right.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "vt", "fwe", "qa")
LENGTHS = (1024, 2048, 4096)
# Answer lengths: the model restates the question before the value ("The special magic number ... is 7311.")
MAX_NEW_TOKENS = {"niah_single": 24, "niah_multikey": 24, "niah_multivalue": 64, "vt": 48, "fwe": 32, "qa": 24}

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_WORDS = ("amber", "basin", "cobalt", "delta", "ember", "falcon", "garnet", "harbor", "indigo", "jasper",
             "kestrel", "lagoon", "maple", "nectar", "onyx", "pepper", "quartz", "raven", "saffron", "tundra",
             "umber", "violet", "willow", "yarrow", "zephyr", "orchid", "canyon", "meadow", "glacier", "lantern")
SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "ta", "vo", "zi", "pe", "su", "do", "ga", "fi", "ho", "ju", "be")
FIRST = ("Elena", "Marcus", "Ingrid", "Tobias", "Priya", "Oskar", "Lucia", "Henrik", "Amara", "Felix", "Nadia",
         "Viktor", "Selma", "Bruno", "Yara", "Anton")
LAST = ("Brandt", "Okafor", "Lindqvist", "Moreau", "Castillo", "Novak", "Hayashi", "Petrov", "Alvarez",
        "Kowalski", "Fischer", "Dubois", "Romano", "Sandoval", "Whitaker", "Nakamura")
INDUSTRY = ("copper mining", "glass blowing", "cheese making", "shipbuilding", "silk weaving", "clock making",
            "salt harvesting", "paper milling", "olive pressing", "bell casting")
RIVER = ("Vessa", "Orlin", "Tamar", "Skelde", "Brava", "Moldra", "Ilse", "Karun", "Pellow", "Suvi")


@dataclass
class Item:
    """One question. ``answers``: every string the output must contain (the score is the fraction found)."""

    task: str
    target_tokens: int
    seed: int
    context: str
    question: str
    answers: list[str]
    max_new_tokens: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def uid(self) -> str:
        return f"{self.task}/{self.target_tokens}/{self.seed}"

    def score(self, output: str) -> float:
        out = output.lower()
        return sum(a.lower() in out for a in self.answers) / len(self.answers)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _word(rng: random.Random, n: int = 3) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(n))


def _insert(filler: list[str], needles: Sequence[str], rng: random.Random, *, lo: float = 0.05,
            hi: float = 0.95) -> list[str]:
    """Put each needle at a random depth in ``[lo, hi]`` of the filler (sentence boundaries)."""
    out = list(filler)
    for needle in needles:
        pos = int(len(out) * rng.uniform(lo, hi))
        out.insert(pos, needle)
    return out


# Each generator: (rng, n_filler_units) -> (units, question, answers, meta). Units are joined by " ".
def _gen_niah_single(rng, n):
    key, value = rng.choice(KEY_WORDS), _number(rng)
    units = _insert([NOISE] * n, [f"One of the special magic numbers for {key} is: {value}."], rng)
    q = f"What is the special magic number for {key} mentioned in the provided text? Answer with the number only."
    return units, q, [value], {"key": key}


def _gen_niah_multikey(rng, n):
    keys = rng.sample(KEY_WORDS, 4)
    values = [_number(rng) for _ in keys]
    needles = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values)]
    units = _insert([NOISE] * n, needles, rng)
    q = (f"What is the special magic number for {keys[0]} mentioned in the provided text? "
         "Answer with the number only.")
    return units, q, [values[0]], {"key": keys[0], "distractors": values[1:]}


def _gen_niah_multivalue(rng, n):
    key = rng.choice(KEY_WORDS)
    values = [_number(rng) for _ in range(4)]
    units = _insert([NOISE] * n, [f"One of the special magic numbers for {key} is: {v}." for v in values], rng)
    q = (f"What are all the special magic numbers for {key} mentioned in the provided text? "
         "List the numbers only.")
    return units, q, values, {"key": key}


def _gen_vt(rng, n):
    names = [_word(rng, 2).upper() + _word(rng, 1).upper() for _ in range(4)]
    value = str(rng.randint(10_000, 99_999))
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, len(names))]
    out = [NOISE] * n
    # keep the chain in order: increasing depths
    depths = sorted(rng.uniform(0.05, 0.95) for _ in chain)
    for k, (d, s) in enumerate(zip(depths, chain)):
        out.insert(int(len(out) * d) + k * 0, s)
    q = (f"Find all variables that are assigned the value {value} in the text above, directly or through "
         "other variables. Answer with the variable names only.")
    return out, q, names, {"value": value}


def _gen_fwe(rng, n):
    vocab = list(dict.fromkeys(_word(rng, 3) for _ in range(200)))
    top = vocab[:3]
    rest = vocab[3:]
    # n units of 10 words; top words appear ~30x more often than each other word
    words: list[str] = []
    for _ in range(n * 10):
        words.append(rng.choice(top) if rng.random() < 0.35 else rng.choice(rest))
    units = [" ".join(words[i : i + 10]) for i in range(0, len(words), 10)]
    q = ("What are the three most frequently appearing words in the list above? "
         "Answer with the three words only.")
    return units, q, top, {}


def _town_doc(rng, town: str, k: int) -> tuple[str, dict[str, str]]:
    facts = {"mayor": f"{rng.choice(FIRST)} {rng.choice(LAST)}", "industry": rng.choice(INDUSTRY),
             "river": rng.choice(RIVER)}
    doc = (f"Document {k}: {town} is a small town on the river {facts['river']}. It is known for its "
           f"{facts['industry']}. The current mayor of {town} is {facts['mayor']}. " + NOISE)
    return doc, facts


def _gen_qa(rng, n):
    # a document is ~4 noise-unit lengths; ask about one of them
    n_docs = max(2, n // 3)
    towns = list(dict.fromkeys(_word(rng, 3).capitalize() for _ in range(n_docs * 2)))[:n_docs]
    docs, facts = zip(*(_town_doc(rng, t, i + 1) for i, t in enumerate(towns)))
    j = rng.randrange(len(towns))
    attr = rng.choice(("mayor", "industry", "river"))
    question = {
        "mayor": f"Who is the current mayor of {towns[j]}?",
        "industry": f"What is the town of {towns[j]} known for?",
        "river": f"On which river is the town of {towns[j]}?",
    }[attr] + " Answer briefly."
    return list(docs), question, [facts[j][attr]], {"town": towns[j], "attribute": attr}


GENERATORS: dict[str, Callable] = {
    "niah_single": _gen_niah_single, "niah_multikey": _gen_niah_multikey, "niah_multivalue": _gen_niah_multivalue,
    "vt": _gen_vt, "fwe": _gen_fwe, "qa": _gen_qa,
}
_UNIT_DIVISOR = {"qa": 3}  # units per generator step that the length search scales


def render_messages(item_context: str, question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{item_context}\n\n{question}"}]


def prompt_tokens(tokenizer, context: str, question: str) -> int:
    text = tokenizer.apply_chat_template(render_messages(context, question), add_generation_prompt=True,
                                         tokenize=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_item(task: str, n_tokens: int, seed: int, tokenizer) -> Item:
    """The item of ``task`` with ``seed``, its chat prompt about ``n_tokens`` tokens long."""
    if task not in GENERATORS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    if n_tokens < 128:
        raise ValueError(f"n_tokens must be >= 128, got {n_tokens}")
    gen = GENERATORS[task]

    def make(n_units: int):
        rng = random.Random(f"{task}:{n_tokens}:{seed}")  # same needles for every filler size
        units, q, answers, meta = gen(rng, max(n_units, 2))
        return " ".join(units), q, answers, meta

    # a few secant steps on the filler size: token count is close to linear in it
    n = max(2, n_tokens // 24)
    for _ in range(6):
        ctx, q, answers, meta = make(n)
        got = prompt_tokens(tokenizer, ctx, q)
        if abs(got - n_tokens) <= max(8, n_tokens // 100):
            break
        per_unit = max(got / n, 1.0)
        n = max(2, n + int(round((n_tokens - got) / per_unit)))
    meta = {**meta, "prompt_tokens": got, "filler_units": n}
    return Item(task, n_tokens, seed, ctx, q, answers, MAX_NEW_TOKENS[task], meta)


def build_suite(tokenizer, *, tasks: Sequence[str] = TASKS, lengths: Sequence[int] = LENGTHS, per_cell: int = 4,
                seed0: int = 0) -> list[Item]:
    """``per_cell`` items per (task, length), seeds ``seed0 .. seed0 + per_cell - 1``."""
    return [build_item(t, L, seed0 + i, tokenizer) for t in tasks for L in lengths for i in range(per_cell)]
