"""Custom ops: the batched DPO log-ratio op (torch reference, C++ CPU and CUDA kernels)."""
