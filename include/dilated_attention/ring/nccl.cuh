#pragma once
// The public path of the NCCL transport (target DilatedAttention::nccl); it lives with the other
// transports in ring/transport/.
#include "transport/nccl.cuh"
