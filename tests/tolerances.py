"""The one table of numerical tolerances used by the tests, each with its reason.

Exact comparisons (bits) do not appear here: they use ``np.testing.assert_array_equal`` on bit views.
"""

from __future__ import annotations

from typing import NamedTuple


class Tol(NamedTuple):
    rtol: float
    atol: float
    reason: str


TOL: dict[str, Tol] = {
    "fp32_forward": Tol(
        1e-5, 1e-6, "fp32 matmul accumulation order differs between XLA and torch (~1e-6 rel)"
    ),
    "fp32_grad": Tol(1e-4, 1e-6, "gradients pass through two matmuls and a solve/series; order-of-ops noise"),
    "fp32_rotation_grad": Tol(
        1e-4,
        1e-6,
        "rotation gradients are sums over tokens and features of terms as large as the array's max |value|: "
        "their absolute rounding error scales with it, so atol is times max(1, max |expected|) (1-2 of 2016 "
        "near-zero entries missed a fixed 1e-6 by 3e-7 when XLA's threaded GEMMs summed in another order)",
    ),
    "bf16_forward": Tol(1e-2, 1e-2, "1-2 bf16 ulps (2^-8) from accumulation order on O(1) outputs"),
    "fp16_forward": Tol(2e-3, 2e-3, "1-2 fp16 ulps (2^-11) from accumulation order on O(1) outputs"),
    # oftjax.oft core
    "oft_rotation_fp32": Tol(1e-5, 1e-6, "fp32 Cayley solve / Neumann matmuls: LAPACK/MKL vs XLA op order"),
    "oft_orthogonality_fp32": Tol(0.0, 2e-6, "exact Cayley R R^T - I in fp32: a b x b solve, error ~b*2^-24"),
    "oft_blockwise_vs_dense": Tol(1e-6, 1e-6, "blockwise einsum vs dense matmul, same products, other order"),
    "oft_neumann_vs_f64": Tol(1e-6, 1e-6, "fp32 series vs a float64 numpy evaluation of the same formula"),
    "oft_neumann_limit": Tol(0.0, 2e-6, "t=40 Neumann vs exact Cayley^T, ||Q||_F <= 0.5: truncation << fp32"),
    "oft_unmerge_roundtrip": Tol(1e-5, 1e-5, "merge+unmerge, O(1) weights: fp32 inverse, two block matmuls"),
    "oft_coft_norm": Tol(1e-6, 0.0, "projected skew-block norm equals eps/sqrt(R) up to fp32 rounding"),
    "bf16_model_forward": Tol(
        5e-2,
        5e-2,
        "bf16 compute through a 2-layer decoder vs fp32: bf16 rounding (2^-8) at every matmul input",
    ),
    # training
    "grad_accum": Tol(
        1e-5, 1e-6, "k micro-batches sum per-token losses/grads in another order than one batch (fp32 sums)"
    ),
    "sharded_step": Tol(
        1e-5, 1e-6, "cross-device all-reduce of grads and loss sums in a different order than one device"
    ),
    # oftjax.nn / merge
    "requant_int8": Tol(
        1e-2,
        0.0,
        "budget: int8 requantization of a rotated weight, rel. Frobenius, ~6e-3 "
        '(docs/peft-oft.md, "Merging and unmerging")',
    ),
    "requant_4bit": Tol(
        0.2,
        0.0,
        "budget: NF4/FP4 requantization of a rotated weight, rel. Frobenius, 0.07-0.12 "
        '(docs/peft-oft.md, "Merging and unmerging")',
    ),
    "rotate_paths": Tol(
        1e-4,
        1e-5,
        "x(BD K) vs (xBD)K: two fp32 matmul chains summed in different orders; arrays scaled by max|ref|",
    ),
    "e2e_logits_cpu": Tol(
        2e-5,
        2e-6,
        "2-layer bnb nf4+DQ Llama + OFT, fp32, CPU torch vs XLA: same dequantized weights; matmul and "
        "Neumann-series accumulation order (measured max abs 5e-7 on O(1) logits)",
    ),
    "e2e_logits_cuda": Tol(
        1e-3, 1e-4, "as e2e_logits_cpu but torch on CUDA: cuBLAS fp32 GEMM order and fused 4-bit gemv kernels"
    ),
    "attention_grad_bf16": Tol(
        3e-2,
        3e-2,
        "bf16 q/k/v and cotangent products vs fp32 ones, scaled by max|ref|: a few bf16 ulps (2^-8) per "
        "matmul input in causal_attention's hand-written backward",
    ),
    "native_rotate": Tol(
        1e-5,
        1e-6,
        "csrc/rotate.cc vs a float64 evaluation: fp32 sums of b products (x BD, g BD^T) or of tokens x b "
        "products in fixed 128-token chunks (dR), with fused multiply-adds; atol x max(1, max |expected|)",
    ),
    "native_cayley": Tol(
        1e-5,
        1e-6,
        "csrc/rotate.cc's Cayley-Neumann series vs float64: fp32 b x b products summed in k order with fused "
        "multiply-adds, up to 6 powers (measured <= 2e-7 x max |expected|, as XLA's own); atol x that max",
    ),
    "native_attention": Tol(
        1e-5,
        1e-6,
        "csrc/attention.cc vs float64: fp32 scores, a polynomial exp (~1 ulp), softmax and products summed "
        "in tile order with fused multiply-adds (measured <= 1e-6 x max |expected|); atol x that max",
    ),
    "swiglu": Tol(
        1e-5,
        1e-6,
        "float32 silu and its derivative (XLA's logistic, a few ulps) vs float64, times O(1) cotangents",
    ),
    "fused_head_loss": Tol(
        1e-5, 1e-6, "head products and loss sums per chunk of positions vs one product and one fp32 sum"
    ),
    "fused_head_grad_bf16": Tol(
        0.0,
        2e-2,
        "bf16 hidden-state gradients: bf16 cotangent x table products rounded per chunk vs at once; a few "
        "bf16 ulps (2^-8) of the largest gradient; atol x max |ref|",
    ),
    "dequant_absmax_grad": Tol(
        1e-6, 1e-7, "fp32 sum of 64 code*g products per block: XLA reduction order vs numpy's pairwise sum"
    ),
}
TOL["quant_rms_golden"] = Tol(
    0.01,
    0.0,
    "relative-RMS quantization error of a format on fixed-seed data is a golden value; 1% leaves room for "
    "platform RNG/libm differences, far below the gaps between formats (nf4 vs fp4 differ by 30%)",
)
TOL["family_logits_fp32"] = Tol(
    1e-4,
    0.0,
    "fp32 logits of two-layer models at real widths (dot products of up to 16,384 terms) and vocabularies, "
    "XLA vs torch: accumulation order and tanh/exp/sin/cos rounding, through soft-capping and 4-bit layers; "
    "the error is measured against max |logit| (observed around 1e-6 of it)",
)
TOL["finite_difference"] = Tol(
    3e-2,
    3e-3,
    "a float32 central difference, step 1e-3: truncation ~1e-6 relative, rounding ~2^-24 / 1e-3 ~ 6e-5 of "
    "the output's scale per evaluation, amplified where the function is steep; catches a wrong tangent rule "
    "(an O(1) error), not rounding",
)
TOL["llm_int8_f32"] = Tol(
    1e-5,
    1.0,
    "LLM.int8 (bnb eval int8 forward) vs bitsandbytes, float32: the activation quantization, the int32 "
    "products and the rescale are bit-exact; the float parts (outlier columns, an OFT rotation before the "
    "quantization) sum in another order (rtol). An input rounded differently before quantization moves its "
    "int8 code by at most one step SCA_i / 127, so output (i, j) by at most SCA_i / 127 * max_k |W_jk|: atol "
    "counts these steps (one)",
)
TOL["llm_int8_bf16"] = Tol(
    2.0**-8,
    1.0,
    "as llm_int8_f32 with bfloat16 activations and outputs: the outlier matmul accumulates in float32 on "
    "both sides and rounds once to bfloat16, which another summation order can move by one bfloat16 step "
    "(2^-8 relative); atol: one activation quantization step",
)
TOL["llm_int8_logits"] = Tol(
    1e-5,
    1e-5,
    "2-layer Llama from an 8-bit checkpoint, eval mode (LLM.int8) vs transformers' eval int8 forward, "
    "fp32: the int8 parts are bit-exact, the float parts (attention, norms, lm_head, outlier columns) differ "
    "in fp32 summation order (measured 2.4e-7 x max |logit|); that noise flips an int8 code only for a value "
    "within ~1e-7 of a rounding midpoint, which would cost one activation step (~3e-3 x max |logit|). atol "
    "is x max |logit|; the train-mode forward is 1e-2 away (the test checks both)",
)
TOL["greedy_near_tie"] = Tol(
    0.0,
    1e-4,
    "greedy decoding compared token by token: where the reference's two largest float32 logits are within "
    "1e-4 of each other, the other side's last-ulp differences (accumulation order, a cache vs a whole "
    "sequence) may pick the other token, and every later token may then differ; only such a divergence is "
    "allowed (and reported)",
)
TOL["merge_logits_fp32"] = Tol(
    1e-5,
    0.0,
    "oftjax merge, float base, fp32: the merged weight W BD^T is computed once in fp32 where the unmerged "
    "model rotates the inputs (x BD) W^T at every call; the two orders of the same products differ by fp32 "
    "rounding (a few 1e-7 of max |logit| through a two-layer model); relative to max |logit|",
)
TOL["merge_requantized"] = Tol(
    2.0,
    0.0,
    "oftjax merge, quantized base: the merged weights are requantized (every element moves by up to half a "
    "quantization step, as when the float base was quantized), so merged vs unmerged logits differ by about "
    "what quantizing the float base changed them (bnb's quantized base vs the float one); rtol is that "
    "multiple, relative to max |logit| on both sides",
)
TOL["greedy_near_tie_bf16"] = Tol(
    2.0**-6,
    0.0,
    "greedy_near_tie for bfloat16 models: their logits are bfloat16 numbers (steps of 2^-8 to 2^-7 of the "
    "value) and two implementations' logits differ by a step or two (accumulation order, then rounding); "
    "a top-2 gap within 2^-6 of the top logit (two to four steps) is a near tie",
)
TOL["matmul4"] = Tol(
    1e-5,
    1e-6,
    "csrc/matmul4.cc vs the dot of the dequantized weight: the same float32 products summed in another order "
    "(16 lanes, fused multiply-adds, a pairwise reduction) over K terms; atol is times max(1, max_n sum_k "
    "|x_k w_nk|), the scale of a dot product's rounding error",
)
