"""The ONNX Runtime backend: runs an export directory made by `clara-edge export --format onnx`.

An export directory (see `clara_edge.export.onnx_export`) holds

    clara_export.json   manifest: format, format_version, quant, ClaraConfig, fingerprints, token ids, shapes,
                        file sizes
    compressor.onnx     inputs_embeds [B, T, H], attention_mask [B, T] -> memories [B, M, H]
    query.onnx          the same graph with the query adapter
    generator.onnx      inputs_embeds [B, T, H], attention_mask [B, P+T], position_ids [B, T],
                        past_key_i / past_value_i [B, kv_heads, P, head_dim] (P may be 0)
                        -> logits [B, V] (last position), present_key_i / present_value_i [B, kv, P+T, D]
    weights.bin         the graphs' weights, each distinct tensor stored once (the three roles share the base)
    embeddings.npy      [base_vocab, H] base token table: fp32, fp16, or int8 with embedding_scales.npy
                        (fp16 [base_vocab, H / block]: one scale per block of each row)
    special_embeddings.npy  [n_special, H] fp32: the added tokens (<MEM_i>, <AE>, <ENC>, <SEP>), never
                        quantised: memory slots are read at the MEM positions, so their inputs must be exact
    retrieval_centre.npy    [n_mem, H] fp32, when the model has one (clara_edge.retrieval)
    tokenizer/          the tokenizer, added tokens included

The runtime embeds token ids itself (memory-mapped table), so the table exists once and memory slots are
spliced exactly as in `ClaraModel`. Text wrapping, batching, prompt building and splicing are ClaraModel's own
methods, reused here unchanged; only the forward passes and the KV-cache loop are ONNX Runtime's.
"""
from __future__ import annotations

import json
import time
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from .backend import EXPORT_MANIFEST
from .errors import ClaraError
from .model import ROLES, ClaraConfig, ClaraModel, Generation, TokenCallback, TokenStream
from .prefix_cache import PrefixCache
from .prompt import special_tokens

EXPORT_FORMAT_VERSION = 1
TOKENIZER_DIR = "tokenizer"
EMBEDDINGS_FILE = "embeddings.npy"
EMBEDDING_SCALES_FILE = "embedding_scales.npy"
SPECIAL_EMBEDDINGS_FILE = "special_embeddings.npy"
CENTRE_FILE = "retrieval_centre.npy"


def read_manifest(path: Path, fmt: str, manifest: dict | None = None) -> dict:
    """Validate an export directory's manifest (and that its files are whole); ClaraError otherwise."""
    path = Path(path)
    if manifest is None:
        if not path.is_dir():
            raise ClaraError(f"export directory not found: {path}")
        try:
            manifest = json.loads((path / EXPORT_MANIFEST).read_text())
        except FileNotFoundError:
            raise ClaraError(f"{path} is not a clara-edge export (no {EXPORT_MANIFEST})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ClaraError(f"corrupted export manifest {path / EXPORT_MANIFEST}: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        raise ClaraError(f"{path} is not a {fmt} export (manifest format {manifest.get('format')!r})"
                         if isinstance(manifest, dict) else f"corrupted export manifest in {path}")
    version = manifest.get("format_version", 0)
    if not isinstance(version, int) or version > EXPORT_FORMAT_VERSION:
        raise ClaraError(f"export {path} has format version {version}; this clara-edge reads up to "
                         f"{EXPORT_FORMAT_VERSION}: upgrade clara-edge or re-export")
    required = ("config", "fingerprint", "files", "special_ids", "base_vocab", "hidden_size")
    missing = [k for k in required if k not in manifest]
    if missing:
        raise ClaraError(f"export manifest {path / EXPORT_MANIFEST} lacks {', '.join(missing)}: re-export")
    for name, size in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise ClaraError(f"export {path} is incomplete: {name} is missing (re-export)")
        if file.stat().st_size != size:
            raise ClaraError(f"export file {file} is {file.stat().st_size} bytes, the manifest says {size}: "
                             "corrupted or truncated (re-export)")
    return manifest


def load_tokenizer(path: Path, manifest: dict):
    """The export's tokenizer; its added tokens must carry the ids the graphs were exported with."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path / TOKENIZER_DIR))
    except (OSError, ValueError) as e:
        raise ClaraError(f"cannot load the tokenizer of export {path}: {str(e).splitlines()[0][:160]}") from None
    ids = dict(zip(manifest["special_ids"], tok.convert_tokens_to_ids(list(manifest["special_ids"]))))
    if ids != manifest["special_ids"]:
        raise ClaraError(f"export {path}: the tokenizer's added-token ids differ from the manifest (re-export)")
    return tok


class ExportedBackend:
    """What the ONNX Runtime and Core ML backends share: manifest, tokenizer, embedding table, decode loop.

    Subclasses run the graphs: `_encode(role, embeds, mask)` and `_generator_step(embeds, mask, positions, state)`.
    """

    name = "exported"
    fmt = ""
    max_batch: int | None = None  # generator rows per forward (Core ML's stateful cache holds one)

    # ClaraModel's text handling, reused as is (they read tokenizer, config, special_ids, mem_ids, device,
    # dtype, hidden_size and call embed / encode_ids / decode, which this class provides).
    _special = ClaraModel._special
    tokenize_documents = ClaraModel.tokenize_documents
    pad_left = ClaraModel.pad_left
    _encode_texts = ClaraModel._encode_texts
    compress = ClaraModel.compress
    encode_query = ClaraModel.encode_query
    prompt_ids = ClaraModel.prompt_ids
    splice = ClaraModel.splice
    generation_inputs = ClaraModel.generation_inputs
    _pick = staticmethod(ClaraModel._pick)

    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self, path: str | Path, manifest: dict | None = None) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path, self.fmt, manifest)
        try:
            self.config = ClaraConfig(**self.manifest["config"])
        except TypeError as e:
            raise ClaraError(f"export manifest {self.path / EXPORT_MANIFEST}: bad config ({e})") from None
        self.tokenizer = load_tokenizer(self.path, self.manifest)
        self.special_ids: dict[str, int] = dict(self.manifest["special_ids"])
        if list(self.special_ids) != special_tokens(self.config.n_mem):
            raise ClaraError(f"export {self.path}: special tokens do not match n_mem {self.config.n_mem}")
        self.mem_ids = torch.tensor([self.special_ids[t] for t in special_tokens(self.config.n_mem)[:self.config.n_mem]])
        self.eos_list: list[int] = list(self.manifest.get("eos_ids", []))
        self.base_vocab = int(self.manifest["base_vocab"])
        self.hidden_size = int(self.manifest["hidden_size"])
        self.max_positions = int(self.manifest.get("max_positions", 2048))  # the generator's window
        self._table, self._scales, self._special_table = self._load_embeddings()
        self.retrieval_centre = self._load_centre()
        self._special_row: dict[int, int] = {tid: i for i, tid in enumerate(self.special_ids.values())}

    # ---------------------------------------------------------------- Backend protocol extras
    def fingerprint(self, roles: Sequence[str] = ("compressor",)) -> str:
        """The source torch model's fingerprint: memory stores built by either backend stay valid."""
        if tuple(roles) == ("compressor",):
            return self.manifest["fingerprint"]
        if tuple(roles) == ROLES:
            return self.manifest.get("model_fingerprint", "")
        raise ClaraError("an export records the compressor and whole-model fingerprints only")

    def eos_ids(self) -> list[int]:
        return list(self.eos_list)

    def describe(self) -> dict:
        """What `clara-edge info` shows of an export beyond its model's config."""
        fields = ("format", "quant", "lora", "generator_graph", "accuracy_level", "outlier_channels", "size_mb",
                  "exporter_revision", "traced_by_exporter_revision", "requantized_from")
        return {"path": str(self.path), **{k: self.manifest[k] for k in fields if self.manifest.get(k) is not None}}

    # ---------------------------------------------------------------- embeddings
    def _load_embeddings(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        try:
            table = np.load(self.path / EMBEDDINGS_FILE, mmap_mode="r")
            scales = (np.load(self.path / EMBEDDING_SCALES_FILE, mmap_mode="r")
                      if (self.path / EMBEDDING_SCALES_FILE).is_file() else None)
            special = np.load(self.path / SPECIAL_EMBEDDINGS_FILE).astype(np.float32)
        except (OSError, ValueError) as e:
            raise ClaraError(f"corrupted embedding table in {self.path}: {str(e).splitlines()[0][:160]}") from None
        blocks_ok = scales is None or (scales.ndim == 2 and scales.shape[0] == self.base_vocab
                                       and self.hidden_size % scales.shape[1] == 0)
        if table.shape != (self.base_vocab, self.hidden_size) or not blocks_ok \
                or special.shape != (len(self.special_ids), self.hidden_size):
            raise ClaraError(f"embedding tables in {self.path} have shapes {table.shape} / {special.shape}, "
                             f"expected {(self.base_vocab, self.hidden_size)} / {(len(self.special_ids), self.hidden_size)}")
        return table, scales, special

    def _load_centre(self) -> torch.Tensor | None:
        if CENTRE_FILE not in self.manifest["files"]:
            return None
        try:
            centre = np.load(self.path / CENTRE_FILE).astype(np.float32)
        except (OSError, ValueError) as e:
            raise ClaraError(f"corrupted retrieval centre in {self.path}: {str(e).splitlines()[0][:160]}") from None
        if centre.shape != (self.config.n_mem, self.hidden_size):
            raise ClaraError(f"retrieval centre in {self.path} has shape {centre.shape}, expected "
                             f"{(self.config.n_mem, self.hidden_size)}")
        return torch.from_numpy(centre)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T] -> fp32 embeddings [B, T, H]; added tokens read their own rows (as ClaraModel.embed)."""
        flat = ids.reshape(-1).tolist()
        special = np.array([self._special_row.get(t, -1) for t in flat], dtype=np.int64)
        rows = np.array([t if t < self.base_vocab else 0 for t in flat], dtype=np.int64)
        vecs = np.asarray(self._table[rows], dtype=np.float32)
        if self._scales is not None:  # int8 with one scale per block of each row
            scales = np.asarray(self._scales[rows], dtype=np.float32)
            vecs = (vecs.reshape(len(rows), scales.shape[1], -1) * scales[:, :, None]).reshape(len(rows), -1)
        hit = special >= 0
        vecs[hit] = self._special_table[special[hit]]
        return torch.from_numpy(vecs).reshape(*ids.shape, self.hidden_size)

    # ---------------------------------------------------------------- encoders
    def encode_ids(self, role: str, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Wrapped ids [B, T] -> memories [B, M, H] (the graph keeps the trailing MEM slots)."""
        out = self._encode(role, self.embed(ids).numpy(), mask.numpy().astype(np.int64))
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))

    def _encode(self, role: str, embeds: np.ndarray, mask: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    # ---------------------------------------------------------------- generator
    def _generator_state(self, batch: int):
        raise NotImplementedError

    def _generator_step(self, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray, state):
        """One forward: -> (last-position logits [B, V] fp32, new state)."""
        raise NotImplementedError

    def _crop_state(self, state, n: int):
        """A generator state holding only its first n positions, or None where it cannot be cut."""
        return None

    def generate(self, questions: Sequence[str], memories: Sequence[torch.Tensor], max_new_tokens: int = 64,
                 **sampling) -> Generation:
        """Answer each question from its memories [k_i, M, H] (greedy unless do_sample)."""
        step = self.max_batch or max(1, len(questions))
        parts = []
        for start in range(0, max(1, len(questions)), step):
            embeds, mask = self.generation_inputs(questions[start:start + step], memories[start:start + step])
            parts.append(self.decode(embeds, mask, "generator", max_new_tokens, **sampling))
        if len(parts) == 1:
            return parts[0]
        return Generation([t for p in parts for t in p.texts], [t for p in parts for t in p.token_ids],
                          [c for p in parts for c in p.context_positions], sum(p.prefill_s for p in parts),
                          sum(p.decode_s for p in parts), decode_steps=sum(p.decode_steps for p in parts))

    def decode(self, inputs_embeds: torch.Tensor, mask: torch.Tensor, role: str | None = "generator",
               max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
               seed: int | None = None, on_token: TokenCallback | None = None,
               prefix_cache: PrefixCache | None = None) -> Generation:
        """Greedy / sampled decoding from left-padded embeddings [B, T, H] with an explicit KV cache
        (`prefix_cache`: as `ClaraModel.decode`)."""
        if role != "generator":
            raise ClaraError(f"a {self.fmt} export decodes with the generator adapter only (role {role!r})")
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        eos = set(self.eos_list)
        embeds = inputs_embeds.detach().float().numpy()
        mask_np = mask.numpy().astype(np.int64)
        batch = embeds.shape[0]
        positions = np.clip(mask_np.cumsum(-1) - 1, 0, None)
        context = mask_np.sum(-1).tolist()
        stream = TokenStream(self.tokenizer, batch, on_token)
        finished = np.zeros(batch, dtype=bool)
        reuse, state, steps = 0, None, 0
        if prefix_cache is not None:
            reuse, held = prefix_cache.take(role, inputs_embeds)
            state = self._crop_state(held, reuse) if held is not None else None
            reuse = reuse if state is not None else 0
        start = time.perf_counter()
        prefill_end = None
        logits, state = self._generator_step(embeds[:, reuse:], mask_np, positions[:, reuse:],
                                             state if state is not None else self._generator_state(batch))
        for step in range(max_new_tokens):
            nxt = self._pick(torch.from_numpy(logits), do_sample, temperature, top_p, gen).numpy()
            if prefill_end is None:
                prefill_end = time.perf_counter()
            for row in np.flatnonzero(~finished).tolist():
                tid = int(nxt[row])
                if tid in eos:
                    finished[row] = True
                    continue
                stream.push(row, tid)
            if finished.all() or step == max_new_tokens - 1:
                break
            mask_np = np.concatenate([mask_np, np.ones((batch, 1), np.int64)], axis=1)
            positions = positions[:, -1:] + 1
            logits, state = self._generator_step(self.embed(torch.from_numpy(nxt[:, None])).numpy(), mask_np,
                                                 positions, state)
            steps += 1
        end = time.perf_counter()
        if prefix_cache is not None:
            prefix_cache.keep(role, inputs_embeds, state)
        prefill_end = prefill_end or end
        return Generation(stream.answers(), stream.tokens, context, prefill_end - start, end - prefill_end, reuse,
                          steps)


class OnnxBackend(ExportedBackend):
    """ONNX Runtime on CPU, graph optimisations ORT_ENABLE_ALL; sessions open on first use of each role."""

    name = "onnx"
    fmt = "onnx"

    def __init__(self, path: str | Path, manifest: dict | None = None, threads: int | None = None,
                 optimization: str = "all") -> None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise ClaraError("the ONNX backend needs onnxruntime: pip install 'clara-edge[onnx]'") from None
        super().__init__(path, manifest)
        self.threads = threads
        self.optimization = optimization
        self.graphs: dict[str, str] = dict(self.manifest.get("graphs", {r: f"{r}.onnx" for r in ROLES}))
        self.num_layers = int(self.manifest["num_layers"])
        self.kv_shape = (int(self.manifest["num_kv_heads"]), int(self.manifest["head_dim"]))
        self._in_place = self.manifest.get("generator_graph") == "fused"  # see KVCache
        self._sessions: dict = {}

    def session(self, role: str):
        """The role's InferenceSession (created once)."""
        if role not in self._sessions:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.graph_optimization_level = {
                "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[self.optimization]
            # The process's one CPU thread setting (`--threads`, $CLARA_EDGE_THREADS: `configure_threads`) unless
            # given: ORT's own default takes every core, and the CLI's --threads must mean the same here as for torch.
            opts.intra_op_num_threads = self.threads or torch.get_num_threads()
            opts.log_severity_level = 3
            file = self.path / self.graphs[role]
            try:
                self._sessions[role] = ort.InferenceSession(str(file), opts, providers=["CPUExecutionProvider"])
            except Exception as e:  # ORT raises its own exception types (Fail, InvalidProtobuf, ...)
                raise ClaraError(f"cannot load {file}: {type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:200]} (corrupted export? re-export)") from None
        return self._sessions[role]

    def _encode(self, role: str, embeds: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self.session(role).run(["memories"], {"inputs_embeds": embeds, "attention_mask": mask})[0]

    @cached_property
    def _vocab(self) -> int:
        return int(self.session("generator").get_outputs()[0].shape[-1])

    def _generator_state(self, batch: int) -> KVCache:
        return KVCache.empty([f"past_{kind}_{i}" for i in range(self.num_layers) for kind in ("key", "value")],
                             batch, *self.kv_shape)

    def _crop_state(self, state: KVCache, n: int) -> KVCache:
        state.length = n  # the prefix cache handed the buffers over: the next step overwrites from n on
        return state

    def _generator_step(self, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray,
                        state: KVCache) -> tuple[np.ndarray, KVCache]:
        batch, step = embeds.shape[:2]
        feeds = {"inputs_embeds": embeds.astype(np.float32, copy=False), "attention_mask": mask,
                 "position_ids": positions.astype(np.int64, copy=False)}
        if not self._in_place:  # the traced graph concatenates past and new positions into new arrays
            names = ["logits"] + [n.replace("past_", "present_", 1) for n in state.arrays]
            out = self.session("generator").run(names, {**feeds, **state.filled()})
            return out[0].astype(np.float32, copy=False), KVCache(dict(zip(state.arrays, out[1:])), mask.shape[1])
        state.reserve(mask.shape[1])
        if batch > 1 and step > 1 and state.length > 0:
            # GroupQueryAttention reads a prompt on top of a past one row at a time (the prefix cache's case)
            logits = [self._generator_step(embeds[i:i + 1], mask[i:i + 1], positions[i:i + 1], state.row(i))[0]
                      for i in range(batch)]
            state.length = mask.shape[1]
            return np.concatenate(logits), state
        return self._run_in_place(feeds, state), state

    def _run_in_place(self, feeds: dict[str, np.ndarray], state: KVCache) -> np.ndarray:
        """One generator forward with past_* and present_* bound to the same buffers; -> logits [B, V]."""
        sess = self.session("generator")
        binding = state.binding(sess)
        feeds = {name: np.ascontiguousarray(value) for name, value in feeds.items()}  # bound by address until run
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        logits = np.empty((feeds["inputs_embeds"].shape[0], self._vocab), np.float32)
        binding.bind_ortvalue_output("logits", _ort_value(logits))
        sess.run_with_iobinding(binding)
        state.length = feeds["attention_mask"].shape[1]
        return logits


def _ort_value(array: np.ndarray):
    from onnxruntime import OrtValue

    return OrtValue.ortvalue_from_numpy(array)  # shares the array's memory


class KVCache:
    """The ONNX generator's KV cache: per layer key and value arrays [B, kv_heads, capacity, head_dim] whose first
    `length` positions are filled.

    The fused generator's GroupQueryAttention reads and extends these buffers in place (past_* and present_* bound
    to the same memory), so a decode step copies no cache: that copy grew with the context and was a third of a
    step at 1,800 positions. Capacity grows in steps of `GROWTH` positions; the traced graph returns new arrays
    instead (capacity == length).
    """

    GROWTH = 256

    def __init__(self, arrays: dict[str, np.ndarray], length: int) -> None:
        self.arrays, self.length = arrays, length
        self._binding, self._buffers = None, []

    @classmethod
    def empty(cls, names: Sequence[str], batch: int, kv_heads: int, head_dim: int) -> KVCache:
        return cls({name: np.zeros((batch, kv_heads, 0, head_dim), np.float32) for name in names}, 0)

    @property
    def capacity(self) -> int:
        return next(iter(self.arrays.values())).shape[2]

    def filled(self) -> dict[str, np.ndarray]:
        """Each array's first `length` positions (views)."""
        return {name: a[:, :, :self.length] for name, a in self.arrays.items()}

    def reserve(self, total: int) -> None:
        """Make room for `total` positions, keeping the filled ones."""
        if total <= self.capacity:
            return
        capacity = -(-total // self.GROWTH) * self.GROWTH
        grown = {}
        for name, a in self.arrays.items():
            grown[name] = np.zeros((a.shape[0], a.shape[1], capacity, a.shape[3]), a.dtype)
            grown[name][:, :, :self.length] = a[:, :, :self.length]
        self.arrays, self._binding = grown, None

    def row(self, i: int) -> KVCache:
        """Row i as a cache of its own over the same memory (writes land in this cache)."""
        return KVCache({name: a[i:i + 1] for name, a in self.arrays.items()}, self.length)

    def binding(self, session):
        """An IO binding of `session` with every past_* / present_* pair bound to these buffers (made once per
        capacity: rebinding 60 buffers cost 3 % of a decode step); the caller binds the other inputs and outputs."""
        if self._binding is None:
            self._binding = session.io_binding()
            self._buffers = [_ort_value(a) for a in self.arrays.values()]  # alive while bound
            for name, buffer in zip(self.arrays, self._buffers):
                self._binding.bind_ortvalue_input(name, buffer)
                self._binding.bind_ortvalue_output(name.replace("past_", "present_", 1), buffer)
        return self._binding
