"""PAL model code: torch modules (training), numpy head math (serving), checkpoint and bundle formats.

Importing this package must not import torch: the serving path uses `models.head`, `models.scorer`
and `models.bundle` only. Torch-backed modules (`models.pal`, `models.checkpoint`, `models.export`,
`models.encoder`) are imported explicitly by training code.
"""
