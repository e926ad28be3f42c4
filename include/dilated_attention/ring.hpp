#pragma once
// The ring umbrella header (docs/semantics.md §4): rank p of P holds N/P rows of Q, K and V -- the
// contiguous shard [p*N/P, (p+1)*N/P), or zigzag chunks p and 2P-1-p of 2P (ring/layout.hpp) --
// and receives exactly those rows of the single-device result (ring::forward) and gradients
// (ring::backward). Pulls in no MPI and no NCCL: include <dilated_attention/ring/mpi.hpp> (target DilatedAttention::mpi) or
// <dilated_attention/ring/nccl.cuh> (target DilatedAttention::nccl) for those transports.

#include "config.hpp"
#include "ring/backward.hpp"
#include "ring/cpu_backend.hpp"
#include "ring/cpu_backward.hpp"
#include "ring/cpu_forward.hpp"
#include "ring/cpu_gradient_backend.hpp"
#include "ring/cpu_shard.hpp"
#include "ring/exchange.hpp"
#include "ring/agreement.hpp"
#include "ring/forward.hpp"
#include "ring/in_process.hpp"
#include "ring/layout.hpp"
#include "ring/options.hpp"
#include "ring/pattern_cache.hpp"
#include "ring/schedule.hpp"
#include "ring/transport.hpp"
