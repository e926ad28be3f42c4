"""Drop-in PyTorch modules over the `torch.ops.dilated_attention` operators (docs/torch.md).

    from dilated_attention_torch import DilatedAttention, MultiheadDilatedAttention

replaces `from dilated_attention_pytorch import DilatedAttention, MultiheadDilatedAttention`: the
same constructor arguments, the same input layout ([batch, seq, heads, head_dim] for the core,
[batch, seq, embed_dim] for the multi-head module) and, with the default preset, the same numbers
(partitioned offsets + mean mixing). `preset="torchscale"` gives torchscale's (blocked + softmax),
`preset="longnet"` the paper's (modular + softmax, the library's default).

The operators are compiled on first use with torch.utils.cpp_extension.load over the one-line
source python/dilated_attention_ops.cpp, unless they are registered already (e.g. by
torch.ops.load_library on a library built with CMake, docs/torch.md).
"""

import os

import torch
from torch import nn

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PRESETS = {
    # dilated-attention-pytorch's DilatedAttention / MultiheadDilatedAttention
    "dilated_attention_pytorch": {"offsets": "partitioned", "mixing": "mean"},
    # microsoft/torchscale's DilatedAttention
    "torchscale": {"offsets": "blocked", "mixing": "softmax"},
    # the LongNet paper (and the C++ library's default Config)
    "longnet": {"offsets": "modular", "mixing": "softmax"},
}


def ops_registered():
    """True when torch.ops.dilated_attention.forward exists in this process."""
    try:
        torch.ops.dilated_attention.forward
        return True
    except (AttributeError, RuntimeError):
        return False


def load_ops(verbose=False, eigen_include="/usr/include/eigen3", cuda=None):
    """Registers the operators (compiling them once per cache: TORCH_EXTENSIONS_DIR, else
    ~/.cache/torch_extensions) and returns torch.ops.dilated_attention.

    cuda=None compiles the CUDA kernels too when torch.cuda.is_available(): the one-line source
    as a .cu file, through nvcc (CUDA_HOME; TORCH_CUDA_ARCH_LIST picks the architectures). The
    -U flags undo cpp_extension's default -D__CUDA_NO_HALF_OPERATORS__ and friends, which the
    library's __half / __nv_bfloat16 code needs. That path is compiled, not yet run on a GPU."""
    if ops_registered():
        return torch.ops.dilated_attention
    from torch.utils import cpp_extension

    if cuda is None:
        cuda = torch.cuda.is_available()
    if not cuda:
        cpp_extension.load(
            name="dilated_attention_ops",
            sources=[os.path.join(_ROOT, "python", "dilated_attention_ops.cpp")],
            extra_include_paths=[os.path.join(_ROOT, "include"), eigen_include],
            extra_cflags=["-O3", "-DNDEBUG"],
            is_python_module=False,
            verbose=verbose,
        )
    else:
        cpp_extension.load(
            name="dilated_attention_ops_cuda",
            sources=[os.path.join(_ROOT, "python", "dilated_attention_ops_cuda.cu")],
            extra_include_paths=[os.path.join(_ROOT, "include"), eigen_include],
            extra_cflags=["-O3", "-DNDEBUG"],
            extra_cuda_cflags=["-O3", "-DNDEBUG", "--expt-relaxed-constexpr",
                               "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                               "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                               "-U__CUDA_NO_HALF2_OPERATORS__"],
            is_python_module=False,
            verbose=verbose,
        )
    return torch.ops.dilated_attention


def dilated_attention(q, k, v, segment_lengths, dilation_rates, is_causal=False,
                      offsets="partitioned", mixing="mean", scale=None, num_threads=0):
    """The op's output alone (lse dropped): q [B, N, H, D], k and v [B, N, Hkv, D]."""
    out, _ = torch.ops.dilated_attention.forward(
        q, k, v, list(segment_lengths), list(dilation_rates), is_causal, offsets, mixing, scale,
        num_threads)
    return out


def _preset(preset, offsets, mixing):
    if preset not in PRESETS:
        raise ValueError(f"preset = {preset!r}: must be one of {sorted(PRESETS)}")
    chosen = dict(PRESETS[preset])
    if offsets is not None:
        chosen["offsets"] = offsets
    if mixing is not None:
        chosen["mixing"] = mixing
    return chosen["offsets"], chosen["mixing"]


class DilatedAttention(nn.Module):
    """dilated-attention-pytorch's DilatedAttention(segment_lengths, dilation_rates,
    softmax_scale=None, attention_dropout=0.0, op=None), forward(query, key, value,
    is_causal=False) on [b, n, h, d] -> [b, n, h, d].

    Keyword-only extras: preset ("dilated_attention_pytorch", "torchscale", "longnet"),
    offsets / mixing (override the preset), num_threads (CPU; 0 = torch.get_num_threads()).
    Any N works (no divisibility by the segment lengths); k and v may have fewer heads (GQA).
    `op` is accepted and ignored (it selects an xformers kernel in the seed). Dropout inside
    the attention is not implemented: attention_dropout > 0 raises in training mode.
    """

    def __init__(self, segment_lengths, dilation_rates, softmax_scale=None,
                 attention_dropout=0.0, op=None, *, preset="dilated_attention_pytorch",
                 offsets=None, mixing=None, num_threads=0, **kwargs):
        super().__init__()
        if len(segment_lengths) != len(dilation_rates):
            raise ValueError("segment_lengths and dilation_rates must have the same length")
        self.segment_lengths = [int(w) for w in segment_lengths]
        self.dilation_rates = [int(r) for r in dilation_rates]
        self.softmax_scale = softmax_scale
        self.dropout_p = float(attention_dropout)
        self.op = op
        self.offsets, self.mixing = _preset(preset, offsets, mixing)
        self.num_threads = int(num_threads)
        load_ops()

    def forward(self, query, key, value, is_causal=False, attention_mask=None):
        if attention_mask is not None:
            raise ValueError("attention_mask is not supported (the pattern is the mask)")
        if self.training and self.dropout_p > 0.0:
            raise NotImplementedError(
                f"attention_dropout = {self.dropout_p}: dropout inside the attention is not "
                "implemented; use 0.0, or eval()")
        out, _ = torch.ops.dilated_attention.forward(
            query, key, value, self.segment_lengths, self.dilation_rates, bool(is_causal),
            self.offsets, self.mixing, self.softmax_scale, self.num_threads)
        return out

    def extra_repr(self):
        return (f"segment_lengths={self.segment_lengths}, dilation_rates={self.dilation_rates}, "
                f"offsets={self.offsets!r}, mixing={self.mixing!r}")


class MultiheadDilatedAttention(nn.Module):
    """dilated-attention-pytorch's MultiheadDilatedAttention(embed_dim, num_heads,
    dilation_rates, segment_lengths, dropout=0.0, bias=True, layer_norm=True,
    layer_norm_eps=1e-5, gamma_init=1.0, device=None, dtype=None, op=None): the same
    parameters under the same names (q_proj, k_proj, v_proj, out_proj, q_ln, k_ln; MAGNETO
    initialisation; q_ln and k_ln on the projected queries and keys, q_ln again on the attention
    output before out_proj, as the seed does), so its state_dict loads. forward(query, key=None,
    value=None, ..., need_weights=False, is_causal=False) on [b, n, embed_dim] returns the output,
    or (output, None) with need_weights=True. Masks raise (the seed ignores them).
    """

    def __init__(self, embed_dim, num_heads, dilation_rates, segment_lengths, dropout=0.0,
                 bias=True, layer_norm=True, layer_norm_eps=1e-5, gamma_init=1.0, device=None,
                 dtype=None, op=None, *, preset="dilated_attention_pytorch", offsets=None,
                 mixing=None, num_threads=0, **kwargs):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if len(dilation_rates) != len(segment_lengths):
            raise ValueError(f"len(dilation_rates) ({len(dilation_rates)}) must be equal to "
                             f"len(segment_lengths) ({len(segment_lengths)})")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.gamma_init = gamma_init
        self.layer_norm = layer_norm
        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.attention = DilatedAttention(segment_lengths, dilation_rates,
                                          attention_dropout=dropout, op=op, preset=preset,
                                          offsets=offsets, mixing=mixing, num_threads=num_threads)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        if layer_norm:
            self.q_ln = nn.LayerNorm(embed_dim, eps=layer_norm_eps, **factory)
            self.k_ln = nn.LayerNorm(embed_dim, eps=layer_norm_eps, **factory)
        else:
            self.q_ln = self.k_ln = None
        self._reset_parameters()

    def _reset_parameters(self):
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_normal_(proj.weight, gain=self.gamma_init)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)

    def forward(self, query, key=None, value=None, key_padding_mask=None, need_weights=False,
                attn_mask=None, is_causal=False, average_attn_weights=True):
        if key_padding_mask is not None or attn_mask is not None:
            raise ValueError("key_padding_mask and attn_mask are not supported")
        key = query if key is None else key
        value = query if value is None else value
        if query.dim() != 3 or key.dim() != 3 or value.dim() != 3:
            raise ValueError("Expected 3D tensors (batch, seq_len, embed_dim), got shapes: "
                             f"query={tuple(query.shape)}, key={tuple(key.shape)}, "
                             f"value={tuple(value.shape)}")
        b, n, _ = query.shape
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        if self.q_ln is not None:
            q, k = self.q_ln(q), self.k_ln(k)
        q = q.view(b, n, self.num_heads, self.head_dim)
        k = k.view(b, k.shape[1], self.num_heads, self.head_dim)
        v = v.view(b, v.shape[1], self.num_heads, self.head_dim)
        x = self.attention(q, k, v, is_causal=is_causal).reshape(b, n, self.embed_dim)
        if self.q_ln is not None:
            x = self.q_ln(x)
        x = self.out_proj(x)
        return (x, None) if need_weights else x
