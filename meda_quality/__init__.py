"""A small Qwen2-VL trained from scratch on a synthetic "needle in a video" task.

* `meda_quality.task`: the clip generator, the questions, the held-out split, MP4 corpus writer;
* `meda_quality.train`: the CPU training recipe (``python -m meda_quality.train``);
* `meda_quality.evaluate`: exact-match accuracy through `meda_engine.Engine`.
"""
