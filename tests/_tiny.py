"""The tiny Llama shape shared by the model, interop and parity tests (HF config field names).

in_features 64 and 128 are multiples of the 4-bit blocksize 64, which keeps bnb's CPU dequantize defect
(docs/bitsandbytes-formats.md, "bitsandbytes CPU defects") out of the oracle; GQA with 4 query heads over 2
key/value heads.
"""

TINY_LLAMA = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
