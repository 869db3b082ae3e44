"""fastlora's benchmarks (BENCH.md): providers side by side in one process, ratios to the bare base matmul.

- ``python -m bench``: the runner (CSV, JSON, markdown, PNG); ``bench/README.md`` says what is measured.
- ``python -m pytest bench/bench_lora_linear.py bench/bench_nf4_linear.py bench/bench_train_step.py
  --benchmark-only``: the same calls through pytest-benchmark.
"""
