"""Experiments: training runs whose figures answer a question (time to accuracy, batch size and learning
rate, relative location against random init), run like the benchmarks with ``python -m benchmarks NAME``."""
