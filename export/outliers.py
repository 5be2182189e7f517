"""Outlier input channels in an activation block of their own, for 8-bit MatMulNBits nodes.

MatMulNBits at accuracy_level 4 quantises its input to int8 per block of 32 values, one scale (the block's max)
per block. The residual stream of Llama-family models carries a few channels 20-40x larger than the rest, at
every position, so each block holding one rounds its other 31 values on a grid 20-40x too coarse: on the
default model that activation rounding, not the 8-bit weights, is most of an 8-bit node's error. A node whose
input has such channels reads `[x * mask, x @ S]` against `[W; W[idx]]`: the outlier channels are zeroed in
place (their weight rows stay, so a gguf grid stays intact) and copied into one extra block, padded with zeros,
whose rows hold their weights. The channels come from a calibration prefill of the fp32 graph; an input is
treated when that cuts its simulated rounding error by MIN_GAIN (in the default int8 generator: q / k / v in every
layer, gate / up in 25 of 30 and the lm_head; o_proj and down_proj, whose large values mostly move from position to
position, in 2 layers each).
Only 8-bit nodes: at 4 bits the copied rows would be rounded to 16 levels, the error moved rather than removed.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np

OUTLIER_CHANNELS = 4  # more share one block's scale again: 8 measured worse than 4 for the lm_head
MIN_GAIN = 1.25  # simulated int8 activation error without / with the isolation
_STUB_BYTES = 1 << 20  # calibration hands ORT larger initializers as OrtValues (a proto must stay under 2 GB)


def block_rounding_error(x: np.ndarray, block: int) -> float:
    """Relative RMS error of symmetric int8 rounding per `block` values along the last axis of x [n, K]."""
    blocks = x.reshape(len(x), -1, block)
    scale = np.abs(blocks).max(-1, keepdims=True) / 127
    rounded = np.round(blocks / np.where(scale > 0, scale, 1)) * scale
    return float(np.linalg.norm(rounded - blocks) / max(np.linalg.norm(blocks), 1e-30))


def isolated(x: np.ndarray, idx: np.ndarray, block: int) -> np.ndarray:
    """x [n, K] -> [n, K + block]: x with channels idx zeroed, then those channels padded to one block."""
    extra = np.zeros((len(x), block), x.dtype)
    extra[:, :len(idx)] = x[:, idx]
    main = x.copy()
    main[:, idx] = 0
    return np.concatenate([main, extra], axis=1)


def outlier_channels(x: np.ndarray, block: int) -> np.ndarray | None:
    """The OUTLIER_CHANNELS largest channels of calibration activations x [n, K] (sorted), or None where
    isolating them would not cut the simulated int8 rounding error by MIN_GAIN."""
    if x.shape[1] % block or x.shape[1] <= block:
        return None
    idx = np.sort(np.argsort(np.abs(x).max(0))[-OUTLIER_CHANNELS:])
    gain = block_rounding_error(x, block) / max(block_rounding_error(isolated(x, idx, block), block), 1e-30)
    return idx if gain >= MIN_GAIN else None


def activations(model, feeds: dict[str, np.ndarray], names: Iterable[str]) -> dict[str, np.ndarray]:
    """Run the fp32 graph on `feeds` and return the tensors `names` as [positions, channels]."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    requested = set(names)
    names = sorted(requested - set(feeds))
    big = [t for t in model.graph.initializer if t.ByteSize() > _STUB_BYTES]
    stubs = {t.name: _stub(t) for t in big}
    graph = helper.make_graph(
        model.graph.node, model.graph.name, model.graph.input,
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names],
        [stubs.get(t.name, t) for t in model.graph.initializer])
    lite = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version,
                             functions=model.functions)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # one run: copies cost, not speed
    opts.add_session_config_entry("session.disable_prepacking", "1")
    values = [ort.OrtValue.ortvalue_from_numpy(numpy_helper.to_array(t)) for t in big]
    opts.add_external_initializers([t.name for t in big], values)
    session = ort.InferenceSession(lite.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    out = dict(zip(names, session.run(names, {k: v for k, v in feeds.items() if k in wanted}) if names else []))
    out.update({k: v for k, v in feeds.items() if k in requested})
    return {n: a.reshape(-1, a.shape[-1]) for n, a in out.items()}


def _stub(tensor):
    """A declaration of `tensor` without its data (the session receives the data separately)."""
    from onnx import TensorProto

    stub = TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims,
                       data_location=TensorProto.EXTERNAL)
    entry = stub.external_data.add()
    entry.key, entry.value = "location", "calibration-values"
    return stub


def calibrate(model, feeds: dict[str, np.ndarray], inputs: Iterable[str], block: int) -> dict[str, np.ndarray]:
    """{input tensor: outlier channels} for those of `inputs` (MatMul inputs of the fp32 graph) worth isolating."""
    found = {name: outlier_channels(x, block) for name, x in activations(model, feeds, inputs).items()}
    return {name: idx for name, idx in found.items() if idx is not None}


def isolate_outlier_channels(model, originals: dict[str, np.ndarray], channels: dict[str, np.ndarray]):
    """Route each 8-bit MatMulNBits node reading an input in `channels` through `[x * mask, x @ S]` (one Mul,
    MatMul and Concat per input, shared by its readers) and append its weight's outlier rows as one 8-bit block.
    `originals` (weight name -> fp32 [K, N]) gains the same rows, so `fold_block_offsets` corrects them too."""
    from onnx import helper

    from .quantize import _const, _quantize_rows, _source, append_weight_blocks

    tensors = {t.name: t for t in model.graph.initializer}
    readers: dict[str, set[str]] = {}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            readers.setdefault(node.input[1], set()).add(node.input[0])
    routed: dict[str, str] = {}
    extended: set[str] = set()
    nodes = []
    for node in model.graph.node:
        attr = {a.name: a for a in node.attribute}
        x, source = node.input[0], _source(node)
        if source not in originals or attr["bits"].i != 8 or x not in channels or readers[node.input[1]] != {x}:
            nodes.append(node)
            continue
        k, n, block = attr["K"].i, attr["N"].i, attr["block_size"].i
        idx = channels[x]
        if x not in routed:
            mask = np.ones(k, np.float32)
            mask[idx] = 0
            select = np.zeros((k, block), np.float32)
            select[idx, np.arange(len(idx))] = 1
            name = f"{x}_outliers_isolated"
            nodes += [helper.make_node("Mul", [x, _const(model, f"{name}_mask", mask)], [f"{name}_main"],
                                       name=f"{name}_main"),
                      helper.make_node("MatMul", [x, _const(model, f"{name}_select", select)], [f"{name}_copy"],
                                       name=f"{name}_copy"),
                      helper.make_node("Concat", [f"{name}_main", f"{name}_copy"], [name], name=name, axis=-1)]
            routed[x] = name
        if node.input[1] not in extended:  # a weight read by several nodes is extended once
            rows = np.zeros((block, n), np.float32)
            rows[:len(idx)] = originals[source][idx]
            append_weight_blocks(node, tensors, *_quantize_rows(rows.T.copy(), 8, block))  # one block per column
            originals[source] = np.concatenate([originals[source], rows])
            extended.add(node.input[1])
        node.input[0] = routed[x]
        attr["K"].i = k + block
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model
