"""Inference and evaluation from a trained checkpoint: caption, chat, batch captioning, held-out metrics.

Each command has a typed config and one ``run`` function (``cli.py`` maps commands onto them):

* ``infer.caption``  ``python cli.py caption CHECKPOINT VIDEO...``
* ``infer.chat``     ``python cli.py chat CHECKPOINT VIDEO``
* ``infer.batch``    ``python cli.py caption-shards CHECKPOINT SHARDS --output OUT.jsonl``
* ``infer.evaluate`` ``python cli.py evaluate CHECKPOINT SHARDS [--metrics]``

``infer.load`` turns CHECKPOINT (a training run, a trainable export or a released ``.pth``) into a model;
prompts and generation (``pipeline.generate``) and the scores (``pipeline.evaluation``) are in the core,
which training's validation shares.
"""
