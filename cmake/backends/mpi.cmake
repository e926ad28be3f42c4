# MPI back end: target dilated_attention_mpi / DilatedAttention::mpi when MPI is found.
