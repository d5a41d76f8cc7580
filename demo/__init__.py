"""The shapes demo: a procedural dataset, a tiny LLaVA trained on it, evaluation (torch-free except `train`)."""
