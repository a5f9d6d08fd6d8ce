"""Evaluator service: scores models on held-out tasks they never trained on."""
