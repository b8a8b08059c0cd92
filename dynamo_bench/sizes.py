"""Pythia's architectures, torch-free so that `dynamo-bench --help` can list them without importing torch."""

# name -> (hidden, layers, attention heads); intermediate = 4 x hidden, Pythia's shared vocabulary and context.
PYTHIA = {
    "70m": (512, 6, 8),
    "160m": (768, 12, 12),
    "410m": (1024, 24, 16),
    "1b": (2048, 16, 8),
}
PYTHIA_VOCAB = 50304
PYTHIA_CONTEXT = 2048
