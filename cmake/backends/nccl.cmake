# NCCL back end: target dilated_attention_nccl / DilatedAttention::nccl when CUDA and NCCL are found.
