"""The generator graph written by hand on ONNX Runtime's fused operators, for Llama-layout decoders.

torch.onnx spells every RMSNorm, rotary embedding and attention out in primitive nodes (~90 per layer in
fp32); at batch 1 ONNX Runtime spends much of a decode step dispatching them, not multiplying. This
builder writes the same function from the model's weights with ~28 nodes per layer (16 without LoRA branches):

    h0 = inputs_embeds
    per layer l:  x  = SimplifiedLayerNormalization(h)            (SkipSimplified... fuses the residual add)
                  q, k, v = x @ Wq, x @ Wk, x @ Wv  (+ biases, + LoRA branches x @ A @ (s * B))
                  q, k = RotaryEmbedding(q, position_ids), RotaryEmbedding(k, position_ids)
                  a, present_key_l, present_value_l = GroupQueryAttention(q, k, v, past_key_l, past_value_l,
                                                                          padding bias from attention_mask)
                  h = h + a @ Wo;  x = RMSNorm(h);  h = h + (silu(x @ Wg) * (x @ Wu)) @ Wd
    logits = RMSNorm(h[:, -1]) @ W_lm_head

Inputs and outputs are the traced generator's (`onnx_export`): inputs_embeds [B, T, H], attention_mask
[B, P+T] (left padding allowed), position_ids [B, T], past_key_i / past_value_i [B, kv, P, D] -> logits [B, V],
present_key_i / present_value_i [B, kv, P+T, D]. GroupQueryAttention applies causality itself; the padding
mask enters as an additive bias, and every row counts all P+T positions, so left padding works as in the
traced graph. Rotary tables come from the model's own rotary module (any RoPE scaling it implements).
Weights are plain fp32 MatMuls here; `quantize.quantize_graph` turns them into MatMulNBits as for traced graphs.

Covered: decoders whose layers hold self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj and two RMSNorms with
SiLU (Llama, SmolLM, Qwen2, Mistral without an active sliding window). Others keep the traced graph.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from clara_edge.model import ClaraModel

FAMILIES = ("llama", "qwen2", "mistral")
MS = "com.microsoft"
_PAD_BIAS = -1e9  # added to the scores of padded keys (finite: fully padded query rows stay NaN-free)


FUSED_LORA_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def fused_support(model: ClaraModel) -> str | None:
    """None when the builder covers this model's base, else why not (the export then traces the generator)."""
    cfg = model.lm.get_base_model().config
    if cfg.model_type not in FAMILIES:
        return f"model type {cfg.model_type!r} (fused graphs cover {', '.join(FAMILIES)})"
    if getattr(cfg, "hidden_act", "silu") != "silu" or getattr(cfg, "mlp_bias", False):
        return "an MLP other than bias-free SiLU"
    if model.sliding_window:
        return f"a sliding window of {model.sliding_window} positions"
    adapted = {name.rsplit(".", 1)[-1] for name, module in model.lm.named_modules() if hasattr(module, "lora_A")}
    if adapted - FUSED_LORA_TARGETS:  # the builder reads base weights elsewhere: their LoRA would be dropped
        return f"LoRA on {', '.join(sorted(adapted - FUSED_LORA_TARGETS))}"
    return None


class _GraphWriter:
    """Nodes and initializers of one graph, with fresh names."""

    def __init__(self) -> None:
        self.nodes: list = []
        self.initializers: list = []
        self._count = 0

    def const(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, outputs: list[str] | None = None,
           domain: str = "", **attrs) -> list[str]:
        from onnx import helper

        self._count += 1
        outputs = outputs or [f"{op_type.lower()}_{self._count}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=f"{op_type}_{self._count}",
                                           domain=domain, **attrs))
        return outputs


def _weight(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy()


def _linear(g: _GraphWriter, x: str, module: nn.Module, name: str, role: str, merge: bool) -> str:
    """x @ W^T (+ bias) (+ the role's LoRA branch, or merged into W).

    One MatMul per module, its weight bytes equal to the traced encoders' so the export stores them once
    (packing q / k / v into one MatMul measured no faster and would cost a private copy)."""
    base = getattr(module, "base_layer", module)
    weight = _weight(base.weight)  # [out, in]
    lora = role in getattr(module, "lora_A", {})
    if lora:
        a = _weight(module.lora_A[role].weight)  # [r, in]
        b = _weight(module.lora_B[role].weight) * float(module.scaling[role])  # [out, r]
        if merge:
            weight = weight + b @ a
    merged = f".merged.{role}" if lora and merge else ""  # the quantiser keeps merged weights at 8 bits
    (y,) = g.op("MatMul", [x, g.const(f"{name}.weight{merged}", weight.T)])
    if lora and not merge:
        (low,) = g.op("MatMul", [x, g.const(f"{name}.lora_A.{role}", a.T)])
        (delta,) = g.op("MatMul", [low, g.const(f"{name}.lora_B.{role}", b.T)])
        (y,) = g.op("Add", [y, delta])
    if base.bias is not None:
        (y,) = g.op("Add", [y, g.const(f"{name}.bias", _weight(base.bias))])
    return y


def _rotary_cache(causal: nn.Module, positions: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """cos / sin [positions, head_dim / 2] from the model's rotary module (rotate-half layout)."""
    probe = torch.zeros(1, 1, head_dim)
    with torch.no_grad():
        cos, sin = causal.model.rotary_emb(probe, torch.arange(positions)[None])
    cos, sin = cos[0].float().numpy(), sin[0].float().numpy()
    half = head_dim // 2
    if cos.shape[-1] != head_dim or not np.allclose(cos[:, :half], cos[:, half:]):
        raise ValueError("rotary tables are not in rotate-half layout")
    return cos[:, :half], sin[:, :half]


def build_generator(model: ClaraModel, role: str = "generator", lora: str = "shared"):
    """The generator ModelProto (fp32 weights) for a model `fused_support` accepts."""
    from onnx import TensorProto, helper

    causal = model.lm.get_base_model()
    cfg = causal.config
    layers = causal.model.layers
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    eps = float(cfg.rms_norm_eps)
    merge = lora == "merged"
    g = _GraphWriter()

    # graph-wide tensors: padding bias [B, 1, T, P+T], per-row lengths, rotary tables
    (mask_shape,) = g.op("Shape", ["attention_mask"])
    (emb_shape,) = g.op("Shape", ["inputs_embeds"])
    one = g.const("one_i64", np.array([1], np.int64))
    (batch,) = g.op("Slice", [mask_shape, g.const("zero_i64", np.array([0], np.int64)), one])
    (total,) = g.op("Slice", [mask_shape, one, g.const("two_i64", np.array([2], np.int64))])
    (step,) = g.op("Slice", [emb_shape, one, "two_i64"])
    (maskf,) = g.op("Cast", ["attention_mask"], to=TensorProto.FLOAT)
    (pad,) = g.op("Sub", [maskf, g.const("one_f32", np.array(1, np.float32))])
    (pad,) = g.op("Mul", [pad, g.const("pad_scale", np.array(-_PAD_BIAS, np.float32))])
    (pad,) = g.op("Unsqueeze", [pad, g.const("axes_1_2", np.array([1, 2], np.int64))])
    (bias_shape,) = g.op("Concat", [batch, one, step, total], axis=0)
    (bias,) = g.op("Expand", [pad, bias_shape])
    (total32,) = g.op("Cast", [total], to=TensorProto.INT32)
    (last32,) = g.op("Sub", [total32, g.const("one_i32", np.array([1], np.int32))])
    (seqlens,) = g.op("Expand", [last32, batch])
    (total_scalar,) = g.op("Squeeze", [total32, g.const("axis_0", np.array([0], np.int64))])
    cos, sin = _rotary_cache(causal, model.fixed_rope_positions, head_dim)
    cos_name, sin_name = g.const("rotary.cos", cos), g.const("rotary.sin", sin)

    def rotary(x: str, heads: int) -> str:
        return g.op("RotaryEmbedding", [x, "position_ids", cos_name, sin_name], domain=MS, num_heads=heads,
                    interleaved=0)[0]

    hidden = "inputs_embeds"
    residual = None  # the residual stream's pending update (attention or MLP output)
    for i, layer in enumerate(layers):
        prefix = f"layers.{i}"
        attn, mlp = layer.self_attn, layer.mlp
        for norm, module in (("input_layernorm", layer.input_layernorm), ("post_attention_layernorm",
                                                                          layer.post_attention_layernorm)):
            gamma = g.const(f"{prefix}.{norm}", _weight(module.weight))
            if residual is None:
                (x,) = g.op("SimplifiedLayerNormalization", [hidden, gamma], axis=-1, epsilon=eps)
            else:
                x, _, _, hidden = g.op("SkipSimplifiedLayerNormalization", [residual, hidden, gamma], n_out=4,
                                       domain=MS, epsilon=eps)
            if norm == "input_layernorm":
                q, k, v = (_linear(g, x, proj, f"{prefix}.{kind}_proj", role, merge)
                           for kind, proj in (("q", attn.q_proj), ("k", attn.k_proj), ("v", attn.v_proj)))
                out, _, _ = g.op("GroupQueryAttention",
                                 [rotary(q, n_heads), rotary(k, n_kv), v, f"past_key_{i}", f"past_value_{i}", seqlens,
                                  total_scalar, "", "", "", bias],
                                 outputs=[f"attn_{i}", f"present_key_{i}", f"present_value_{i}"],
                                 domain=MS, num_heads=n_heads, kv_num_heads=n_kv, scale=1.0 / math.sqrt(head_dim))
                residual = _linear(g, out, attn.o_proj, f"{prefix}.o_proj", role, merge)
            else:
                gate = _linear(g, x, mlp.gate_proj, f"{prefix}.gate_proj", role, merge)
                up = _linear(g, x, mlp.up_proj, f"{prefix}.up_proj", role, merge)
                (act,) = g.op("Sigmoid", [gate])
                (act,) = g.op("Mul", [gate, act])
                (act,) = g.op("Mul", [act, up])
                residual = _linear(g, act, mlp.down_proj, f"{prefix}.down_proj", role, merge)
    # logits of the last position only
    start, end = g.const("last", np.array([-1], np.int64)), g.const("end", np.array([np.iinfo(np.int64).max]))
    last = [g.op("Slice", [t, start, end, one])[0] for t in (residual, hidden)]
    x, _, _, _ = g.op("SkipSimplifiedLayerNormalization", [*last, g.const("norm", _weight(causal.model.norm.weight))],
                      n_out=4, domain=MS, epsilon=eps)
    (logits,) = g.op("MatMul", [x, g.const("lm_head.weight", _weight(causal.get_output_embeddings().weight).T)])
    g.op("Squeeze", [logits, g.const("axis_1", np.array([1], np.int64))], outputs=["logits"])

    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    kv_in = [helper.make_tensor_value_info(f"past_{kind}_{i}", f32, ["batch", n_kv, "past", head_dim])
             for i in range(len(layers)) for kind in ("key", "value")]
    kv_out = [helper.make_tensor_value_info(f"present_{kind}_{i}", f32, ["batch", n_kv, "total", head_dim])
              for i in range(len(layers)) for kind in ("key", "value")]
    inputs = [helper.make_tensor_value_info("inputs_embeds", f32, ["batch", "seq", cfg.hidden_size]),
              helper.make_tensor_value_info("attention_mask", i64, ["batch", "total"]),
              helper.make_tensor_value_info("position_ids", i64, ["batch", "seq"]), *kv_in]
    vocab = causal.get_output_embeddings().weight.shape[0]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch", vocab]), *kv_out]
    graph = helper.make_graph(g.nodes, "clara_generator_fused", inputs, outputs, g.initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(MS, 1)],
                             producer_name="clara-edge", ir_version=10)
