"""Programs built on the engine: the embedded default (demo, synthetic data, pretraining a small
CLIP) and forget/retain selection. The library proper does not import them; launch/ does."""
