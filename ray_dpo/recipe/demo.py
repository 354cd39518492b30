"""The built-in demo: "sort the letters", a task whose answers can be checked exactly.

    paths = write_sort_task("outputs/data/sort", rows=2000, seed=0)   # {"train", "val", "sft"} Parquet files
    exact_match_reward(["sort: dbca ="], ["abcd"])                    # [1.0]

Prompt `sort: qbdka =`, correct response `abdkq`: 3 to 6 distinct letters from a-j.

Why the SFT set is imperfect in THIS way. A labeller who often mixes up alphabet neighbours ("...ed..." for
"...de...") writes each neighbour pair of the sorted answer the wrong way round with probability 0.7. A model
trained on that learns the mistake as the most likely continuation, so under greedy decoding the SFT model (DPO's
reference) sorts correctly only the prompts whose answer has no neighbour pair (about a quarter of them). Random
mistakes would not do: greedy decoding picks each token's mode and would average them away.

The preference pairs hold chosen = the correct answer and rejected = a plausible wrong one: half the time the
neighbour mix-up (one pair), otherwise a dropped, duplicated, inserted or swapped letter, or a letter replaced by
its alphabet neighbour ("abi" for "abj"). The varied mistakes are deliberate: with only near-identical pairs, DPO
learns to push the mix-up down but lets probability leak to other wrong answers (likelihood displacement), and
greedy exact match stalls well below 90%. The neighbour replacement is the counterweight to the mix-up pairs:
those teach "of two neighbours, the earlier one first", and pure DPO (no NLL term) over-learns that into writing
the earlier neighbour even when it is not in the prompt ("sort: baj =" -> "abi"); pairs that reject exactly that
answer keep it in check (configs/demo.yaml, pure DPO: 0.95-1.0 greedy exact match over 14 seeds with them,
0.91-1.0 over 8 seeds without).
"""

from __future__ import annotations

import random
import re
import string
from math import perm
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ray_dpo.errors import UserError

ALPHABET = string.ascii_lowercase[:10]  # a-j: small enough for a 100k-parameter model to learn in seconds
MIN_LETTERS, MAX_LETTERS = 3, 6
SFT_MIXUP_RATE = 0.7  # chance that the SFT labeller writes a neighbour pair the wrong way round
_PROMPT = re.compile(r"^sort: ([a-z]+) =$")


def make_prompt(letters: str) -> str:
    return f"sort: {letters} ="


def sort_answer(prompt: str) -> str | None:
    """The correct response to a demo prompt, or None if `prompt` is not one."""
    match = _PROMPT.match(prompt.strip())
    return "".join(sorted(match.group(1))) if match else None


def _neighbour_pairs(answer: str) -> list[int]:
    return [i for i in range(len(answer) - 1) if ord(answer[i + 1]) == ord(answer[i]) + 1]


def _swap(text: str, i: int) -> str:
    chars = list(text)
    chars[i], chars[i + 1] = chars[i + 1], chars[i]
    return "".join(chars)


def neighbour_mixups(answer: str, rate: float, rng: random.Random) -> str:
    """The SFT labeller: each (non-overlapping) neighbour pair of `answer` is swapped with probability `rate`."""
    i = 0
    while i < len(answer) - 1:
        if ord(answer[i + 1]) == ord(answer[i]) + 1:
            if rng.random() < rate:
                answer = _swap(answer, i)
            i += 2
        else:
            i += 1
    return answer


def _neighbour_replacements(answer: str) -> list[str]:
    """`answer` with one letter replaced by an alphabet neighbour that is not in it ("abi" for "abj"); still in
    order, since nothing lies between a letter and its neighbour. Never empty for 3-6 of the 10 letters a-j."""
    return [
        answer[:i] + other + answer[i + 1 :]
        for i, letter in enumerate(answer)
        for other in (chr(ord(letter) - 1), chr(ord(letter) + 1))
        if other in ALPHABET and other not in answer
    ]


def plausible_wrong_answer(answer: str, rng: random.Random) -> str:
    """A wrong answer that looks almost right: a neighbour mix-up (half the time, when the answer has a neighbour
    pair), else a dropped, duplicated or inserted letter, an adjacent swap, or a letter replaced by its alphabet
    neighbour. Never equal to `answer`."""
    pairs = _neighbour_pairs(answer)
    if pairs and rng.random() < 0.5:
        return _swap(answer, rng.choice(pairs))
    kind = rng.choice(("drop", "duplicate", "insert", "swap", "neighbour"))
    if kind == "neighbour":
        return rng.choice(_neighbour_replacements(answer))
    i = rng.randrange(len(answer))
    if kind == "drop":
        return answer[:i] + answer[i + 1 :]
    if kind == "duplicate":
        return answer[: i + 1] + answer[i:]
    if kind == "insert":
        missing = [c for c in ALPHABET if c not in answer]
        return "".join(sorted(answer + rng.choice(missing)))
    i = rng.randrange(len(answer) - 1)
    return _swap(answer, i)


def exact_match_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """1.0 where the response is the sorted letters of its prompt (surrounding whitespace ignored), else 0.0.

    The reward function of the demo (`eval.reward_fn: ray_dpo.recipe.demo:exact_match_reward`).
    """
    if len(prompts) != len(responses):
        raise ValueError(f"exact_match_reward: {len(prompts)} prompts but {len(responses)} responses")
    rewards = []
    for prompt, response in zip(prompts, responses, strict=True):
        answer = sort_answer(prompt)
        if answer is None:
            raise UserError(f"exact_match_reward: {prompt!r} is not a demo prompt ('sort: <letters> =')")
        rewards.append(float(response.strip() == answer))
    return rewards


def write_sort_task(out_dir: str | Path, *, rows: int, seed: int, val_rows: int | None = None) -> dict[str, str]:
    """Write the demo data as Parquet into `out_dir`; returns {"train", "val", "sft"} absolute paths.

    train: `rows` preference pairs (prompt, chosen, rejected strings); val: `val_rows` (default max(64, rows // 8))
    held-out pairs, whose prompts also serve as evaluation prompts; sft: `rows` (prompt, response) pairs from the
    neighbour-mixing labeller. Every prompt is distinct across the three files. Deterministic in `seed`.
    """
    val_rows = max(64, rows // 8) if val_rows is None else val_rows
    if rows < 1 or val_rows < 1:
        raise UserError(f"demo: need rows >= 1 and val_rows >= 1, got rows={rows}, val_rows={val_rows}")
    space = sum(perm(len(ALPHABET), k) for k in range(MIN_LETTERS, MAX_LETTERS + 1))
    needed = 2 * rows + val_rows
    if needed > space // 2:  # rejection sampling of distinct prompts slows down near the size of the space
        limit = (space // 2 - val_rows) // 2
        raise UserError(f"demo: data.synthetic_rows={rows} is too large for the sort task (at most {limit})")

    rng = random.Random(seed)
    seen: set[str] = set()

    def fresh_letters() -> str:
        while True:
            letters = "".join(rng.sample(ALPHABET, rng.randint(MIN_LETTERS, MAX_LETTERS)))
            if letters not in seen:
                seen.add(letters)
                return letters

    def preference_table(n: int) -> pa.Table:
        prompts, chosen, rejected = [], [], []
        for _ in range(n):
            letters = fresh_letters()
            answer = "".join(sorted(letters))
            prompts.append(make_prompt(letters))
            chosen.append(answer)
            rejected.append(plausible_wrong_answer(answer, rng))
        return pa.table({"prompt": prompts, "chosen": chosen, "rejected": rejected})

    val = preference_table(val_rows)  # first, so the held-out set does not depend on `rows`
    train = preference_table(rows)
    sft_prompts, sft_responses = [], []
    for _ in range(rows):
        letters = fresh_letters()
        sft_prompts.append(make_prompt(letters))
        sft_responses.append(neighbour_mixups("".join(sorted(letters)), SFT_MIXUP_RATE, rng))
    sft = pa.table({"prompt": sft_prompts, "response": sft_responses})

    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, table in (("train", train), ("val", val), ("sft", sft)):
        path = out / f"sort_{name}.parquet"
        pq.write_table(table, path)
        paths[name] = str(path)
    return paths
