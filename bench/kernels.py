"""GPU benchmark of the attention kernels against torch's best (issue #6).

    python -m clara_edge.bench.kernels [--quick] [--json OUT] [--tune] [--no-flex] [--budget-s S]

One run covers SmolLM2-135M heads (9 q / 3 kv, d 64) and Mistral-7B heads (32 / 8, d 128):
decode at (B, N) = (1,128), (1,2048), (16,512), (128,512), (128,4096) and prefill (B=1, causal) at 512 and 4096
positions, in bf16, plus int8 / fp8 memory-KV decode ([quantised memory | bf16 tail of --tail tokens]) and the
cascade kernel (the memory prefix shared by the batch) at B >= 16.

Method: every measured call is captured in a CUDA graph together with R - 1 more calls on R rotated copies of
the inputs (R copies span >= 3x the L2 size, so each call reads cold inputs), the graph is replayed `--reps`
times and the median per-call time is reported. GB/s counts the bytes of Q, K, V (and scales) read and O written
once; % copy is relative to a device-to-device copy measured the same way (read + write bytes). Each torch
backend (SDPA flash, SDPA cuDNN, FlexAttention) runs on the same inputs; a backend that errors for a shape is
skipped and recorded. Each Triton row is checked against the float32 reference before it is timed.

Without CUDA it prints one line and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from clara_edge.errors import ClaraError
from clara_edge.reports import report_path

MODELS = {"smollm2-135m": dict(hq=9, hkv=3, d=64), "mistral-7b": dict(hq=32, hkv=8, d=128)}
DECODE_SHAPES = [(1, 128), (1, 2048), (16, 512), (128, 512), (128, 4096)]
PREFILL_POSITIONS = [512, 4096]
QUICK_DECODE_SHAPES = [(1, 128), (128, 512)]
QUICK_PREFILL_POSITIONS = [512]
TORCH_BACKENDS = ("sdpa-flash", "sdpa-cudnn", "flex")
CASCADE_MIN_BATCH = 16      # the shared-prefix rows only make sense for a batch of queries
FLEX_BUDGET_FRACTION = 0.6  # no new FlexAttention rows after this fraction of --budget-s
NO_CUDA_MESSAGE = ("clara_edge.bench.kernels: no CUDA device is available (torch.cuda.is_available() is False); "
                   "this benchmark needs an NVIDIA GPU such as an H100/H200 - nothing was measured.")
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 4e-3}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Row:
    model: str
    op: str                 # decode | prefill
    kv: str                 # bf16 | int8-token | int8-head | fp8-token | bf16-shared-prefix
    batch: int
    n: int                  # KV length (decode) or positions (prefill)
    backend: str            # triton | sdpa-flash | sdpa-cudnn | flex
    us: float | None = None
    gbps: float | None = None
    pct_copy: float | None = None
    tflops: float | None = None
    vs_best_torch: float | None = None   # best torch bf16 time / this time (> 1: faster)
    rel_err: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# Argument parsing and table formatting (pure Python: tested on CPU)
# ---------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m clara_edge.bench.kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="two decode shapes, one prefill length, no FlexAttention")
    p.add_argument("--json", metavar="OUT", help="write all rows and the device facts to this JSON file")
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    p.add_argument("--only", choices=("decode", "prefill"), help="run one section")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype of Q, K, V and the tail")
    p.add_argument("--tail", type=int, default=64, help="bf16 tail tokens (prompt/answer) after the quantised memory")
    p.add_argument("--reps", type=int, default=20, help="graph replays per measurement (median)")
    p.add_argument("--tune", action="store_true", help="also try a few tile/split configs per Triton decode row")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compiles take most of the time)")
    p.add_argument("--budget-s", type=float, default=540.0, help="stop starting new rows after this many seconds")
    args = p.parse_args(argv)
    if args.tail < 0 or args.reps < 1:
        p.error("--tail must be >= 0 and --reps >= 1")
    if args.quick:
        args.no_flex = True
    return args


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[Row]) -> str:
    """A llama-bench-style markdown table, one row per configuration."""
    header = ["model", "op", "kv", "B", "N", "backend", "µs", "GB/s", "% copy", "TFLOP/s", "vs best torch",
              "rel err", "note"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if h in ("B", "N", "µs", "GB/s", "% copy",
                                                                             "TFLOP/s", "vs best torch", "rel err")
                                                             else "---" for h in header) + "|"]
    for r in rows:
        cells = [r.model, r.op, r.kv, str(r.batch), str(r.n), r.backend, _fmt(r.us, ".1f"), _fmt(r.gbps, ".0f"),
                 _fmt(r.pct_copy, ".0f"), _fmt(r.tflops, ".1f"),
                 "-" if r.vs_best_torch is None else f"{r.vs_best_torch:.2f}x", _fmt(r.rel_err, ".1e"), r.note]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------
class Bench:
    """CUDA-graph timer with rotated inputs. (Tests subclass it to run the workloads on the CPU.)"""

    def __init__(self, reps: int):
        props = torch.cuda.get_device_properties(0)
        self.device = torch.device("cuda")
        self.name = props.name
        self.l2_bytes = int(getattr(props, "L2_cache_size", 50 * 2**20) or 50 * 2**20)
        self.reps = reps
        self.copy_gbps = None

    def sync(self) -> None:
        torch.cuda.synchronize()

    def copies_for(self, bytes_per_call: int, cap_bytes: int = 6 * 2**30, max_copies: int = 1024) -> int:
        """Rotated input copies so that consecutive calls never find their inputs in L2."""
        want = math.ceil(3 * self.l2_bytes / max(bytes_per_call, 1))
        return max(1, min(want, max_copies, cap_bytes // max(bytes_per_call, 1)))

    def time_calls(self, calls: list[Callable[[], object]], min_calls: int = 8) -> tuple[float, str]:
        """Median µs per call: all calls (cycled up to min_calls) captured in one CUDA graph, replayed reps times.
        Falls back to timing the same sequence eagerly if capture fails (reported in the note)."""
        seq = [calls[i % len(calls)] for i in range(max(len(calls), min_calls))]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for c in calls:                       # warm-up: JIT / autotune / compile outside the capture
                c()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        method = "graph"
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for c in seq:
                    c()
            run = graph.replay
            run()
        except Exception as exc:                  # e.g. a backend that syncs inside; keep the number, say so
            torch.cuda.synchronize()
            method = f"eager ({type(exc).__name__})"

            def run():
                for c in seq:
                    c()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(self.reps):
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / len(seq))
        return statistics.median(times), method

    def measure_copy(self) -> float:
        nbytes = 1 << 30
        src = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        dst = torch.empty_like(src)
        us, _ = self.time_calls([lambda: dst.copy_(src)], min_calls=4)
        self.copy_gbps = 2 * nbytes / us / 1e3
        return self.copy_gbps


# ---------------------------------------------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------------------------------------------
def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION}[name]


_FLEX = None


def _flex():
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 128)
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


_BLOCK_MASKS: dict = {}


def _causal_block_mask(t: int, device: torch.device):
    if (t, device) not in _BLOCK_MASKS:
        from torch.nn.attention.flex_attention import create_block_mask

        _BLOCK_MASKS[(t, device)] = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, t, t, device=device)
    return _BLOCK_MASKS[(t, device)]


def torch_decode_variants(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Ways to run decode with GQA on a torch backend (the fastest is kept): native GQA with a [B, Hq, 1, D]
    query, and packed GQA (the group's heads as query rows of one KV head: [B, Hkv, G, D], no mask)."""
    import torch.nn.functional as F

    b, hq, d = q.shape
    hkv = k.shape[1]
    q_native, q_packed = q.unsqueeze(2), q.view(b, hkv, hq // hkv, d)
    if backend == "flex":
        flex = _flex()
        return {"gqa": lambda: flex(q_native, k, v, enable_gqa=True)}
    from torch.nn.attention import sdpa_kernel

    kind = _sdpa_backend(backend)

    def run(qq, **kw):
        def call():
            with sdpa_kernel(kind):
                return F.scaled_dot_product_attention(qq, k, v, **kw)
        return call
    return {"gqa": run(q_native, enable_gqa=True), "packed": run(q_packed)}


def torch_prefill_variants(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Causal prefill, q [B, Hq, T, D], k/v [B, Hkv, T, D]: native GQA, or K/V expanded to Hq heads."""
    import torch.nn.functional as F

    group = q.shape[1] // k.shape[1]
    if backend == "flex":
        mask = _causal_block_mask(q.shape[2], q.device)
        flex = _flex()
        return {"gqa": lambda: flex(q, k, v, block_mask=mask, enable_gqa=True)}
    from torch.nn.attention import sdpa_kernel

    kind = _sdpa_backend(backend)
    ke, ve = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)

    def run(kk, vv, **kw):
        def call():
            with sdpa_kernel(kind):
                return F.scaled_dot_product_attention(q, kk, vv, is_causal=True, **kw)
        return call
    return {"gqa": run(k, v, enable_gqa=True), "expanded": run(ke, ve)}


class Runner:
    def __init__(self, bench: Bench, args: argparse.Namespace):
        self.b = bench
        self.args = args
        self.rows: list[Row] = []
        self.t0 = time.time()

    def out_of_time(self, fraction: float = 1.0) -> bool:
        return time.time() - self.t0 > fraction * self.args.budget_s

    def torch_backends(self) -> list[str]:
        """FlexAttention's compiles are the slowest part of a run: drop it first when the run falls behind."""
        late = self.out_of_time(FLEX_BUDGET_FRACTION)
        return [b for b in TORCH_BACKENDS if not (b == "flex" and (self.args.no_flex or late))]

    def add(self, row: Row, nbytes: int | None = None, flops: float | None = None) -> Row:
        if row.us is not None:
            if nbytes is not None:
                row.gbps = nbytes / row.us / 1e3
                row.pct_copy = 100.0 * row.gbps / self.b.copy_gbps if self.b.copy_gbps else None
            if flops is not None:
                row.tflops = flops / row.us / 1e6
        self.rows.append(row)
        print(f"  {row.model:13s} {row.op:7s} {row.kv:18s} B={row.batch:<4d} N={row.n:<5d} {row.backend:11s} "
              f"{_fmt(row.us, '9.1f')} µs {row.note}", flush=True)
        return row

    def time_variants(self, variant_sets: list[dict[str, Callable]]) -> tuple[float | None, str]:
        """variant_sets[i] maps variant name -> call on input copy i; returns the best (µs, note)."""
        best, note = None, ""
        for name in variant_sets[0]:
            try:
                us, method = self.b.time_calls([vs[name] for vs in variant_sets])
            except Exception as exc:   # unsupported shape/dtype for this backend: skip the variant
                note = note or f"{name}: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:80]}"
                self.b.sync()
                continue
            if best is None or us < best:
                best, note = us, f"{name}" + ("" if method == "graph" else f", {method}")
        return best, note

    def torch_rows(self, base: dict, variants: Callable, inputs: list[tuple], nbytes: int,
                   flops: float | None = None) -> float | None:
        """One row per torch backend on the same inputs (best variant each); returns the best time (µs)."""
        rows = []
        for backend in self.torch_backends():
            if self.out_of_time():
                break
            try:
                sets = [variants(backend, *x) for x in inputs]
            except Exception as exc:
                self.add(Row(**base, backend=backend, note=f"skipped: {type(exc).__name__}"))
                continue
            us, note = self.time_variants(sets)
            rows.append(self.add(Row(**base, backend=backend, us=us, note=note if us else f"skipped: {note}"),
                                 nbytes, flops))
        times = [r.us for r in rows if r.us]
        best = min(times) if times else None
        for r in rows:
            r.vs_best_torch = best / r.us if best and r.us else None
        return best

    def triton_row(self, base: dict, dtype: torch.dtype, best_torch: float | None, nbytes: int,
                   check: Callable[[], float], calls: Callable[[dict | None], list[Callable]],
                   configs=(None,), note: str = "", flops: float | None = None) -> Row:
        """Check a Triton kernel against the reference, time it (best of `configs`), add its row. Any error
        (e.g. a kernel that does not compile on this GPU) becomes the row's note instead of ending the run."""
        best, best_cfg, err = None, None, None
        try:
            err = check()
            for cfg in configs:
                try:
                    us, _ = self.b.time_calls(calls(cfg))
                except Exception as exc:
                    print(f"    config {cfg} failed: {type(exc).__name__}: {exc}")
                    self.b.sync()
                    continue
                if best is None or us < best:
                    best, best_cfg = us, cfg
        except Exception as exc:
            note = f"error: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"[:160]
        if err is not None and err > TOLERANCE[dtype]:
            note = "FAIL accuracy " + note
        if best_cfg:
            note = (note + f" cfg {best_cfg}").strip()
        return self.add(Row(**base, backend="triton", us=best, rel_err=err, note=note,
                            vs_best_torch=best_torch / best if best and best_torch else None,
                            extra={"config": best_cfg}), nbytes, flops)

    # ---- decode ------------------------------------------------------------------------------------------------
    def decode(self, model: str, batch: int, n: int) -> None:
        from clara_edge.kernels import (cascade_decode_attention, decode_attention, decode_attention_quant,
                                        decode_attention_quant_reference, decode_attention_reference, quantize_kv,
                                        rel_error)
        from clara_edge.kernels.reference import cascade_decode_reference

        cfg, dev, dt = MODELS[model], self.b.device, DTYPES[self.args.dtype]
        hq, hkv, d = cfg["hq"], cfg["hkv"], cfg["d"]
        kv_bytes = 2 * batch * hkv * n * d * 2
        qo_bytes = 2 * batch * hq * d * 2
        copies = self.b.copies_for(kv_bytes + qo_bytes)
        gen = torch.Generator(device=dev).manual_seed(batch * 100003 + n)
        inputs = [(torch.randn(batch, hq, d, device=dev, dtype=dt, generator=gen),
                   torch.randn(batch, hkv, n, d, device=dev, dtype=dt, generator=gen),
                   torch.randn(batch, hkv, n, d, device=dev, dtype=dt, generator=gen)) for _ in range(copies)]
        base = dict(model=model, op="decode", batch=batch, n=n)

        # torch backends on the bf16 KV
        best_torch = self.torch_rows(dict(base, kv=self.args.dtype), torch_decode_variants, inputs,
                                     kv_bytes + qo_bytes)

        # Triton, bf16 KV
        q0, k0, v0 = inputs[0]
        self.triton_row(
            dict(base, kv=self.args.dtype), dt, best_torch, kv_bytes + qo_bytes,
            check=lambda: rel_error(decode_attention(q0, k0, v0),
                                    decode_attention_reference(q0.float(), k0.float(), v0.float())),
            calls=lambda c: [lambda x=x: decode_attention(*x, **(c or {})) for x in inputs],
            configs=self._decode_configs(d) if self.args.tune else (None,))

        # Triton, quantised memory KV + bf16 tail (ratio against the best torch run on the full bf16 KV)
        tail = min(self.args.tail, n)
        n_mem = n - tail
        for qdtype, per_token, label in ((torch.int8, True, "int8-token"), (torch.int8, False, "int8-head"),
                                         (torch.float8_e4m3fn, True, "fp8-token")):
            if self.out_of_time():
                break
            qsets = []
            for q, k, v in inputs:
                km, ks = quantize_kv(k[:, :, :n_mem], qdtype, per_token, scale_dtype=torch.float16)
                vm, vs = quantize_kv(v[:, :, :n_mem], qdtype, per_token, scale_dtype=torch.float16)
                qsets.append((q, km, vm, ks, vs, k[:, :, n_mem:].contiguous(), v[:, :, n_mem:].contiguous()))
            x0 = qsets[0]
            scale_bytes = 2 * batch * hkv * (n_mem if per_token else 1) * 2
            self.triton_row(
                dict(base, kv=label), dt, best_torch,
                2 * batch * hkv * d * (n_mem + 2 * tail) + scale_bytes + qo_bytes,
                check=lambda x0=x0: rel_error(decode_attention_quant(*x0),
                                              decode_attention_quant_reference(x0[0].float(), *x0[1:])),
                calls=lambda c, qsets=qsets: [lambda x=x: decode_attention_quant(*x) for x in qsets],
                note=f"mem {n_mem} + {self.args.dtype} tail {tail}")

        # Cascade: the memory prefix shared by the whole batch (read once), per-sequence bf16 tail
        if batch >= CASCADE_MIN_BATCH and n_mem > 0 and not self.out_of_time():
            csets = [(q, k[0, :, :n_mem].contiguous(), v[0, :, :n_mem].contiguous(),
                      k[:, :, n_mem:].contiguous(), v[:, :, n_mem:].contiguous()) for q, k, v in inputs]
            x0 = csets[0]
            self.triton_row(
                dict(base, kv=f"{self.args.dtype}-shared-prefix"), dt, best_torch,
                2 * hkv * n_mem * d * 2 + 2 * batch * hkv * tail * d * 2 + qo_bytes,
                check=lambda: rel_error(cascade_decode_attention(*x0),
                                        cascade_decode_reference(x0[0].float(), *(t.float() for t in x0[1:]))),
                calls=lambda c: [lambda x=x: cascade_decode_attention(*x) for x in csets],
                note=f"prefix {n_mem} shared, tail {tail}; vs torch on the unshared KV")
        torch.cuda.empty_cache()

    @staticmethod
    def _decode_configs(d: int) -> list[dict | None]:
        return [None, dict(config=dict(BLOCK_N=64, num_warps=4, num_stages=4)),
                dict(config=dict(BLOCK_N=128 if d <= 64 else 32, num_warps=4, num_stages=2)),
                dict(config=dict(BLOCK_N=64, num_warps=8, num_stages=3))]

    # ---- prefill -----------------------------------------------------------------------------------------------
    def prefill(self, model: str, positions: int) -> None:
        from clara_edge.kernels import prefill_attention_batched, rel_error
        from clara_edge.kernels.reference import prefill_attention_batched_reference

        cfg, dev, dt = MODELS[model], self.b.device, DTYPES[self.args.dtype]
        hq, hkv, d, t = cfg["hq"], cfg["hkv"], cfg["d"], positions
        nbytes = 2 * (hq + 2 * hkv) * t * d + 2 * hq * t * d
        flops = 4.0 * hq * d * t * (t + 1) / 2
        copies = self.b.copies_for(nbytes, max_copies=64)
        gen = torch.Generator(device=dev).manual_seed(t)
        inputs = [(torch.randn(1, hq, t, d, device=dev, dtype=dt, generator=gen),
                   torch.randn(1, hkv, t, d, device=dev, dtype=dt, generator=gen),
                   torch.randn(1, hkv, t, d, device=dev, dtype=dt, generator=gen)) for _ in range(copies)]
        base = dict(model=model, op="prefill", kv=self.args.dtype, batch=1, n=t)
        best_torch = self.torch_rows(base, torch_prefill_variants, inputs, nbytes, flops)
        q0, k0, v0 = inputs[0]
        self.triton_row(
            base, dt, best_torch, nbytes, flops=flops,
            check=lambda: rel_error(prefill_attention_batched(q0, k0, v0),
                                    prefill_attention_batched_reference(q0.float(), k0.float(), v0.float())),
            calls=lambda c: [lambda x=x: prefill_attention_batched(*x) for x in inputs])
        torch.cuda.empty_cache()


def run(args: argparse.Namespace, bench: Bench) -> tuple[dict, list[Row]]:
    """Every section and shape of `args` on `bench`; returns (JSON report, rows)."""
    import triton

    runner = Runner(bench, args)
    copy = bench.measure_copy()
    print(f"{bench.name}: L2 {bench.l2_bytes / 2**20:.0f} MiB, device copy {copy:.0f} GB/s (read + write), "
          f"torch {torch.__version__}, triton {triton.__version__}", flush=True)
    decode_shapes = QUICK_DECODE_SHAPES if args.quick else DECODE_SHAPES
    prefill_positions = QUICK_PREFILL_POSITIONS if args.quick else PREFILL_POSITIONS
    skipped = []

    def report() -> dict:
        return dict(device=bench.name, l2_bytes=bench.l2_bytes, copy_gbps=copy, torch=torch.__version__,
                    triton=triton.__version__, cuda=torch.version.cuda, python=platform.python_version(),
                    args=vars(args), elapsed_s=time.time() - runner.t0, skipped=skipped,
                    rows=[asdict(r) for r in runner.rows])

    out = report_path(args.json, "kernel benchmark")

    def checkpoint() -> None:
        """Rewrite the JSON after every shape, so a run cut short still leaves its rows."""
        if out is not None:
            partial = out.with_name(out.name + ".partial")
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps(report(), indent=1))
            os.replace(partial, out)  # a kill mid-write leaves the previous checkpoint, not half a file

    # Decode (the targets) for both models first, then prefill; a run short of time skips whole shapes.
    work = [("decode", model, shape) for model in args.models for shape in decode_shapes
            if args.only in (None, "decode")]
    work += [("prefill", model, (t,)) for model in args.models for t in prefill_positions
             if args.only in (None, "prefill")]
    for op, model, shape in work:
        if runner.out_of_time():
            skipped.append(f"{model} {op} {'x'.join(map(str, shape))}")
            continue
        try:
            getattr(runner, op)(model, *shape)
        except Exception:                       # keep the other shapes: one failure must not cost the run
            traceback.print_exc()
            skipped.append(f"{model} {op} {'x'.join(map(str, shape))} (error, see log)")
            bench.sync()
        checkpoint()
    checkpoint()
    return report(), runner.rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report_path(args.json, "kernel benchmark")  # before the run, not at its first checkpoint
    except ClaraError as e:
        print(f"python -m clara_edge.bench.kernels: error: {e}", file=sys.stderr)
        return 1
    if not torch.cuda.is_available():
        print(NO_CUDA_MESSAGE, file=sys.stderr)
        return 2
    report, rows = run(args, Bench(args.reps))
    skipped = report["skipped"]
    print(f"\n{report['device']}, {args.dtype}, CUDA graphs, cold L2, median of {args.reps}; "
          f"copy {report['copy_gbps']:.0f} GB/s; {report['elapsed_s']:.0f} s"
          + (f"; skipped: {', '.join(skipped)}" if skipped else ""))
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
