"""Dilated attention in numpy, float64, written from docs/MATH.md and nothing else.

This is the independent statement of the math the Python tests compare the server with. It shares
no code with the engine: if both were wrong the same way, it would have to be by reading MATH.md
the same wrong way.

    out = dilated_attention(q, k, v, segment_lengths=[4, 8], dilation_rates=[1, 2],
                            causal=False, scale=None, mode="longnet")

q is [B, N, H, D], k and v are [B, N, Hkv, D] with Hkv dividing H; any float dtype (fp16 inputs
are widened exactly). The result is float64 [B, N, H, D].
"""

import math

import numpy as np

LONGNET = "longnet"
GROUPED = "grouped"


def kept_positions(seq_len, segment_len, dilation, offset):
    """Kept positions of every segment: a list with one int64 array per segment, ascending."""
    if not 0 <= offset < dilation <= segment_len:
        raise ValueError(f"need 0 <= offset < dilation <= segment_len, got {offset}, "
                         f"{dilation}, {segment_len}")
    kept = []
    for start in range(0, seq_len, segment_len):
        positions = start + np.arange(offset, segment_len, dilation, dtype=np.int64)
        kept.append(positions[positions < seq_len])
    return kept


def longnet_offset(head, heads, dilation):
    """LONGNET: head j uses offset floor(j / ceil(H / r))."""
    return head // math.ceil(heads / dilation)


def grouped_head_groups(heads, patterns):
    """GROUPED: contiguous head ranges per pattern; the first H % P groups get one extra head."""
    base, extra = divmod(heads, patterns)
    groups, start = [], 0
    for i in range(patterns):
        size = base + (1 if i < extra else 0)
        groups.append(range(start, start + size))
        start += size
    return groups


def _attend_set(q, k, v, positions, scale, causal):
    """Dense softmax attention among `positions` for the heads given in q, k, v ([B, N, h, D]).

    Returns (out [B, n, h, D], lse [B, n, h]) for the n kept positions.
    """
    qs, ks, vs = q[:, positions], k[:, positions], v[:, positions]
    scores = np.einsum("bnhd,bmhd->bhnm", qs, ks) * scale
    if causal:
        n = len(positions)
        # positions are ascending, so index order is position order.
        future = np.triu(np.ones((n, n), dtype=bool), k=1)
        scores = np.where(future, -np.inf, scores)
    top = scores.max(axis=-1, keepdims=True)
    lse = top + np.log(np.exp(scores - top).sum(axis=-1, keepdims=True))
    weights = np.exp(scores - lse)
    out = np.einsum("bhnm,bmhd->bnhd", weights, vs)
    return out, lse[..., 0].transpose(0, 2, 1)


def dilated_attention(q, k, v, segment_lengths, dilation_rates, causal=False, scale=None,
                      mode=LONGNET):
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    batch, seq_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"kv heads {kv_heads} do not divide heads {heads}")
    if len(segment_lengths) != len(dilation_rates) or not segment_lengths:
        raise ValueError("need one dilation per segment length, at least one pattern")
    # Query head j reads key/value head j / (H / Hkv): repeat each kv head H / Hkv times.
    k = np.repeat(k, heads // kv_heads, axis=2)
    v = np.repeat(v, heads // kv_heads, axis=2)
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    num_patterns = len(segment_lengths)

    # Per pattern: its output and its LSE; LSE -inf where the pattern did not keep the position.
    outs = np.zeros((num_patterns, batch, seq_len, heads, head_dim))
    lses = np.full((num_patterns, batch, seq_len, heads), -np.inf)
    groups = grouped_head_groups(heads, num_patterns) if mode == GROUPED else None
    for i, (w, r) in enumerate(zip(segment_lengths, dilation_rates)):
        if mode == LONGNET:
            heads_by_offset = {}
            for j in range(heads):
                heads_by_offset.setdefault(longnet_offset(j, heads, r), []).append(j)
        elif mode == GROUPED:
            heads_by_offset = {i % r: list(groups[i])} if len(groups[i]) else {}
        else:
            raise ValueError(f"unknown mode {mode}")
        for offset, head_list in heads_by_offset.items():
            hs = np.array(head_list)
            for positions in kept_positions(seq_len, w, r, offset):
                if len(positions) == 0:
                    continue
                out, lse = _attend_set(q[:, :, hs], k[:, :, hs], v[:, :, hs], positions, scale,
                                       causal)
                outs[i][np.ix_(np.arange(batch), positions, hs)] = out
                lses[i][np.ix_(np.arange(batch), positions, hs)] = lse

    if mode == GROUPED:
        # Each head ran one pattern; the others left zeros there.
        return outs.sum(axis=0) / num_patterns
    # LONGNET: softmax over the LSEs of the patterns that kept the position; 0 where none did.
    kept = np.isfinite(lses)
    top = np.where(kept, lses, -np.inf).max(axis=0)
    top = np.where(np.isfinite(top), top, 0.0)
    alpha = np.where(kept, np.exp(lses - top), 0.0)
    total = alpha.sum(axis=0)
    alpha = np.divide(alpha, total, out=np.zeros_like(alpha), where=total > 0)
    return (alpha[..., None] * outs).sum(axis=0)


def cost_flops(seq_len, heads, head_dim, segment_lengths, dilation_rates, causal=False):
    """Approximate FLOPs of a request (docs/MATH.md, Cost): 4 N D w / r^2 per head per pattern."""
    flops = sum(4 * seq_len * head_dim * w / (r * r)
                for w, r in zip(segment_lengths, dilation_rates))
    return heads * flops * (0.5 if causal else 1.0)
