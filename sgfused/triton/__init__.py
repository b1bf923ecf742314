"""Triton kernels. Imported lazily by sgfused.ops, so sgfused works without triton installed."""
