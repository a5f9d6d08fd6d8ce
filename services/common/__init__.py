"""What the four services share: config, run store, records, prompts, models, data formats."""
