# Benchmarks of the cuda area.
