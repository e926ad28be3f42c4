# CUDA back end: target dilated_attention_cuda / DilatedAttention::cuda when nvcc is found.
