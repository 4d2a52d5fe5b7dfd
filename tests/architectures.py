"""Tiny random-init models of the architectures alignkit supports, saved as Hugging Face directories
the way users bring them: each with a tokenizer, some without a chat template or a pad token, and
a generation config that ends a turn at a token of its own besides the tokenizer's EOS (Gemma's
<end_of_turn>, Llama-3's <|eot_id|>).

Used by tests/recipes/test_architectures.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken
from transformers import PreTrainedTokenizerBase

from alignkit.models.loading import save_causal_lm
from alignkit.models.tokenizer import CHAT_TEMPLATE, byte_tokenizer
from tests.conftest import tiny_model

END_OF_TURN = "<end_of_turn>"
MAX_POSITIONS = 512  # GPT-2's learned position table has exactly this many rows
# Gemma2 and Mistral attend within a window (4096 in the real models); a small one makes the test
# prompts and packed rows cross it.
SLIDING_WINDOW = 16

# Turns end with END_OF_TURN, as Gemma's and Llama-3's templates end them with a token that is not EOS.
END_OF_TURN_TEMPLATE = CHAT_TEMPLATE.replace("'</s>'", f"'{END_OF_TURN}'")


@dataclass(frozen=True)
class Variant:
    template: str | None  # the tokenizer's chat template; None: a base model without one
    pad: bool  # whether the tokenizer has a pad token of its own (else alignkit pads with EOS)


# Every (template, pad) combination occurs; Mistral's turns end with EOS while it has no pad token,
# so a reward model reads "pad" tokens at the end of each text (scored at the last non-pad token).
ARCHITECTURES: dict[str, Variant] = {
    "llama": Variant(END_OF_TURN_TEMPLATE, pad=False),
    "mistral": Variant(CHAT_TEMPLATE, pad=False),
    "qwen3": Variant(END_OF_TURN_TEMPLATE, pad=True),
    "gemma2": Variant(END_OF_TURN_TEMPLATE, pad=True),
    "qwen2": Variant(None, pad=True),
    "gpt2": Variant(None, pad=False),
}

# The override that gives a model without a template alignkit's (a Jinja value is taken as written).
TEMPLATE_OVERRIDE = f"data.chat_template={CHAT_TEMPLATE}"


def arch_tokenizer(variant: Variant) -> PreTrainedTokenizerBase:
    """The byte tokenizer plus END_OF_TURN (id 263), with the variant's template and pad token."""
    tokenizer = byte_tokenizer()
    tokenizer.add_tokens([AddedToken(END_OF_TURN, special=True, normalized=False)], special_tokens=True)
    tokenizer.chat_template = variant.template
    if not variant.pad:
        tokenizer.pad_token = None
    return tokenizer


def save_architecture(architecture: str, out: Path, seed: int = 0) -> Path:
    """A 2-layer, 32-wide random `architecture` saved at `out` with its tokenizer; its generation
    config stops at EOS and at END_OF_TURN; Gemma2 and Mistral attend within SLIDING_WINDOW."""
    tokenizer = arch_tokenizer(ARCHITECTURES[architecture])
    model = tiny_model(tokenizer, architecture, seed=seed, max_position_embeddings=MAX_POSITIONS)
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, end_of_turn]
    if architecture in ("gemma2", "mistral"):
        model.config.sliding_window = SLIDING_WINDOW
    return save_causal_lm(model, model.state_dict(), tokenizer, out)
