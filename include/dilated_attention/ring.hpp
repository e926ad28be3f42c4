#pragma once
// The ring umbrella header (docs/semantics.md "Entry points"): rank p of P holds N/P rows of Q, K and V -- the
// contiguous shard [p*N/P, (p+1)*N/P), or zigzag chunks p and 2P-1-p of 2P (ring/driver/layout.hpp) --
// and receives exactly those rows of the single-device result (ring::forward) and gradients
// (ring::backward). Pulls in no MPI and no NCCL: include <dilated_attention/ring/mpi.hpp> (target DilatedAttention::mpi) or
// <dilated_attention/ring/nccl.cuh> (target DilatedAttention::nccl) for those transports.

#include "config.hpp"
#include "arguments.hpp"
#include "ring/driver/backward.hpp"
#include "ring/cpu/forward_backend.hpp"
#include "ring/cpu/backward.hpp"
#include "ring/cpu/forward.hpp"
#include "ring/cpu/backward_backend.hpp"
#include "ring/cpu/shard.hpp"
#include "ring/driver/exchange.hpp"
#include "ring/driver/agreement.hpp"
#include "ring/driver/forward.hpp"
#include "ring/transport/in_process.hpp"
#include "ring/driver/layout.hpp"
#include "ring/driver/options.hpp"
#include "ring/driver/pattern_cache.hpp"
#include "ring/driver/schedule.hpp"
#include "ring/transport/transport.hpp"
