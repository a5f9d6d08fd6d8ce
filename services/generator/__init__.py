"""Generator service: Self-Instruct instruction, classification and instance generation."""
