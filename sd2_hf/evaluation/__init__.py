"""Evaluation: mean accepted length on transformers and vLLM, MACs, reports and plots."""
