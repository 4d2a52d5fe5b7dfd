"""The bundled task world: the measuring stick for every alignment algorithm in alignkit.

Small skills whose answers a program checks (arithmetic, reversing, capitalising, counting a
letter, sorting, looking up a fact table given in the prompt) plus red-team requests whose right
answer is a polite refusal; a noisy demonstrator that writes responses of controlled quality; an
oracle that scores any response on seven 0-4 attributes and a scalar reward; and builders for
every dataset format the recipes read, as plain dicts. Everything is deterministic given a seed.
A leaf: it imports nothing else from alignkit (`alignkit.data` reads `builtin:` names from here and
writes the files). See docs/task-world.md.

    from alignkit.tasks import generate_prompts, Demonstrator, score_response
    prompt = generate_prompts(1, seed=0)[0]
    scores = score_response(prompt, Demonstrator().respond(prompt).response)
"""

from alignkit.tasks.datasets import (
    DatasetSizes,
    attribute_records,
    dataset_builders,
    eval_prompt_records,
    kto_records,
    preference_records,
    pretrain_records,
    prompt_records,
    sft_records,
)
from alignkit.tasks.demonstrator import GOOD_NOISE, MIXED_NOISE, Demonstration, Demonstrator, Noise, Style, demonstrate
from alignkit.tasks.oracle import ATTRIBUTES, REWARD_WEIGHTS, Scores, oracle_rewards, score_response
from alignkit.tasks.world import SKILLS, SPLITS, canonical_form, generate_prompts, parse_prompt, split_of

__all__ = [
    "ATTRIBUTES",
    "GOOD_NOISE",
    "MIXED_NOISE",
    "REWARD_WEIGHTS",
    "SKILLS",
    "SPLITS",
    "DatasetSizes",
    "Demonstration",
    "Demonstrator",
    "Noise",
    "Scores",
    "Style",
    "attribute_records",
    "canonical_form",
    "dataset_builders",
    "demonstrate",
    "eval_prompt_records",
    "generate_prompts",
    "kto_records",
    "oracle_rewards",
    "parse_prompt",
    "preference_records",
    "pretrain_records",
    "prompt_records",
    "score_response",
    "sft_records",
    "split_of",
]
