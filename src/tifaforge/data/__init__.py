"""Training data: novel corpora for CPT, conversations and prompts, preference pairs, the demo set."""
