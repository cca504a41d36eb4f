"""The bundled task: small instructions generated in code, and a programmatic annotator.

    sort the numbers: 7 3 9 1\nanswer:   ->  " 1 3 7 9"
    reverse the words: cat dog tree\nanswer:   ->  " tree dog cat"
    count the words: cat dog tree\nanswer:   ->  " 3"

It stands in for people at both ends of InstructGPT's loop, and, as with people, the
demonstrations teach the task imperfectly. Demonstrators are careless: a fraction of their
answers carry a mistake (two items swapped, one dropped, repeated or replaced). And they
are chatty: many wrap the answer in filler ("sure the answer is 1 3 7 9"), which the
annotators do not want. SFT copies both habits; only preferences say what is wanted.
Annotators compare two responses by a hidden utility (how much of the right answer is in
the right place, discounted when wrapped in chatter), and they are noisy like people: they
choose a over b with Bradley-Terry probability σ((u_a - u_b) / τ), so close calls go
either way. Rankings are drawn from the matching Plackett-Luce model. Everything is a
pure function of a seed.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .data import write_jsonl

WORDS = "cat dog bird fish tree river stone cloud red green blue small large quick slow".split()
KINDS = ("sort", "reverse", "count")
_INSTRUCTIONS = {"sort": "sort the numbers", "reverse": "reverse the words", "count": "count the words"}
# Filler demonstrators put before an answer; annotators discount an answer wrapped in it.
CHATTER = ("sure", "ok so", "the answer is", "sure the answer is", "here it is")
CHATTER_COST = 0.3
_PROMPT_RE = re.compile(r"^(sort the numbers|reverse the words|count the words): (.*?)(?:\nanswer:)?$")
ANSWER_CUE = "\nanswer:"  # ends a text prompt; a chat prompt needs none (the template marks the reply)


@dataclass(frozen=True)
class Example:
    kind: str
    items: tuple[str, ...]

    @property
    def prompt(self) -> str:
        return f"{_INSTRUCTIONS[self.kind]}: {' '.join(self.items)}\nanswer:"

    @property
    def answer(self) -> str:
        """The correct completion (with the leading space that follows 'answer:')."""
        return " " + " ".join(correct_items(self))


def correct_items(example: Example) -> list[str]:
    if example.kind == "sort":
        return sorted(example.items, key=int)
    if example.kind == "reverse":
        return list(reversed(example.items))
    return [str(len(example.items))]


def make_example(rng: random.Random, min_items: int = 2, max_items: int = 5) -> Example:
    kind = rng.choice(KINDS)
    n = rng.randint(min_items, max_items)
    if kind == "sort":
        items = tuple(str(rng.randint(0, 9)) for _ in range(n))
    else:
        items = tuple(rng.choice(WORDS) for _ in range(n))
    return Example(kind, items)


def prompt_text(prompt) -> str:
    """The instruction of a prompt: the text itself, or a conversation's last user turn."""
    if isinstance(prompt, str):
        return prompt
    return next(m["content"] for m in reversed(prompt) if m["role"] == "user")


def parse_prompt(prompt) -> Example:
    """The example behind a text prompt or a conversation (its last user turn)."""
    match = _PROMPT_RE.match(prompt_text(prompt))
    if not match:
        raise ValueError(f"not a prompt of the bundled task: {prompt!r}")
    kind = next(k for k, text in _INSTRUCTIONS.items() if text == match.group(1))
    return Example(kind, tuple(match.group(2).split()))


def strip_chatter(words: list[str]) -> tuple[bool, list[str]]:
    """(whether the response opens with chatter, the words after it)."""
    for phrase in sorted(CHATTER, key=len, reverse=True):
        n = len(phrase.split())
        if words[:n] == phrase.split():
            return True, words[n:]
    return False, words


def correctness(example: Example, got: list[str]) -> float:
    """The fraction of answer positions right, over the longer of answer and response
    (extra or missing items cost). For counting, 1 - |error| / n."""
    if example.kind == "count":
        if len(got) != 1 or not got[0].isdigit():
            return 0.0
        return max(0.0, 1.0 - abs(int(got[0]) - len(example.items)) / len(example.items))
    target = correct_items(example)
    return sum(a == b for a, b in zip(target, got)) / max(len(target), len(got))


def response_text(response) -> str:
    """A response's text: itself, or the content of a conversational reply's assistant turns."""
    if isinstance(response, str):
        return response
    return " ".join(m["content"] for m in response if m["role"] == "assistant")


def utility(prompt, response) -> float:
    """The annotators' hidden utility in [0, 1]: the correctness of the answer, times
    1 - CHATTER_COST when it is wrapped in chatter. This is also the gold reward to evaluate
    a trained policy with."""
    chatty, got = strip_chatter(response_text(response).split())
    return correctness(parse_prompt(prompt), got) * (1.0 - CHATTER_COST if chatty else 1.0)


def chat(answer: str, rng: random.Random) -> str:
    """The answer wrapped in a random chatter phrase."""
    return " " + rng.choice(CHATTER) + answer


def corrupt(example: Example, rng: random.Random, mistakes: int = 1) -> str:
    """A plausible wrong answer: `mistakes` random edits of the right one."""
    items = correct_items(example)
    for _ in range(mistakes):
        if example.kind == "count":
            items = [str(max(0, int(items[0]) + rng.choice([-2, -1, 1, 2])))]
            continue
        edit = rng.choice(["swap", "drop", "repeat", "replace"])
        if edit == "swap" and len(items) >= 2:
            i = rng.randrange(len(items) - 1)
            items[i], items[i + 1] = items[i + 1], items[i]
        elif edit == "drop" and len(items) >= 2:
            items.pop(rng.randrange(len(items)))
        elif edit == "repeat":
            i = rng.randrange(len(items))
            items.insert(i, items[i])
        else:
            pool = [str(d) for d in range(10)] if example.kind == "sort" else WORDS
            items[rng.randrange(len(items))] = rng.choice(pool)
    return " " + " ".join(items)


def demonstration(example: Example, rng: random.Random, error_rate: float = 0.2, chatter_rate: float = 0.0) -> str:
    """What a careless, chatty demonstrator writes: the right answer, or with probability
    `error_rate` a slightly wrong one; wrapped in chatter with probability `chatter_rate`."""
    answer = corrupt(example, rng) if rng.random() < error_rate else example.answer
    return chat(answer, rng) if chatter_rate > 0 and rng.random() < chatter_rate else answer


def candidate(example: Example, rng: random.Random) -> str:
    """A response of varying quality, as a policy's samples would be (half of them chatty)."""
    mistakes = rng.choice([0, 0, 1, 1, 2, 3])
    answer = example.answer if mistakes == 0 else corrupt(example, rng, mistakes)
    return chat(answer, rng) if rng.random() < 0.5 else answer


def preference_probability(prompt: str, a: str, b: str, temperature: float = 0.1) -> float:
    """P(an annotator prefers a to b) = σ((u_a - u_b) / temperature); at temperature 0 a
    perfect annotator: 1, 0, or ½ on a tie."""
    du = utility(prompt, a) - utility(prompt, b)
    if temperature <= 0:
        return 1.0 if du > 0 else 0.0 if du < 0 else 0.5
    return 1.0 / (1.0 + math.exp(-du / temperature))


def annotator_prefers_first(prompt: str, a: str, b: str, rng: random.Random, temperature: float = 0.1) -> bool:
    """A noisy annotator's vote, drawn with preference_probability. A perfect annotator
    (temperature 0) flips a coin only on a tie."""
    p = preference_probability(prompt, a, b, temperature)
    if temperature <= 0 and p != 0.5:
        return p == 1.0
    return rng.random() < p


def annotator_ranking(prompt: str, responses: list[str], rng: random.Random, temperature: float = 0.1) -> list[str]:
    """Best to worst, Plackett-Luce with weights exp(u / temperature) (Gumbel-max trick),
    whose pairwise marginals are the Bradley-Terry choices above."""
    def noisy(r: str) -> float:
        gumbel = -math.log(-math.log(rng.random() or 1e-300)) if temperature > 0 else rng.random() * 1e-9
        return utility(prompt, r) / max(temperature, 1e-12) + gumbel
    return [r for _, r in sorted(((noisy(r), r) for r in responses), key=lambda t: -t[0])]


# ---------------------------------------------------------------- datasets

def sft_records(n: int, seed: int = 0, error_rate: float = 0.2, chatter_rate: float = 0.0) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        example = make_example(rng)
        records.append({"prompt": example.prompt, "completion": demonstration(example, rng, error_rate, chatter_rate)})
    return records


def _distinct_candidates(example: Example, rng: random.Random, k: int) -> list[str]:
    seen: list[str] = []
    for _ in range(50 * k):
        c = candidate(example, rng)
        if c not in seen:
            seen.append(c)
        if len(seen) == k:
            break
    return seen


def preference_records(n: int, seed: int = 0, temperature: float = 0.1) -> list[dict]:
    rng = random.Random(seed)
    records = []
    while len(records) < n:
        example = make_example(rng)
        pair = _distinct_candidates(example, rng, 2)
        if len(pair) < 2:
            continue
        a, b = pair
        if not annotator_prefers_first(example.prompt, a, b, rng, temperature):
            a, b = b, a
        records.append({"prompt": example.prompt, "chosen": a, "rejected": b})
    return records


def ranking_records(n: int, k: int = 4, seed: int = 0, temperature: float = 0.1) -> list[dict]:
    rng = random.Random(seed)
    records = []
    while len(records) < n:
        example = make_example(rng)
        responses = _distinct_candidates(example, rng, k)
        if len(responses) < 2:
            continue
        records.append({"prompt": example.prompt, "responses": annotator_ranking(example.prompt, responses, rng, temperature)})
    return records


def prompt_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": make_example(rng).prompt} for _ in range(n)]


def _user(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt.removesuffix(ANSWER_CUE)}]


def _assistant(text: str) -> list[dict]:
    # The answer keeps its leading space: then every item of it is the same kind of token
    # (" 3", " dog") whether first or not, as in the text format, instead of the first one
    # alone being a bare "3" (a small model from scratch learns the task worse that way).
    return [{"role": "assistant", "content": text}]


def as_conversation(record: dict) -> dict:
    """A text record of the task in TRL's conversational form: the instruction as the user
    turn (without the answer cue), each response as an assistant turn. Utilities are
    unchanged: they read the words."""
    out = {k: v for k, v in record.items() if k not in ("prompt", "completion", "chosen", "rejected", "responses")}
    if "completion" in record:
        return {"messages": _user(record["prompt"]) + _assistant(record["completion"]), **out}
    out["prompt"] = _user(record["prompt"])
    for key in ("chosen", "rejected"):
        if key in record:
            out[key] = _assistant(record[key])
    if "responses" in record:
        out["responses"] = [_assistant(r) for r in record["responses"]]
    return out


def write_task_data(out_dir: str | Path, n_sft: int = 2000, n_pairs: int = 2000, n_rankings: int = 500,
                    n_prompts: int = 500, n_eval: int = 200, seed: int = 0, error_rate: float = 0.2,
                    temperature: float = 0.1, chatter_rate: float = 0.6, data_format: str = "text") -> dict[str, Path]:
    """Write train and eval files of every format under `out_dir`; returns name -> path.
    Train and eval use different seeds (the same prompt may still appear in both: the
    task is small). The eval demonstrations are what annotators want: right, no chatter.
    data_format "chat" writes TRL's conversational forms (for a model with a chat template)."""
    if data_format not in ("text", "chat"):
        raise ValueError(f"data_format must be 'text' or 'chat', got {data_format!r}")
    out = Path(out_dir)
    files = {
        "sft": sft_records(n_sft, seed, error_rate, chatter_rate),
        "sft_eval": sft_records(n_eval, seed + 1, error_rate=0.0),
        "preferences": preference_records(n_pairs, seed + 2, temperature),
        "preferences_eval": preference_records(n_eval, seed + 3, temperature=0.0),
        "rankings": ranking_records(n_rankings, 4, seed + 4, temperature),
        "prompts": prompt_records(n_prompts, seed + 5),
        "prompts_eval": prompt_records(n_eval, seed + 6),
        # held out for checkpoint selection during RL, so that the judged prompts (prompts_eval) stay unseen
        "prompts_select": prompt_records(n_eval, seed + 7),
    }
    if data_format == "chat":
        files = {name: [as_conversation(r) for r in records] for name, records in files.items()}
    return {name: write_jsonl(out / f"{name}.jsonl", records) for name, records in files.items()}


@dataclass
class TaskDataConfig:
    """Write the bundled task's JSONL files (SFT, preferences, rankings, prompts)."""

    output_dir: str = field(metadata={"help": "directory for sft.jsonl, preferences.jsonl, rankings.jsonl, prompts.jsonl and *_eval.jsonl"})
    n_sft: int = field(default=2000, metadata={"help": "demonstrations"})
    n_pairs: int = field(default=2000, metadata={"help": "preference pairs"})
    n_rankings: int = field(default=500, metadata={"help": "rankings of 4 responses"})
    n_prompts: int = field(default=500, metadata={"help": "PPO prompts"})
    n_eval: int = field(default=200, metadata={"help": "examples in each eval file"})
    seed: int = field(default=0, metadata={"help": "everything is a pure function of this seed"})
    error_rate: float = field(default=0.2, metadata={"help": "fraction of demonstrations with a mistake"})
    chatter_rate: float = field(default=0.6, metadata={"help": "fraction of demonstrations wrapped in chatter the annotators dislike"})
    temperature: float = field(default=0.1, metadata={"help": "annotator noise: P(a > b) = sigmoid((u_a - u_b) / temperature); 0 is noiseless"})
    format: Literal["chat", "text"] = field(default="chat", metadata={"help": "chat: TRL's conversational records ({\"messages\"}, {\"prompt\": [msgs], ...}) for a model with a chat template; text: plain prompt/completion strings"})

    def __post_init__(self):
        for name in ("error_rate", "chatter_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")


def write_task_data_from_config(config: TaskDataConfig) -> dict[str, str]:
    c = config
    files = write_task_data(c.output_dir, c.n_sft, c.n_pairs, c.n_rankings, c.n_prompts, c.n_eval, c.seed,
                            c.error_rate, c.temperature, c.chatter_rate, c.format)
    return {name: str(path) for name, path in files.items()}


def all_task_texts(n: int = 2000, seed: int = 0) -> list[str]:
    """Prompt + answer strings (half of them chatty), e.g. to train a tokenizer that knows
    the task's words."""
    rng = random.Random(seed)
    return [e.prompt + (chat(e.answer, rng) if i % 2 else e.answer) for i, e in enumerate(make_example(rng)
                                                                                          for _ in range(n))]
