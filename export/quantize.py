"""Weight quantisation of exported ONNX graphs (onnxruntime.quantization) and of the embedding table.

    fp32  as exported
    fp16  every float weight and activation in fp16 (graph inputs / outputs stay fp32: keep_io_types)
    int8  every constant-weight MatMul -> MatMulNBits, 8 bit, block 32, accuracy_level 4
    int4  transformer linears -> MatMulNBits 4 bit (block 32, accuracy_level 4); lm_head and the LoRA
          matrices 8 bit (lm_head is the most sensitive layer; LoRA B's K = r is below one block)

Blocks run along K (the input dimension), asymmetric with a zero point per block. The embedding table is
int8 with one fp32 scale per row for int8 / int4 exports, fp16 for fp16, fp32 for fp32.
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


def weight_matmuls(model) -> dict[str, str]:
    """MatMul nodes with a constant weight -> 'lora' | 'lm_head' | 'linear', read off the exporter's scopes."""
    consts = {t.name for t in model.graph.initializer}
    kinds = {}
    for node in model.graph.node:
        if node.op_type != "MatMul" or len(node.input) < 2 or node.input[1] not in consts:
            continue
        scope = _scope(node)
        kinds[node.name] = ("lora" if ("lora_A" in scope or "lora_B" in scope)
                            else "lm_head" if "lm_head" in scope else "linear")
    return kinds


def _nbits(model, bits: int, exclude: set[str]):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=BLOCK_SIZE, is_symmetric=False,
                                     accuracy_level=ACCURACY_LEVEL, nodes_to_exclude=sorted(exclude))
    quantizer.process()
    return quantizer.model.model


def quantize_graph(model, quant: str):
    """An exported fp32 ModelProto -> its `quant` version (a new proto; the input may be modified)."""
    if quant not in QUANTS:
        raise ValueError(f"unknown quantisation {quant!r}")
    if quant == "fp32":
        return model
    if quant == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        logging.getLogger("onnxruntime.transformers.float16").setLevel(logging.ERROR)
        return convert_float_to_float16(model, keep_io_types=True)
    kinds = weight_matmuls(model)
    if quant == "int8":
        return _nbits(model, 8, exclude=set())
    eight = {n for n, k in kinds.items() if k != "linear"}
    model = _nbits(model, 8, exclude=set(kinds) - eight)
    return _nbits(model, 4, exclude=eight)


def quantize_rows_int8(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[N, H] float -> (int8 [N, H], fp32 scales [N]) with one symmetric scale per row."""
    table = np.asarray(table, dtype=np.float32)
    scales = np.abs(table).max(axis=1) / 127.0
    q = np.round(table / np.maximum(scales, 1e-30)[:, None]).clip(-127, 127).astype(np.int8)
    return q, scales.astype(np.float32)


def embedding_table(table: np.ndarray, quant: str) -> tuple[np.ndarray, np.ndarray | None]:
    """The embedding table as stored for `quant`: (values, per-row scales or None)."""
    if quant in ("int8", "int4"):
        return quantize_rows_int8(table)
    return np.asarray(table, dtype=np.float16 if quant == "fp16" else np.float32), None
