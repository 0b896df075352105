"""The nano world: procedural creatures with ground-truth attributes (prompts here; renderer and probes to come)."""
