"""KV-cache systems: MPIC reuse of multimodal caches, CSR sparse-coded caches (``csr``)."""
