"""Training: the distillation trainer that builds a WaveCLIP from a frozen CLIP teacher, and the small CLIP
teacher trained on the generated benchmark.

    distillation.py   the loss and the loop (`distill`); start reading here
    config.py         `DistillationConfig`
    data.py           image folders / `datasets`, unreadable files skipped, collator, seeded epoch order
    models.py         the frozen teacher and the student converted from it
    teacher_cache.py  the teacher's image embeddings, per batch or cached once
    optimization.py   AdamW parameter groups and the learning-rate schedule
    checkpoints.py    atomic checkpoints all processes agree on; exact resume
    signals.py        SIGTERM: finish the step, checkpoint, exit 143
    metrics.py        loss / cosine / images/s / MFU windows, log.jsonl
    validation.py     held-out cosine per stage during training
    outputs.py        `DistillationResult`, summary.json, the Hub-ready `final/` folder
    teacher.py        the CLIP teacher's contrastive training (`train_clip_teacher`)
    teacher_data.py   its data: a uint8 pixel cache and captions drawn per batch
"""
