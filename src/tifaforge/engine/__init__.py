"""The one inference engine (DESIGN.md §4): chat, serving, rollouts and eval all generate through it."""
