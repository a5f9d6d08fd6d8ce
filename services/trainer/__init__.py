"""Trainer service: fine-tunes the next model on the kept data with Ray Train."""
