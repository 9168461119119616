"""The toy world: procedural multi-label scenes and the tiny models trained on them."""
