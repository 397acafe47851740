"""The embedded demo model's world: procedural videos with captions, training, and a fidelity checker."""
