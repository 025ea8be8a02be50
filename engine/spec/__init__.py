"""Speculative decoding: proposers (n-gram prompt lookup, draft model) and lossless verification.

Shared by every engine that decodes (decode workers and colocated workers), hence in engine/.
"""
