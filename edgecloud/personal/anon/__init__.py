"""Anonymous user embeddings (IDfree-PL, KDD'25): personalize a cloud LM without user identifiers.

Each device keeps a user-specific *distribution* over embeddings and samples a fresh embedding per upload, so the
cloud sees (text, embedding) pairs and never a stable identifier. Modules, one per concept:
:mod:`.data` (users, time split, reply-selection candidates), :mod:`.features` (the frozen lower layers, cached),
:mod:`.device` (the per-user distributions, fitted and sampled on the device), :mod:`.cloud` (soft prefix + LoRA
top layers), :mod:`.attack` (classifier and linker), :mod:`.server` (the real upload path), :mod:`.bench`.
"""
