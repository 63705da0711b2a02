"""Offline PAL training: data set builders, embedding cache, training, few-shot evaluation, CLI."""
