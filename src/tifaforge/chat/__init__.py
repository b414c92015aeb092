"""Chat format: the seed's template, think-block handling, role-play prompts, character cards."""
