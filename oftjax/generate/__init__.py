"""Text generation with a KV cache: prefill, then a jitted decode loop; greedy or sampled.

``generate(model, prompt_ids, SamplingConfig(...))`` decodes from any ``oftjax.models.CausalLM`` (float, int8
or 4-bit base, with any active OFT adapters). Prompts of different lengths are left-padded to a length
bucket; the cache has a static shape, so decoding compiles once per batch size and cache length. Chat
prompts are rendered with the checkpoint's chat template (``chat_prompt_ids`` over an
``oftjax.chat_data.ChatTokenizer``); ``stop_token_ids`` reads the checkpoint's eos ids; ``TextStream``
turns streamed tokens into text (``oftjax/generate/_prompts.py``). How it all works: docs/generation.md.
"""

from oftjax.generate._decode import GenerationResult as GenerationResult
from oftjax.generate._decode import generate as generate
from oftjax.generate._decode import prompt_bucket as prompt_bucket
from oftjax.generate._prompts import TextStream as TextStream
from oftjax.generate._prompts import chat_prompt_ids as chat_prompt_ids
from oftjax.generate._prompts import decode_ids as decode_ids
from oftjax.generate._prompts import stop_token_ids as stop_token_ids
from oftjax.generate._sampling import SamplingConfig as SamplingConfig
from oftjax.generate._sampling import sample_logits as sample_logits

__all__ = [
    "GenerationResult",
    "SamplingConfig",
    "TextStream",
    "chat_prompt_ids",
    "decode_ids",
    "generate",
    "prompt_bucket",
    "sample_logits",
    "stop_token_ids",
]
