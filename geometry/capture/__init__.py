"""Training-time capture: what runs inside a training loop.

tracking (per-step subspace iteration) -> recorder (the framework-free entry) -> store (the run's
files, written off the training thread) ; distributed (full matrices from sharded ones) ;
callbacks (the HF Trainer / TRL adapters).
"""
