"""docs/semantics.md "The forward" stated in plain PyTorch, for the torch tests: dense [N, N]
masks per branch and head, the multiplicity C, the two mixings, causal, GQA and empty rows, with
autograd through all of it. Independent of the C++ code (nothing here calls the operators).

reference(q, k, v, ...) -> (out, lse) in q's dtype; use double for exactness checks.
reference_by_branches(...) states the softmax mixing the other way the page gives it: per-branch
partials (O_i, LSE_i) merged with the weights exp(LSE_i - LSE) -- with detach_weights=True those
weights are treated as constants, which is the gradient the library must *not* return.
"""

import math

import torch


def head_offsets(offsets, num_heads, dilation_rates):
    """offset[i][h]: the offset head h uses in branch i, or None when it does not run branch i
    (docs/semantics.md "Which offset a head uses")."""
    groups = len(dilation_rates)
    if offsets == "modular":
        return [[h % r for h in range(num_heads)] for r in dilation_rates]
    if offsets == "blocked":
        return [[h // -(-num_heads // r) for h in range(num_heads)] for r in dilation_rates]
    if offsets == "partitioned":
        base, extra = divmod(num_heads, groups)
        group_of, start = [], 0
        for g in range(groups):
            size = base + (1 if g < extra else 0)
            group_of += [g] * size
            start += size
        return [[(i % r) if group_of[h] == i else None for h in range(num_heads)]
                for i, r in enumerate(dilation_rates)]
    raise ValueError(offsets)


def branch_mask(n, w, r, offset, causal):
    """[n, n] bool: query x attends key y in branch (w, r) at this offset."""
    x = torch.arange(n)
    segment = x // w
    selected = (x - segment * w) % r == offset
    mask = selected[:, None] & selected[None, :] & (segment[:, None] == segment[None, :])
    if causal:
        mask &= x[None, :] <= x[:, None]
    return mask


def _softmax_rows(s, count):
    """(P, LSE) of softmax(s + ln count) over the last dimension; empty rows give (0, -inf), and
    autograd never sees an inf or NaN."""
    live = count > 0
    top = torch.where(live, s, torch.full_like(s, -math.inf)).amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top)).detach()
    e = torch.where(live, count * torch.exp(torch.where(live, s, top) - top), torch.zeros_like(s))
    denom = e.sum(-1, keepdim=True)
    nonempty = denom > 0
    p = e / torch.where(nonempty, denom, torch.ones_like(denom))
    safe = torch.where(nonempty, denom, torch.ones_like(denom))
    lse = torch.where(nonempty, torch.log(safe) + top, torch.full_like(denom, -math.inf))
    return p, lse.squeeze(-1)


def _setup(q, k, segment_lengths, dilation_rates, causal, offsets, scale):
    b, n, h, d = q.shape
    group = h // k.shape[2]
    scale = (1.0 / math.sqrt(d)) if not scale else scale
    table = head_offsets(offsets, h, dilation_rates)
    masks = [[None if table[i][head] is None else
              branch_mask(n, segment_lengths[i], dilation_rates[i], table[i][head], causal)
              for head in range(h)] for i in range(len(segment_lengths))]
    return b, n, h, d, group, scale, masks


def reference(q, k, v, segment_lengths, dilation_rates, causal=False, offsets="modular",
              mixing="softmax", scale=None):
    b, n, h, d, group, scale, masks = _setup(q, k, segment_lengths, dilation_rates, causal,
                                             offsets, scale)
    g = len(segment_lengths)
    outs, lses = [], []
    for head in range(h):
        kh, vh = k[:, :, head // group], v[:, :, head // group]
        s = scale * q[:, :, head] @ kh.transpose(-1, -2)  # [b, n, n]
        count = sum(m.to(s.dtype) for m in (masks[i][head] for i in range(g)) if m is not None)
        if not torch.is_tensor(count):
            count = torch.zeros(n, n, dtype=s.dtype)
        p, lse = _softmax_rows(s, count.expand_as(s))
        if mixing == "softmax":
            out = p @ vh
        else:  # mean: each branch its own softmax, averaged with the fixed weight 1/G
            out = torch.zeros_like(q[:, :, head])
            for i in range(g):
                if masks[i][head] is not None:
                    p_i, _ = _softmax_rows(s, masks[i][head].to(s.dtype).expand_as(s))
                    out = out + (p_i @ vh) / g
        outs.append(out)
        lses.append(lse)
    return torch.stack(outs, dim=2), torch.stack(lses, dim=1)


def reference_by_branches(q, k, v, segment_lengths, dilation_rates, causal=False,
                          offsets="modular", scale=None, detach_weights=False):
    """The softmax mixing as merged partials: O = sum_i exp(LSE_i - LSE) O_i."""
    b, n, h, d, group, scale, masks = _setup(q, k, segment_lengths, dilation_rates, causal,
                                             offsets, scale)
    outs = []
    for head in range(h):
        kh, vh = k[:, :, head // group], v[:, :, head // group]
        s = scale * q[:, :, head] @ kh.transpose(-1, -2)
        partials = []
        for i in range(len(segment_lengths)):
            if masks[i][head] is not None:
                p_i, lse_i = _softmax_rows(s, masks[i][head].to(s.dtype).expand_as(s))
                partials.append((p_i @ vh, lse_i))
        if not partials:
            outs.append(torch.zeros_like(q[:, :, head]))
            continue
        lse_all = torch.stack([l for _, l in partials])
        top = lse_all.amax(0)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        weights = torch.where(torch.isfinite(lse_all), torch.exp(lse_all - top),
                              torch.zeros_like(lse_all))
        total = weights.sum(0)
        weights = weights / torch.where(total > 0, total, torch.ones_like(total))
        if detach_weights:
            weights = weights.detach()
        outs.append(sum(w[..., None] * o for (o, _), w in zip(partials, weights)))
    return torch.stack(outs, dim=2)
