"""The one training engine: every stage (distill, train, finetune-video) runs through ``engine.loop.run``.

A stage supplies a model, a data loader and a loss; the engine owns DeepSpeed (config, ZeRO, precision,
clipping, accumulation), parameter groups (layer decay, no-decay sets), LAMB/AdamW, warmup + cosine,
checkpoint/resume, NaN handling, logging and progress.
"""
