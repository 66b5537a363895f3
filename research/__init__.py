"""Research tools, run as `python research/<tool>.py`: benchmarks, the ablation and its encoder probe,
the reference-snapshot conversion."""
