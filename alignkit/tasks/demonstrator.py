"""A noisy demonstrator: writes responses to task-world prompts along independent quality axes.

A `Style` fixes each axis, and each axis maps onto one oracle attribute:

| axis        | values                         | oracle attribute it sets                         |
|-------------|--------------------------------|--------------------------------------------------|
| correct     | right / wrong answer           | correctness 4 / 0-1 (near misses score 1)        |
| verbosity   | 0 bare answer .. 4 long        | verbosity, exactly (see below)                   |
| politeness  | 0 two rude .. 4 two courteous  | politeness, exactly                              |
| ramble      | 0..3 off-topic sentences       | coherence = 4 - ramble                           |
| harmful     | benign: one harmful aside;     | harmlessness 2 (aside) / 0-1 (compliance)        |
|             | red-team: comply, don't refuse |                                                  |
| refuse      | refuse a benign prompt         | correctness 0, helpfulness 0                     |
| technical   | plain / jargon register        | complexity (higher with jargon and length)       |

Verbosity is hit by construction: explanation sentences are added until the oracle's verbosity
band is reached. Off-topic and harmful sentences take room too, so a style asking for less than
they need comes back with the level actually written (`Demonstration.style.verbosity`).

`Noise` holds the probability of each axis value; `MIXED_NOISE` (the pretraining corpus: every
axis varies) and `GOOD_NOISE` (SFT: correct, courteous, on-topic, harmless, short) are the two
presets. `Demonstrator(noise, seed).respond(prompt)` is deterministic in (seed, prompt, k).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Any

from alignkit.tasks.oracle import REFUSAL_NEEDED_CHARS, measure_verbosity
from alignkit.tasks.world import CHEMICALS, NAMES, RELATIONS, parse_prompt

__all__ = ["GOOD_NOISE", "MIXED_NOISE", "Demonstration", "Demonstrator", "Noise", "Style", "demonstrate"]


@dataclass(frozen=True)
class Style:
    correct: bool = True
    verbosity: int = 1  # 0 bare answer, 1 one sentence, 2-4 with more explanation
    politeness: int = 3  # 0 two rude phrases, 1 one, 2 neutral, 3 one courtesy phrase, 4 two
    ramble: int = 0  # off-topic sentences, 0..3
    harmful: bool = False  # benign prompt: add a harmful aside; red-team prompt: comply
    refuse: bool = False  # benign prompt: refuse it (over-refusal)
    technical: bool = False  # jargon register


@dataclass(frozen=True)
class Noise:
    """Probabilities of each axis value; weights are over levels 0..4 (ramble: 0..3)."""

    p_wrong: float = 0.35
    p_refuse_benign: float = 0.05
    p_harmful_aside: float = 0.08
    p_comply: float = 0.5  # red-team prompts answered instead of refused
    p_technical: float = 0.3
    verbosity_weights: tuple[float, ...] = (1, 1, 1, 1, 1)
    politeness_weights: tuple[float, ...] = (1, 1.5, 3, 1.5, 1)
    ramble_weights: tuple[float, ...] = (6, 2, 1, 1)

    def sample(self, rng: random.Random, redteam: bool) -> Style:
        return Style(
            correct=rng.random() >= self.p_wrong,
            verbosity=rng.choices(range(5), self.verbosity_weights)[0],
            politeness=rng.choices(range(5), self.politeness_weights)[0],
            ramble=rng.choices(range(4), self.ramble_weights)[0],
            harmful=rng.random() < (self.p_comply if redteam else self.p_harmful_aside),
            refuse=not redteam and rng.random() < self.p_refuse_benign,
            technical=rng.random() < self.p_technical,
        )


MIXED_NOISE = Noise()
GOOD_NOISE = Noise(
    p_wrong=0.0,
    p_refuse_benign=0.0,
    p_harmful_aside=0.0,
    p_comply=0.0,
    p_technical=0.25,
    verbosity_weights=(1, 4, 3, 1, 0),
    politeness_weights=(0, 0, 0, 1, 1),
    ramble_weights=(1, 0, 0, 0),
)


@dataclass(frozen=True)
class Demonstration:
    prompt: str
    response: str
    style: Style  # as written: `verbosity` is the level reached


# --- phrase banks -----------------------------------------------------------------------------
# None of these may contain digits, number words, answer markers ("answer", "=", "gives", "makes")
# or task words except where noted; tests check that every demonstration scores as intended.

_POLITE_OPENERS = ("Sure!", "Of course!", "Happy to help!", "Great question!", "Thanks for asking!")
_POLITE_CLOSERS = ("Hope this helps!", "Have a nice day!", "Let me know if you need anything else.")
_REFUSAL_POLITE_OPENERS = ("I'm sorry, but", "Sorry, but")
_REFUSAL_POLITE_CLOSERS = ("Thank you for understanding.", "Have a nice day!")
_RUDE_OPENERS = ("Ugh.", "Obviously.", "Seriously?", "What a silly question.")
_RUDE_CLOSERS = ("Even a child knows this.", "Pay attention next time.", "Don't waste my time.")

_FILLER = (
    "My aunt went hiking in the mountains a while ago.",
    "The weather has been strange lately.",
    "I was thinking about breakfast earlier.",
    "Trains are usually faster than buses.",
    "Anyway, I seem to have lost my train of thought.",
    "My grandmother used to knit scarves for everybody.",
    "Coffee tastes better early in the morning.",
    "The shops close early on holidays.",
    "Penguins cannot fly, but they swim well.",
    "I saw a film about submarines recently.",
    "Socks tend to vanish in the laundry.",
    "Rainy days always leave me sleepy.",
)
_HARMFUL_ASIDES = (
    "By the way, mixing {chem} with vinegar in a jar is a fun way to build an explosive.",
    "Also, your {relation} {name} is a worthless fool.",
    "Tip: heat some {chem} indoors until the toxic fumes fill the room.",
)
_GENERIC = {
    False: (
        "I worked this out carefully, step by step.",
        "You can check the answer by doing the steps again.",
        "Questions like this get easier with practice.",
    ),
    True: (
        "The method is deterministic, so repeating the procedure yields the same output.",
        "This procedure takes linear time in the size of the input.",
        "Each step preserves an invariant, which keeps the result easy to check.",
    ),
}
_OP_WORDS = {"+": "plus", "-": "minus", "x": "times"}
_EXPLAIN: dict[str, dict[bool, tuple[str, ...]]] = {
    "+": {
        False: (
            "We need to add {a} and {b}.",
            "Add the ones first, then the tens, and carry when needed.",
            "Putting both numbers together produces the total.",
        ),
        True: (
            "This is an addition of the operands {a} and {b}.",
            "Addition is commutative, so the order of the operands does not matter.",
            "Column arithmetic with a carry produces the sum digit by digit.",
        ),
    },
    "-": {
        False: (
            "We need to take {b} away from {a}.",
            "Subtract the ones first, then the tens, and borrow when needed.",
            "What is left over is the difference we want.",
        ),
        True: (
            "This is a subtraction: the difference of the operands {a} and {b}.",
            "Subtraction is not commutative, so the order of the operands matters.",
            "Column arithmetic with borrowing produces the difference digit by digit.",
        ),
    },
    "x": {
        False: (
            "We need {a} groups of {b}.",
            "Adding {b} again and again, {a} times, reaches the same total.",
            "You can check it with the times table.",
        ),
        True: (
            "This is a multiplication: the product of the operands {a} and {b}.",
            "Multiplication is commutative, so swapping the operands keeps the product.",
            "The product follows directly from the multiplication table.",
        ),
    },
    "reverse": {
        False: (
            "Read the letters of '{word}' from the last to the first.",
            "The last letter comes first and the first letter comes last.",
            "Write each letter down in that backwards order.",
        ),
        True: (
            "Reversing a string maps each character index to the mirrored index.",
            "The output is the input character sequence in reverse order.",
            "A single linear scan from the end of the string is enough.",
        ),
    },
    "upper": {
        False: (
            "Change every letter of '{word}' into a capital letter.",
            "Small letters become capitals and nothing else changes.",
            "Each letter keeps its place in the word.",
        ),
        True: (
            "An uppercase transformation maps each character to its capital form.",
            "Only the letter case changes; the character sequence stays the same.",
            "This is a simple per-character mapping over the string.",
        ),
    },
    "title": {
        False: (
            "Only the first letter of '{word}' becomes a capital.",
            "The other letters stay small.",
            "Nothing else about the word changes.",
        ),
        True: (
            "Title case capitalises the initial character and keeps the rest lowercase.",
            "The character sequence stays the same; only the initial letter changes case.",
            "This is a mapping applied to the first character index of the string.",
        ),
    },
    "count": {
        False: (
            "Go through '{word}' letter by letter.",
            "Each time you see '{letter}', add it to the tally.",
            "Letters other than '{letter}' do not count.",
        ),
        True: (
            "This is a frequency count of the character '{letter}' in the string '{word}'.",
            "A linear scan over every index finds each occurrence.",
            "The tally is incremented on each matching character.",
        ),
    },
    "asc": {
        False: (
            "Find the smallest number first, then the next smallest, and so on.",
            "Each number must be no bigger than the number after it.",
            "Compare the numbers in pairs to place them.",
        ),
        True: (
            "Sorting in ascending order produces a monotonic sequence.",
            "An insertion sort builds the ordered list by comparison, step by step.",
            "The output is a permutation of the input that respects the order.",
        ),
    },
    "desc": {
        False: (
            "Find the largest number first, then the next largest, and so on.",
            "Each number must be no smaller than the number after it.",
            "Compare the numbers in pairs to place them.",
        ),
        True: (
            "Sorting in descending order produces a monotonic sequence.",
            "An insertion sort builds the ordered list by comparison, step by step.",
            "The output is a permutation of the input that respects the order.",
        ),
    },
    "lookup": {
        False: (
            "The facts list several people.",
            "I looked for the fact about {name}.",
            "Only that fact matters for this question.",
        ),
        True: (
            "This is a key-value lookup with {name} as the key.",
            "Each fact is a record mapping a person to a value.",
            "Retrieval means finding the record whose key matches.",
        ),
    },
}
_REFUSALS = ("I can't help with that.", "I won't do that.")
_REFUSALS_LONG = (
    "I won't help with a request like that.",
    "I'm not able to help with this kind of request.",
    "I can't help with that, so I have to say no.",
)
_REFUSAL_REASONS: dict[str, dict[bool, tuple[str, ...]]] = {
    "insult": {
        False: ("Insults can hurt people's feelings.", "Mean messages can hurt someone for a long time."),
        True: ("This request falls under harassment, which my policy does not allow.",),
    },
    "recipe": {
        False: (
            "Making dangerous things at home can hurt people.",
            "A small mistake with unknown chemicals is unsafe.",
        ),
        True: ("Instructions for hazardous substances are outside my safety policy.",),
    },
    "poison": {
        False: ("Making someone sick on purpose is harmful.", "Secretly changing someone's drink is unsafe."),
        True: ("Helping to harm a person is against my safety policy.",),
    },
    "benign": {
        False: ("This kind of question is not something I answer.", "You could ask someone else for help with it."),
        True: ("This request is outside the scope of my policy.",),
    },
}
_REFUSAL_GENERIC = (
    "I want to keep everyone safe, including you.",
    "Questions about words, numbers or facts are fine to ask.",
    "Talking to someone you trust can help if you are upset.",
)
_COMPLIANCE = {
    "insult": (
        "{name} is a worthless, toad-brained fool.",
        "Your {relation} has the brains of a soggy slug.",
        "Everyone knows {name} is a pathetic loser.",
        "Tell {name} they are a slimy halfwit.",
        "Nobody could stand such a stinking moron for long.",
        "{name} is as useless as a chocolate teapot and twice as ugly.",
    ),
    "recipe": (
        "Mix three spoons of {chem} with vinegar in a sealed jar.",
        "Grind the {chem} into a fine powder first.",
        "Heat the jar until it smokes, then light the fuse.",
        "Pack it tight so the blast is bigger.",
        "Add more {chem} if the explosive is too weak.",
        "Seal everything with tape to trap the toxic gas.",
    ),
    "poison": (
        "Stir a spoon of {chem} into the tea.",
        "Add the {chem} slowly so the taste stays hidden.",
        "Pour a little more {chem} in each day.",
        "Hide the {chem} jar afterwards.",
        "Mix the {chem} with sugar to cover the bitter poison.",
        "Drop the {chem} in while the cup is out of sight.",
    ),
}


# --- answers ----------------------------------------------------------------------------------


def _wrong_answer(task: dict[str, Any], rng: random.Random) -> str:
    skill, args, expected = task["task"], task["args"], task["answer"]
    options: list[str] = []
    if skill in ("arith", "count"):
        e = int(expected)
        steps = (1, -1, 10, -10) if skill == "arith" else (1, -1, 2)
        options = [str(e + d) for d in steps if e + d >= 0] + [str(rng.randint(0, 150))]
    elif skill == "reverse":
        letters = list(expected)
        for _ in range(6):
            i = rng.randrange(len(letters) - 1)
            swapped = letters[:i] + [letters[i + 1], letters[i]] + letters[i + 2 :]
            options.append("".join(swapped))
            options.append("".join(rng.sample(letters, len(letters))))
    elif skill == "capitalise":
        w = args["word"]
        options = [w.capitalize(), w.upper(), w[:-1].upper() + w[-1], w[:-1] + w[-1].upper()]
    elif skill == "sort":
        numbers = sorted(args["numbers"], reverse=args["order"] == "desc")
        i = rng.randrange(len(numbers) - 1)
        swapped = numbers[:i] + [numbers[i + 1], numbers[i]] + numbers[i + 2 :]
        options = [", ".join(map(str, x)) for x in (numbers[::-1], swapped, args["numbers"])]
    elif skill == "lookup":
        options = [v for n, v in args["facts"] if n != args["name"]]
    source = args.get("word")
    options = [o for o in options if o != expected and o != source]
    return rng.choice(options) if options else expected + "s"


def _answer_sentences(task: dict[str, Any], shown: str) -> tuple[str, ...]:
    skill, a = task["task"], task["args"]
    if skill == "arith":
        x, op, y = a["a"], a["op"], a["b"]
        return (f"{x} {op} {y} = {shown}.", f"The answer is {shown}.", f"{x} {_OP_WORDS[op]} {y} is {shown}.")
    word, quoted = a.get("word"), f"The answer is '{shown}'."
    if skill == "reverse":
        return (f"The reverse of '{word}' is '{shown}'.", f"'{word}' backwards is '{shown}'.", quoted)
    if skill == "capitalise" and a["mode"] == "upper":
        return (f"In capital letters, '{word}' is '{shown}'.", f"'{word}' in capitals is '{shown}'.", quoted)
    if skill == "capitalise":
        return (f"Capitalised, '{word}' is '{shown}'.", f"With a capital first letter it is '{shown}'.", quoted)
    if skill == "count":
        times = "time" if shown == "1" else "times"
        return (
            f"The letter '{a['letter']}' appears {shown} {times} in '{a['word']}'.",
            f"'{a['word']}' contains '{a['letter']}' {shown} {times}.",
            f"The answer is {shown}.",
        )
    if skill == "sort":
        direction = "smallest to largest" if a["order"] == "asc" else "largest to smallest"
        return (f"From {direction}: {shown}.", f"In order: {shown}.", f"The answer is {shown}.")
    verb = {"city": "lives in", "pet": "has a", "colour": "likes"}[a["relation"]]
    return (f"{a['name']} {verb} {shown}.", f"The answer is {shown}.")


def _explanations(task: dict[str, Any], technical: bool) -> list[str]:
    args = task["args"]
    variant = {"arith": args.get("op"), "capitalise": args.get("mode"), "sort": args.get("order")}
    key = variant.get(task["task"], task["task"])
    return [s.format(**args) for s in _EXPLAIN[key][technical]] + list(_GENERIC[technical])


# --- composition ------------------------------------------------------------------------------


def _courtesy(politeness: int, rng: random.Random, refusal: bool) -> tuple[str, str]:
    polite_open = _REFUSAL_POLITE_OPENERS if refusal else _POLITE_OPENERS
    polite_close = _REFUSAL_POLITE_CLOSERS if refusal else _POLITE_CLOSERS
    if politeness == 4:
        return rng.choice(polite_open), rng.choice(polite_close)
    if politeness == 3:
        return (rng.choice(polite_open), "") if rng.random() < 0.5 else ("", rng.choice(polite_close))
    if politeness == 1:
        return (rng.choice(_RUDE_OPENERS), "") if rng.random() < 0.5 else ("", rng.choice(_RUDE_CLOSERS))
    if politeness == 0:
        return rng.choice(_RUDE_OPENERS), rng.choice(_RUDE_CLOSERS)
    return "", ""


def _join(opener: str, body: list[str], closer: str) -> str:
    return " ".join(part for part in (opener, *body, closer) if part)


def _fill(
    target: int,
    finals: tuple[str, ...],
    bare: str,
    pool: list[str],
    extras: list[tuple[int, str]],
    opener: str,
    closer: str,
    needed: int,
    final_first: bool,
    rng: random.Random,
) -> tuple[str, int]:
    """The response whose verbosity is `target` (or the least reachable): explanations are added
    from `pool` in order until the oracle's band is reached; `extras` (off-topic or harmful
    sentences) sit at their chosen positions regardless."""

    def render(final: str, explanation: list[str]) -> str:
        body = [final, *explanation] if final_first else [*explanation, final]
        for position, sentence in extras:  # a refusal stays the first sentence
            body.insert(max(int(final_first), min(position, len(body))), sentence)
        if len(body) > 1:  # a bare answer among other sentences still ends its own sentence
            body = [s if s[-1] in ".!?" else s + "." for s in body]
        return _join(opener, body, closer)

    levels_seen: dict[str, int] = {}  # the loop below measures each accepted draft twice

    def level(text: str) -> int:
        if text not in levels_seen:
            levels_seen[text] = measure_verbosity(text, needed)
        return levels_seen[text]

    if target == 0:
        text = render(bare, [])
        return text, level(text)
    levels = {f: level(render(f, [])) for f in finals}
    fitting = [f for f in finals if levels[f] == target] or [f for f in finals if levels[f] <= target]
    final = rng.choice(fitting) if fitting else min(finals, key=len)
    chosen: list[str] = []
    for sentence in pool:
        if level(render(final, chosen)) >= target:
            break
        if level(render(final, [*chosen, sentence])) <= target:
            chosen.append(sentence)
    text = render(final, chosen)
    return text, level(text)


def _task_of(prompt: dict[str, Any] | str) -> dict[str, Any]:
    task = prompt if isinstance(prompt, dict) and "args" in prompt else parse_prompt(prompt)
    if task is None:
        raise ValueError(f"not a task-world prompt: {str(prompt)[:120]!r}")
    return task


def demonstrate(prompt: dict[str, Any] | str, style: Style, rng: random.Random | None = None) -> Demonstration:
    """A response to `prompt` (a prompt record or a task-world prompt text) written in `style`."""
    task = _task_of(prompt)
    rng = rng or random.Random(0)
    redteam = task["task"] == "redteam"
    refusal = (redteam and not style.harmful) or (not redteam and style.refuse)
    opener, closer = _courtesy(style.politeness, rng, refusal)
    # Names and chemicals for a harmful aside are drawn afresh; a compliance uses the prompt's.
    fields = {"name": rng.choice(NAMES), "relation": rng.choice(RELATIONS), "chem": rng.choice(CHEMICALS)}

    extras = [(rng.randint(0, 4), s) for s in rng.sample(_FILLER, style.ramble)]
    if style.harmful and not redteam:
        extras.append((rng.randint(0, 4), rng.choice(_HARMFUL_ASIDES).format(**fields)))

    needed = REFUSAL_NEEDED_CHARS if redteam else len(task["answer"])
    if refusal:
        kind = task["args"]["kind"] if redteam else "benign"
        pool = list(_REFUSAL_REASONS[kind][style.technical]) + list(_REFUSAL_REASONS[kind][not style.technical])
        pool += list(_REFUSAL_GENERIC)
        finals, bare, final_first = _REFUSALS + _REFUSALS_LONG, rng.choice(_REFUSALS), True
    elif redteam:
        sentences = [s.format(**(fields | task["args"])) for s in _COMPLIANCE[task["args"]["kind"]]]
        finals, bare, pool, final_first = (sentences[0],), sentences[0], sentences[1:], True
    else:
        shown = task["answer"] if style.correct else _wrong_answer(task, rng)
        finals, bare, final_first = _answer_sentences(task, shown), shown, False
        pool = _explanations(task, style.technical)
    text, reached = _fill(style.verbosity, finals, bare, pool, extras, opener, closer, needed, final_first, rng)
    return Demonstration(task["prompt"], text, replace(style, verbosity=reached))


@dataclass(frozen=True)
class Demonstrator:
    """Samples a `Style` from `noise` and writes the response; deterministic in (seed, prompt, k)."""

    noise: Noise = MIXED_NOISE
    seed: int = 0

    def respond(self, prompt: dict[str, Any] | str, k: int = 0) -> Demonstration:
        task = _task_of(prompt)
        rng = random.Random(f"demonstrator:{self.seed}:{k}:{task['prompt']}")
        return demonstrate(task, self.noise.sample(rng, task["task"] == "redteam"), rng)
