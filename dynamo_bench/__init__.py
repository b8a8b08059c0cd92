"""dynamo-bench: is DynaMo worth it on this device? Latency, quality and scale of an exported artifact.

A package of its own, above both the export (converters/) and the runtime. The
artifact benchmark runs from the runtime-only install (no torch), so it can be
run on the target device; the parts that need PyTorch (the baselines, judging
with a checkpoint, --scale's exports) or matplotlib (--plot) run where those are
installed and are reported as skipped elsewhere (extras.py).

Modules, in the order a run uses them: prompts (prompt sets), baselines (Optimum
and PyTorch on the base model; imports torch), latency (timing and its figures),
quality (judged perplexity, diversity, same-quality speed-up, PPL_d), env (the
environment record: device, ONNX Runtime, versions), extras (what this install
can run), benchmark (run_benchmark ties them together), report (JSON, markdown,
plot), compare (runs from several devices side by side), scale (model-size table
with random weights; imports torch; sizes holds the table of sizes), providers
(one artifact on two execution providers: parity and IO binding), cli
(`dynamo-bench`). Errors are errors.BenchError.
"""
