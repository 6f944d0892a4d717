#!/usr/bin/env python3
"""The PyTorch baseline for the GPU benchmarks (issues #15 and #20): dilated attention as a
PyTorch user writes it, in the style of dilated-attention-pytorch's DilatedAttention, with the
exact semantics of docs/MATH.md so that its output can be checked against ours.

- GROUPED: per pattern, the kept rows of every segment gathered into [batch * segments, heads,
  kept, head_dim] and handed to torch's scaled_dot_product_attention (flash or memory-efficient
  kernels on a GPU), the result scattered back and divided by the number of patterns.
- LONGNET: the public SDPA returns no log-sum-exp. On a GPU in fp16/bf16 each pattern runs
  torch's flash kernel through the op that returns it (aten._scaled_dot_product_flash_attention,
  as ring- and LongNet-style PyTorch code does); elsewhere (or with --lse math) each pattern's
  attention is written out (scores, logsumexp, weights, values) in fp32, segment chunks bounded in
  memory. The patterns are folded by their log-sum-exps.

Both handle partial last segments, w > N, r not dividing w, causal and grouped-query attention.

    torch_baseline.py --seq-len 1048576 --heads 16 --head-dim 128 --segments 2048,4096,8192 \\
        --dilations 1,2,4 --mode grouped --dtype bf16 --device cuda --repeat 5 --peak

prints the median time over --repeat timed runs (after one warm-up), the FLOPs of docs/MATH.md's
cost formula and the rate, and with --peak the in-run bf16 matrix-multiply rate; --check compares
with the float64 numpy reference (tests/python/numpy_reference.py; small problems only).
tests/python/test_torch_baseline.py checks it against the reference across the semantics.
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_SCORE_BYTES = 1 << 30  # LONGNET: scores held at once, at most.


def _places(seq_len, w):
    """(start, segments, length) runs of whole segments of length min(w, N): the full ones, then
    the partial last one."""
    w = min(w, seq_len)
    full = seq_len // w
    if full:
        yield 0, full, w
    if seq_len % w:
        yield full * w, 1, seq_len % w


def _kept(x, start, count, length, r, o, heads):
    """The kept rows of `count` segments of x ([B, N, Hx, D]) from start, offset o, dilation r,
    heads (a slice or index tensor): a view [B, count, m, h, D] when heads is a slice."""
    batch, _, hx, dim = x.shape
    region = x[:, start:start + count * length].view(batch, count, length, hx, dim)[:, :, o::r]
    return region[:, :, :, heads]


def _bhsd(x):
    """[B, count, m, h, D] as the [B * count, h, m, D] that SDPA takes."""
    b, count, m, h, d = x.shape
    return x.permute(0, 1, 3, 2, 4).reshape(b * count, h, m, d)


def _from_bhsd(x, batch, count):
    bc, h, m, d = x.shape
    return x.reshape(batch, count, h, m, d).permute(0, 1, 3, 2, 4)


def _kv_heads(h0, h1, heads, kv_heads, device):
    """The kv head each query head in [h0, h1) reads (docs/MATH.md, GQA)."""
    return torch.arange(h0, h1, device=device) // (heads // kv_heads)


def _grouped(q, k, v, segments, dilations, causal, scale):
    batch, seq_len, heads, _ = q.shape
    patterns = len(segments)
    out = torch.zeros_like(q)
    base, extra = divmod(heads, patterns)
    h0 = 0
    for i, (w, r) in enumerate(zip(segments, dilations)):
        h1 = h0 + base + (1 if i < extra else 0)
        if h1 == h0:
            continue
        kv = _kv_heads(h0, h1, heads, k.shape[2], q.device)
        for start, count, length in _places(seq_len, w):
            if i % r >= length:
                continue  # A partial segment too short to keep anything at this offset.
            qs = _bhsd(_kept(q, start, count, length, r, i % r, slice(h0, h1)))
            ks = _bhsd(_kept(k, start, count, length, r, i % r, kv))
            vs = _bhsd(_kept(v, start, count, length, r, i % r, kv))
            result = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale)
            _kept(out, start, count, length, r, i % r, slice(h0, h1))[:] = _from_bhsd(
                result, batch, count)
        h0 = h1
    return out.div_(patterns)


def _attention_with_lse(qs, ks, vs, causal, scale):
    """Softmax attention of [S, h, m, D] in fp32 with its log-sum-exp [S, h, m]."""
    scores = torch.matmul(qs.float(), ks.float().transpose(-1, -2)).mul_(scale)
    if causal:
        m = scores.shape[-1]
        mask = torch.ones(m, m, dtype=torch.bool, device=scores.device).triu_(1)
        scores.masked_fill_(mask, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    weights = scores.sub_(lse.unsqueeze(-1)).exp_()
    return torch.matmul(weights, vs.float()), lse


def _flash_with_lse(qs, ks, vs, causal, scale):
    """torch's flash attention of [S, h, m, D] (fp16/bf16 on a GPU), with its natural-log
    log-sum-exp [S, h, m] in fp32."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
        qs, ks, vs, 0.0, causal, False, scale=scale)[:2]
    return out.float(), lse


def _longnet(q, k, v, segments, dilations, causal, scale, lse="auto"):
    batch, seq_len, heads, dim = q.shape
    acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    acc_lse = torch.full(q.shape[:3] + (1,), -math.inf, dtype=torch.float32, device=q.device)
    if lse == "auto":
        lse = "flash" if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) else "math"
    attend = _flash_with_lse if lse == "flash" else _attention_with_lse
    for w, r in zip(segments, dilations):
        run = -(-heads // r)  # Head j uses offset floor(j / ceil(H / r)).
        for o in range(r):
            h0, h1 = o * run, min(heads, (o + 1) * run)
            if h0 >= h1:
                break
            kv = _kv_heads(h0, h1, heads, k.shape[2], q.device)
            for start, count, length in _places(seq_len, w):
                if o >= length:
                    continue
                m = len(range(o, length, r))
                step = (count if attend is _flash_with_lse else
                        max(1, _SCORE_BYTES // (batch * (h1 - h0) * m * m * 4)))
                for c0 in range(0, count, step):
                    c = min(step, count - c0)
                    s0 = start + c0 * length
                    out, lse = attend(
                        _bhsd(_kept(q, s0, c, length, r, o, slice(h0, h1))),
                        _bhsd(_kept(k, s0, c, length, r, o, kv)),
                        _bhsd(_kept(v, s0, c, length, r, o, kv)), causal, scale)
                    a = _kept(acc, s0, c, length, r, o, slice(h0, h1))
                    a_lse = _kept(acc_lse, s0, c, length, r, o, slice(h0, h1))
                    lse = _from_bhsd(lse.unsqueeze(-1), batch, c)
                    new = torch.logaddexp(a_lse, lse)
                    a.mul_(torch.exp(a_lse - new)).add_(_from_bhsd(out, batch, c) *
                                                         torch.exp(lse - new))
                    a_lse.copy_(new)
    return acc.to(q.dtype)


def dilated_attention(q, k, v, segments, dilations, causal=False, scale=None, mode="longnet",
                      lse="auto"):
    """Dilated attention of q [B, N, H, D] over k, v [B, N, Hkv, D] (docs/MATH.md); lse: how
    LONGNET's per-pattern attention is computed ("flash", "math", "auto": flash on a GPU in
    fp16/bf16)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if mode not in ("grouped", "longnet"):
        raise ValueError(f"mode {mode!r}: grouped or longnet")
    if mode == "grouped":
        return _grouped(q, k, v, list(segments), list(dilations), causal, scale)
    return _longnet(q, k, v, list(segments), list(dilations), causal, scale, lse)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, repeat):
    """Median seconds of repeat runs after one warm-up, and every run's."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def matmul_peak(device, dtype, size=8192, repeat=10):
    """The best matrix-multiply rate of repeat size^3 products on random data, in FLOP/s."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    _, times = _timed(lambda: torch.matmul(a, b), device, repeat)
    return 2.0 * size ** 3 / min(times)


def cost_flops(seq_len, heads, head_dim, segments, dilations, causal, batch=1, mode="longnet"):
    """docs/MATH.md, Cost: 4 N D w / r^2 per head per pattern (half with causal); LONGNET runs
    every pattern on every head, GROUPED each pattern on its group of heads only."""
    patterns = len(segments)
    base, extra = divmod(heads, patterns)
    flops = sum((heads if mode == "longnet" else base + (1 if i < extra else 0)) *
                4 * seq_len * head_dim * min(w, seq_len) / (r * r)
                for i, (w, r) in enumerate(zip(segments, dilations)))
    return batch * flops * (0.5 if causal else 1.0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, required=True)
    parser.add_argument("--heads", type=int, required=True)
    parser.add_argument("--kv-heads", type=int, default=0, help="0: as --heads")
    parser.add_argument("--head-dim", type=int, required=True)
    parser.add_argument("--segments", required=True, help="comma-separated segment lengths")
    parser.add_argument("--dilations", required=True, help="comma-separated dilation rates")
    parser.add_argument("--mode", choices=("grouped", "longnet"), default="longnet")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--peak", action="store_true", help="also the in-run matmul rate")
    parser.add_argument("--check", action="store_true", help="against the numpy reference")
    parser.add_argument("--json", help="write the figures to this file too")
    parser.add_argument("--lse", choices=("auto", "flash", "math"), default="auto",
                        help="LONGNET's per-pattern attention: torch's flash op with its "
                             "log-sum-exp (auto: on a GPU in fp16/bf16) or written out in fp32")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = _DTYPES[args.dtype]
    segments = [int(x) for x in args.segments.split(",")]
    dilations = [int(x) for x in args.dilations.split(",")]
    kv_heads = args.kv_heads or args.heads
    generator = torch.Generator(device=device).manual_seed(1)
    q = torch.randn(args.batch, args.seq_len, args.heads, args.head_dim, device=device,
                    generator=generator).to(dtype)
    k, v = (torch.randn(args.batch, args.seq_len, kv_heads, args.head_dim, device=device,
                        generator=generator).to(dtype) for _ in range(2))
    name = (f"B={args.batch} N={args.seq_len} H={args.heads} Hkv={kv_heads} D={args.head_dim} "
            f"patterns {list(zip(segments, dilations))} {args.mode}"
            f"{' causal' if args.causal else ''} {args.dtype} on {device}")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"problem   {name} ({gpu}, torch {torch.__version__})")

    def run():
        return dilated_attention(q, k, v, segments, dilations, args.causal, mode=args.mode,
                                 lse=args.lse)

    median, times = _timed(run, device, args.repeat)
    flops = cost_flops(args.seq_len, args.heads, args.head_dim, segments, dilations,
                       args.causal, args.batch, args.mode)
    figures = {"problem": name, "device": gpu, "median_s": median, "times_s": times,
               "gflop": flops / 1e9, "gflops": flops / median / 1e9}
    print(f"time      median {median:.4f} s over {args.repeat} runs "
          f"(min {min(times):.4f}, max {max(times):.4f})")
    print(f"compute   {flops / 1e9:.1f} GFLOP (docs/MATH.md's cost), "
          f"{flops / median / 1e9:.1f} GFLOP/s")
    if args.peak:
        peak = matmul_peak(device, dtype)
        figures["matmul_peak_gflops"] = peak / 1e9
        print(f"peak      {args.dtype} matmul {peak / 1e9:.1f} GFLOP/s in this run: "
              f"{100 * flops / median / peak:.1f}% of it")
    if args.check:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir,
                                        "tests", "python"))
        import numpy as np
        import numpy_reference as ref
        want = ref.dilated_attention(*(t.float().cpu().numpy() for t in (q, k, v)), segments,
                                     dilations, causal=args.causal,
                                     mode=ref.GROUPED if args.mode == "grouped" else ref.LONGNET)
        got = run().float().cpu().numpy()
        error = float(np.max(np.abs(got - want)))
        relative = float(np.linalg.norm(got - want) / np.linalg.norm(want))
        tolerance = 1e-4 if dtype == torch.float32 else 2e-2
        figures.update(max_abs_error=error, relative_l2=relative, check_ok=relative <= tolerance)
        print(f"check     max abs error {error:.2e}, relative L2 {relative:.2e} against the "
              f"float64 reference (tolerance {tolerance:g}): "
              f"{'ok' if relative <= tolerance else 'FAILED'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    if not figures.get("check_ok", True):
        sys.exit(1)


if __name__ == "__main__":
    main()
