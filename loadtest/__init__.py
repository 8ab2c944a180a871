"""Load generation and measurement against OpenAI-compatible endpoints, and a simulated engine."""
