"""Recipes that compose the services: the self-improvement loop driver and one-off jobs."""
