# Benchmarks of the cpu area.
