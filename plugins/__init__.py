"""Built-in plugins of sftctl, registered through the same hooks as third-party plugins.

- ``alpaca``: the Stanford Alpaca dataset format, its demo data and its benchmarks.
- ``optimizers``: AdamW (fused where the device allows), Adam, SGD with momentum, Adafactor.
- ``schedulers``: cosine, linear and constant learning-rate schedules, each with linear warmup.
- ``metrics_jsonl``: writes every train/validation metrics line to ``OUTPUT_DIR/metrics.jsonl``.
"""
