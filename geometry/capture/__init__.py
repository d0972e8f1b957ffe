"""Training-time capture: what runs inside a training loop.

    callbacks (HF Trainer / TRL adapters) -> recorder (the framework-free entry; config: RecorderConfig)
        -> tracking (per-step subspace iteration, pure maths; batches: same-shape updates batched for it)
        -> store (the run's files, written off the training thread by writer), laid out as in layout,
           listed by manifest, tracking state in trackfile
    distributed (full matrices from sharded ones) ; adapters (peft LoRA modules as their updates s B A)
    trajectory (a store read back as locking curves, and the run-level values the callback logs)
"""
