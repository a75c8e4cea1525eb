"""CSR: the KV cache as sparse codes over learned dictionaries (NeuralDict), against KIVI quantization.

Each key/value vector is stored as a few (atom index, weight) pairs over a per-layer dictionary; attention reads
the reconstruction. ``coding`` has the coders (MP, OMP), ``dictionary`` k-means and NeuralDict training,
``quant`` the KIVI baseline, ``cache`` the transformers Cache that stores codes, ``bench`` the comparison.
"""
