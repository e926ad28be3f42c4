#pragma once
// The public path of the MPI transport (target DilatedAttention::mpi); it lives with the other
// transports in ring/transport/.
#include "transport/mpi.hpp"
