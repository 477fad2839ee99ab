"""Text generation with a KV cache: prefill, then a jitted decode loop; greedy or sampled.

``generate(model, prompt_ids, SamplingConfig(...))`` decodes from any ``oftjax.models.CausalLM`` (float, int8
or 4-bit base, with any active OFT adapters). Prompts of different lengths are left-padded to a length
bucket; the cache has a static shape, so decoding compiles once per batch size and cache length. Chat
prompts are rendered by the application (``oftjax.chat_data``) with the checkpoint's chat template.
"""

from oftjax.generate._decode import GenerationResult as GenerationResult
from oftjax.generate._decode import generate as generate
from oftjax.generate._decode import prompt_bucket as prompt_bucket
from oftjax.generate._sampling import SamplingConfig as SamplingConfig
from oftjax.generate._sampling import sample_logits as sample_logits

__all__ = ["GenerationResult", "SamplingConfig", "generate", "prompt_bucket", "sample_logits"]
