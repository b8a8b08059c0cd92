"""dynamo-bench: is DynaMo worth it on this device? Latency, quality and scale of an exported artifact.

A package of its own, above both the export (converters/) and the runtime: it exports
models (scale), loads them on ONNX Runtime and in PyTorch, and compares them.

Modules, in the order a run uses them: prompts (prompt sets), baselines (Optimum
and PyTorch on the base model), latency (timing and its figures), quality
(judged perplexity, diversity, same-quality speed-up, PPL_d), env (the
environment record), benchmark (run_benchmark ties them together), report
(JSON, markdown, plot), scale (model-size table with random weights), cli
(`dynamo-bench`). Errors are errors.BenchError.
"""
