"""DRAGON: device–cloud distributed RAG with speculative aggregation (MobiHoc'25), on the collab core."""
