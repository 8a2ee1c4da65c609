"""The judge and the rewriter: interfaces, backends (oracle, colocated model, HTTP) and rewards."""
