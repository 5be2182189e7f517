"""Weight quantisation of exported ONNX graphs (onnxruntime.quantization) and of the embedding table.

    fp32  as exported
    fp16  every float weight and activation in fp16 (graph inputs / outputs stay fp32: keep_io_types)
    int8  every constant-weight MatMul -> MatMulNBits, 8 bit, block 32, accuracy_level 4
    int4  transformer linears -> MatMulNBits 4 bit (block 32, accuracy_level 4); lm_head and the LoRA
          matrices 8 bit (lm_head is the most sensitive layer; LoRA B's K = r is below one block)

Blocks run along K (the input dimension), asymmetric with a zero point per block, plus an exact per-block
offset correction (`correct_block_offsets`). The embedding table is int8 with an fp16 scale per 32 values for
int8 / int4 exports, fp16 for fp16, fp32 for fp32.
"""
from __future__ import annotations

import logging

import numpy as np

QUANTS = ("fp32", "fp16", "int8", "int4")
BLOCK_SIZE = 32
ACCURACY_LEVEL = 4  # MatMulNBits: int8 activations, int32 accumulation (fastest CPU path)
_NAME_SCOPES = "pkg.torch.onnx.name_scopes"  # node metadata written by the torch.onnx (dynamo) exporter


def _scope(node) -> str:
    return next((p.value for p in node.metadata_props if p.key == _NAME_SCOPES), "")


def weight_matmuls(model, lora_r: int | None = None, vocab_size: int | None = None) -> dict[str, str]:
    """MatMul nodes with a constant weight -> 'lora' | 'lm_head' | 'merged' | 'linear'.

    Read off the exporter's name scopes or the weight's name; otherwise (a written traced export) by shape: a
    LoRA matrix has the rank as one dimension, the lm_head the vocabulary as its output dimension. 'merged':
    a base weight with a LoRA merged into it (`onnx_fused` names those `*.merged.<role>`).
    """
    consts = {t.name: t for t in model.graph.initializer}
    kinds = {}
    for node in model.graph.node:
        if node.op_type != "MatMul" or len(node.input) < 2 or node.input[1] not in consts:
            continue
        scope, dims, name = _scope(node), list(consts[node.input[1]].dims), node.input[1]
        if scope:
            lora, head = "lora_A" in scope or "lora_B" in scope, "lm_head" in scope
        else:  # `onnx_fused` names its weights after the modules; torch.onnx's written names say nothing
            lora = "lora_A" in name or "lora_B" in name or lora_r in dims[-2:]
            head = "lm_head" in name or (bool(dims) and dims[-1] == vocab_size)
        kinds[node.name] = "lora" if lora else "lm_head" if head else "merged" if ".merged." in name else "linear"
    return kinds


def _nbits(model, bits: int, exclude: set[str], accuracy_level: int):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=BLOCK_SIZE, is_symmetric=False,
                                     accuracy_level=accuracy_level, nodes_to_exclude=sorted(exclude))
    quantizer.process()
    return quantizer.model.model


def _dequantize_nbits(node, tensors: dict) -> np.ndarray:
    """A MatMulNBits node's weight as it computes it, [K, N] fp32: (q - zero_point) * scale per block."""
    from onnx import numpy_helper

    attr = {a.name: a.i for a in node.attribute}
    k, n, bits, block = attr["K"], attr["N"], attr["bits"], attr["block_size"]
    packed = numpy_helper.to_array(tensors[node.input[1]])  # [N, blocks, block * bits / 8]
    blocks = packed.shape[1]
    scales = numpy_helper.to_array(tensors[node.input[2]]).reshape(n, blocks).astype(np.float32)
    if bits == 4:
        q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, blocks, -1)
    else:
        q = packed.reshape(n, blocks, -1)
    if len(node.input) > 3 and node.input[3]:
        zp = numpy_helper.to_array(tensors[node.input[3]]).reshape(n, -1)
        if bits == 4:
            zp = np.stack([zp & 0x0F, zp >> 4], axis=-1).reshape(n, -1)
        zp = zp[:, :blocks].astype(np.float32)
    else:
        zp = np.full((n, blocks), 2 ** (bits - 1), np.float32)
    w = (q[:, :, :block].astype(np.float32) - zp[:, :, None]) * scales[:, :, None]
    return w.reshape(n, -1)[:, :k].T


def correct_block_offsets(model, originals: dict[str, np.ndarray]):
    """Give every MatMulNBits node an exact per-block offset: y += blocksum(x) @ R, R [K/block, N].

    Integer zero points cannot place a block's grid anywhere, so rounding them leaves each block with a
    constant offset error. For weights that were already block-quantised with a float offset (every gguf
    Q4_1 / Q5_1 base, the built-in default included) the re-quantised grid matches the original one except
    for that offset, and it is the whole error: a systematic bias per block, far worse than its size
    suggests. R holds each block's mean residual (exact for those grids, the least-squares correction for
    others), costs 1/block of the MatMul, and is stored fp16. `originals` maps weight names to fp32 [K, N].
    """
    from onnx import TensorProto, helper, numpy_helper

    tensors = {t.name: t for t in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        nodes.append(node)
        if node.op_type != "MatMulNBits":
            continue
        source = node.input[1].rsplit("_Q", 1)[0]
        attr = {a.name: a.i for a in node.attribute}
        k, n, block = attr["K"], attr["N"], attr["block_size"]
        if source not in originals or k % block:
            continue
        residual = originals[source] - _dequantize_nbits(node, tensors)  # [K, N]
        offsets = residual.reshape(k // block, block, n).mean(axis=1)
        name, out = node.name, node.output[0]
        node.output[0] = f"{out}_nbits"
        model.graph.initializer.extend([
            numpy_helper.from_array(offsets.astype(np.float16), f"{source}_offsets"),
            numpy_helper.from_array(np.array([0, 0, k // block, block], np.int64), f"{source}_blocks")])
        nodes += [
            helper.make_node("Reshape", [node.input[0], f"{source}_blocks"], [f"{name}_xb"], name=f"{name}_xb"),
            helper.make_node("ReduceSum", [f"{name}_xb", f"{name}_axis"], [f"{name}_xs"], name=f"{name}_xs",
                             keepdims=0),
            helper.make_node("Cast", [f"{source}_offsets"], [f"{name}_r"], name=f"{name}_r", to=TensorProto.FLOAT),
            helper.make_node("MatMul", [f"{name}_xs", f"{name}_r"], [f"{name}_corr"], name=f"{name}_corr"),
            helper.make_node("Add", [f"{out}_nbits", f"{name}_corr"], [out], name=f"{name}_add")]
        model.graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), f"{name}_axis"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def quantize_graph(model, quant: str, accuracy_level: int = ACCURACY_LEVEL, lora_r: int | None = None,
                   vocab_size: int | None = None):
    """An exported fp32 ModelProto -> its `quant` version (a new proto; the input may be modified)."""
    from onnx import numpy_helper

    if quant not in QUANTS:
        raise ValueError(f"unknown quantisation {quant!r}")
    if quant == "fp32":
        return model
    if quant == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        logging.getLogger("onnxruntime.transformers.float16").setLevel(logging.ERROR)
        return convert_float_to_float16(model, keep_io_types=True)
    kinds = weight_matmuls(model, lora_r, vocab_size)
    weights = {n.input[1] for n in model.graph.node if n.name in kinds}
    originals = {t.name: numpy_helper.to_array(t).astype(np.float32) for t in model.graph.initializer
                 if t.name in weights}
    if quant == "int8":
        model = _nbits(model, 8, set(), accuracy_level)
    else:  # lm_head, LoRA and merged weights at 8 bits (a merged adapter moves a weight off the base's gguf
        # grid, where 4 bits would round it again); they take the int8-activation path: 8-bit fp32-compute
        # kernels are slow
        eight = {n for n, k in kinds.items() if k != "linear"}
        model = _nbits(model, 8, set(kinds) - eight, ACCURACY_LEVEL)
        model = _nbits(model, 4, eight, accuracy_level)
    return correct_block_offsets(model, originals)


def quantize_blocks_int8(table: np.ndarray, block: int = BLOCK_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """[N, H] float -> (int8 [N, H], fp16 scales [N, H / block]): symmetric, one scale per `block` values of a
    row (one per row when H is not a multiple). Exact for tables that were gguf Q8_0, like the default's."""
    table = np.asarray(table, dtype=np.float32)
    n, h = table.shape
    block = block if h % block == 0 else h
    blocks = table.reshape(n, h // block, block)
    scales = (np.abs(blocks).max(axis=-1) / 127.0).astype(np.float16)
    q = np.round(blocks / np.maximum(scales.astype(np.float32), 1e-30)[..., None]).clip(-127, 127)
    return q.astype(np.int8).reshape(n, h), scales


def embedding_table(table: np.ndarray, quant: str) -> tuple[np.ndarray, np.ndarray | None]:
    """The embedding table as stored for `quant`: (values, per-block scales or None)."""
    if quant in ("int8", "int4"):
        return quantize_blocks_int8(table)
    return np.asarray(table, dtype=np.float16 if quant == "fp16" else np.float32), None
