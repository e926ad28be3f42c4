# Benchmarks of the ring area.
