"""Sparse fine-tuning: `SD2Config`, `SD2Trainer`, `SparsityMaskCallback` and the divergences."""
