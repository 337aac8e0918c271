"""The numba backend: mixlocal's own kernels (quant/kernels/) on the CPU.

`backend.py` is the backend (`NumbaCPUBackend.build`, the forward pass, the one-token decode step), `ops.py` the
compiled steps between the weight products (norms, RoPE, attention, routing), `cache.py` its KV cache, and
`packed_cache.py` / `experts.py` where the weights live: repacked for the kernels (in a mapped cache file), and under
a memory budget in expert slots read from the model file on demand. Nothing is imported here, so that reading the
KV cache's formats (`mixlocal info`) does not compile the backend.
"""
