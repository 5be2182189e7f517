"""Weight quantisation of exported ONNX graphs (onnxruntime.quantization) and of the embedding table.

    fp32  as exported
    fp16  every float weight and activation in fp16 (graph inputs / outputs stay fp32: keep_io_types)
    int8  every constant-weight MatMul -> MatMulNBits, 8 bit, block 32, accuracy_level 4
    int4  transformer linears -> MatMulNBits 4 bit (block 32, accuracy_level 4); lm_head and the LoRA
          matrices 8 bit (lm_head is the most sensitive layer; LoRA B's K = r is below one block)

Blocks run along K (the input dimension), asymmetric with a zero point per block, plus a per-block offset
correction carried inside each node (`fold_block_offsets`); 8-bit nodes read their inputs' outlier channels as
a block of their own (`outliers`, given calibration feeds). The embedding table is int8 with an fp16 scale per
32 values for int8 / int4 exports, fp16 for fp16, fp32 for fp32.
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


def weight_matmuls(model, lora_r: int | None = None, vocab_size: int | None = None,
                   merged: bool = False) -> dict[str, str]:
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
        # merged: `onnx_fused`'s names, or in a traced graph of a merged role the adapted modules' base layers
        is_merged = ".merged." in name or (merged and "base_layer" in (scope or name))
        kinds[node.name] = "lora" if lora else "lm_head" if head else "merged" if is_merged else "linear"
    return kinds


def _nbits(model, bits: int, exclude: set[str], accuracy_level: int):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=BLOCK_SIZE, is_symmetric=False,
                                     accuracy_level=accuracy_level, nodes_to_exclude=sorted(exclude))
    quantizer.process()
    return quantizer.model.model


def _source(node) -> str | None:
    """The fp32 weight a MatMulNBits node was quantised from (the quantiser names its weights `<source>_Q<bits>...`)."""
    return node.input[1].rsplit("_Q", 1)[0] if node.op_type == "MatMulNBits" else None


def _unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """uint8 [..., m] holding two 4-bit values each (low nibble first) -> [..., 2m]."""
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)


def _pack_nibbles(values: np.ndarray) -> np.ndarray:
    """uint8 [..., 2m] of 4-bit values -> [..., m], the even index in the low nibble."""
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def _unpack_zero_points(zero_points: np.ndarray, n: int, blocks: int, bits: int) -> np.ndarray:
    """MatMulNBits zero points [N, bytes per column] -> uint8 [N, blocks]."""
    zp = zero_points.reshape(n, -1)
    return (_unpack_nibbles(zp) if bits == 4 else zp)[:, :blocks]


def _dequantize_blocks(q: np.ndarray, scales: np.ndarray, zero_points: np.ndarray) -> np.ndarray:
    """q [N, blocks, block] with per-block scales and zero points [N, blocks] -> fp32 [N, blocks * block]."""
    w = (q.astype(np.float32) - zero_points[..., None].astype(np.float32)) * scales[..., None].astype(np.float32)
    return w.reshape(q.shape[0], -1)


def _dequantize_nbits(node, tensors: dict) -> np.ndarray:
    """A MatMulNBits node's weight as it computes it, [K, N] fp32: (q - zero_point) * scale per block."""
    from onnx import numpy_helper

    attr = {a.name: a.i for a in node.attribute}
    k, n, bits, block = attr["K"], attr["N"], attr["bits"], attr["block_size"]
    packed = numpy_helper.to_array(tensors[node.input[1]])  # [N, blocks, block * bits / 8]
    blocks = packed.shape[1]
    scales = numpy_helper.to_array(tensors[node.input[2]]).reshape(n, blocks).astype(np.float32)
    q = _unpack_nibbles(packed) if bits == 4 else packed
    if len(node.input) > 3 and node.input[3]:
        zp = _unpack_zero_points(numpy_helper.to_array(tensors[node.input[3]]), n, blocks, bits).astype(np.float32)
    else:
        zp = np.full((n, blocks), 2 ** (bits - 1), np.float32)
    return _dequantize_blocks(q[:, :, :block], scales, zp)[:, :k].T


def _quantize_rows(values: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[N, L] float -> MatMulNBits blocks of L values per column: (q [N, nb, block], scales [N, nb], zero points
    [N, nb]); asymmetric round-to-nearest over each block's range widened to hold 0 (the padding is exact)."""
    n, length = values.shape
    nb = -(-length // block)
    padded = np.zeros((n, nb * block), np.float32)
    padded[:, :length] = values
    padded = padded.reshape(n, nb, block)
    top = 2 ** bits - 1
    lo, hi = np.minimum(padded.min(-1), 0), np.maximum(padded.max(-1), 0)
    scales = np.where(hi > lo, (hi - lo) / top, 1.0).astype(np.float32)
    zp = np.clip(np.round(-lo / scales), 0, top)
    q = np.clip(np.round(padded / scales[..., None]) + zp[..., None], 0, top)
    return q.astype(np.uint8), scales, zp.astype(np.uint8)


def fold_block_offsets(model, originals: dict[str, np.ndarray]):
    """Give every MatMulNBits node a per-block offset correction inside the node: y = [x, blocksum(x)] @ [W; R].

    Integer zero points cannot place a block's grid anywhere, so rounding them leaves each block with a
    constant offset error. For weights that were already block-quantised with a float offset (every gguf
    Q4_1 / Q5_1 base, the built-in default included) the re-quantised grid matches the original one except
    for that offset, and it is the whole error: a systematic bias per block, far worse than its size
    suggests. R [K/block, N] holds each block's mean residual (exact offsets for those grids, the
    least-squares correction for others). It travels as extra input rows of the node's own weight, quantised
    like the rest, and the node reads its input with the block sums appended: one Reshape / ReduceSum (/ Pad)
    / Concat per input tensor, shared by the nodes that read it (q, k and v share theirs). A separate fp32
    correction per node (Reshape, ReduceSum, MatMul, Add) cost a quarter of a decode step at batch 1.
    `originals` maps weight names to fp32 [K, N]; 4- and 8-bit nodes with zero points.
    """
    from onnx import helper

    tensors = {t.name: t for t in model.graph.initializer}
    augmented: dict[tuple[str, int, int], str] = {}  # (input, K, levels) -> the input with its block sums
    folded: set[str] = set()
    nodes = []
    for node in model.graph.node:
        attr = {a.name: a for a in node.attribute}
        source = _source(node)
        k, block = (attr["K"].i, attr["block_size"].i) if source else (0, 1)
        if source not in originals or k % block:
            nodes.append(node)
            continue
        levels = _offset_levels(attr["bits"].i)
        if node.input[1] not in folded:  # a weight read by several nodes is folded once
            _append_offset_rows(node, tensors, originals[source], levels)
            folded.add(node.input[1])
        x, blocks = node.input[0], k // block
        padded = -(-blocks // block) * block  # every level but the last fills whole blocks
        if (x, k, levels) not in augmented:
            name = f"{node.name}_blocksums"
            shape = _const(model, f"blocks_{blocks}x{block}", np.array([0, 0, blocks, block], np.int64))
            last = _const(model, "axis_last", np.array([-1], np.int64))
            nodes += [helper.make_node("Reshape", [x, shape], [f"{name}_xb"], name=f"{name}_xb"),
                      helper.make_node("ReduceSum", [f"{name}_xb", last], [f"{name}_xs"], name=f"{name}_xs",
                                       keepdims=0)]
            sums = [f"{name}_xs"]
            if levels > 1:
                pad = padded - blocks
                pads = _const(model, f"pad_last_{pad}", np.array([0, 0, 0, 0, 0, pad], np.int64))
                nodes.append(helper.make_node("Pad", [f"{name}_xs", pads], [f"{name}_xp"], name=f"{name}_xp"))
                sums = [f"{name}_xp"] * (levels - 1) + sums
            nodes.append(helper.make_node("Concat", [x, *sums], [name], name=name, axis=-1))
            augmented[(x, k, levels)] = name
        node.input[0] = augmented[(x, k, levels)]
        attr["K"].i = k + (levels - 1) * padded + blocks
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def _offset_levels(bits: int) -> int:
    """Quantised copies of R a node carries, each holding what the previous ones' rounding left: one 4-bit copy
    leaves 1/15 of R's range, which on the default model's MLP projections (real activations, int8 activation
    compute) raised the output error 10-17 % over an exact fp32 correction; a second copy matches it to 0.3 %.
    At 8 bits one copy already matches it."""
    return 2 if bits == 4 else 1


def _append_offset_rows(node, tensors: dict, original: np.ndarray, levels: int) -> None:
    """Append R (the mean residual of each of the node's blocks, [K/block, N]) to its weight as extra rows:
    `levels` quantised copies, each of the remainder of the previous, each but the last padded to whole blocks."""
    attr = {a.name: a.i for a in node.attribute}
    k, n, bits, block = attr["K"], attr["N"], attr["bits"], attr["block_size"]
    blocks = k // block
    remainder = (original - _dequantize_nbits(node, tensors)).reshape(blocks, block, n).mean(axis=1).T  # [N, blocks]
    parts = []
    for _ in range(levels):
        q, scales, zp = _quantize_rows(remainder, bits, block)
        remainder = remainder - _dequantize_blocks(q, scales, zp)[:, :blocks]
        parts.append((q, scales, zp))
    append_weight_blocks(node, tensors, *(np.concatenate(part, axis=1) for part in zip(*parts)))


def append_weight_blocks(node, tensors: dict, q: np.ndarray, scales: np.ndarray, zero_points: np.ndarray) -> None:
    """Append blocks (q [N, nb, block] unpacked, scales and zero points [N, nb]) after a MatMulNBits node's
    K / block blocks of weight; the caller updates the node's K."""
    from onnx import numpy_helper

    attr = {a.name: a.i for a in node.attribute}
    k, n, bits, block = attr["K"], attr["N"], attr["bits"], attr["block_size"]
    packed, scale_t, zp_t = (tensors[name] for name in node.input[1:4])
    zero_points = np.concatenate([_unpack_zero_points(numpy_helper.to_array(zp_t), n, k // block, bits), zero_points],
                                 axis=1)
    if bits == 4:
        q = _pack_nibbles(q)
        zero_points = _pack_nibbles(np.pad(zero_points, ((0, 0), (0, zero_points.shape[1] % 2))))
    old_scales = numpy_helper.to_array(scale_t).reshape(n, -1)  # [N, blocks]
    for tensor, value in ((packed, np.concatenate([numpy_helper.to_array(packed), q], axis=1)),
                          (scale_t, np.concatenate([old_scales, scales.astype(old_scales.dtype)], axis=1)),
                          (zp_t, zero_points)):
        tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))


def _const(model, name: str, value: np.ndarray) -> str:
    """An initializer of the graph (added once)."""
    from onnx import numpy_helper

    if name not in {t.name for t in model.graph.initializer}:
        model.graph.initializer.append(numpy_helper.from_array(value, name))
    return name


def quantize_graph(model, quant: str, accuracy_level: int = ACCURACY_LEVEL, lora_r: int | None = None,
                   vocab_size: int | None = None, calibration: dict[str, np.ndarray] | None = None,
                   merged: bool = False):
    """An exported fp32 ModelProto -> its `quant` version (a new proto; the input may be modified); `merged`:
    the graph's adapter is merged into its base weights.

    calibration: feeds for one fp32 run of the graph, from which 8-bit nodes learn their inputs' outlier
    channels (`outliers`); without it no channel is isolated."""
    from onnx import numpy_helper

    from .outliers import calibrate, isolate_outlier_channels

    if quant not in QUANTS:
        raise ValueError(f"unknown quantisation {quant!r}")
    if quant == "fp32":
        return model
    if quant == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        logging.getLogger("onnxruntime.transformers.float16").setLevel(logging.ERROR)
        return convert_float_to_float16(model, keep_io_types=True)
    kinds = weight_matmuls(model, lora_r, vocab_size, merged)
    weights = {n.input[1] for n in model.graph.node if n.name in kinds}
    originals = {t.name: numpy_helper.to_array(t).astype(np.float32) for t in model.graph.initializer
                 if t.name in weights}
    channels = {} if calibration is None else calibrate(
        model, calibration, {n.input[0] for n in model.graph.node if n.name in kinds}, BLOCK_SIZE)
    if quant == "int8":
        model = _nbits(model, 8, set(), accuracy_level)
    else:  # lm_head, LoRA and merged weights at 8 bits (a merged adapter moves a weight off the base's gguf
        # grid, where 4 bits would round it again); they take the int8-activation path: 8-bit fp32-compute
        # kernels are slow
        eight = {n for n, k in kinds.items() if k != "linear"}
        model = _nbits(model, 8, set(kinds) - eight, ACCURACY_LEVEL)
        model = _nbits(model, 4, eight, accuracy_level)
    return fold_block_offsets(isolate_outlier_channels(model, originals, channels), originals)


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
