"""The chat format: the seed's template, think-block handling, role-play prompts, character cards.

No model runs here: `engine` generates, `serve` puts a chat in front of a person.
"""
