"""meda pipeline: Ray Data annotation jobs and the Ray Serve endpoint around `meda_engine`.

Data flows one way: storage (`pipeline.storage`) -> decoded media (`meda_engine.media`) -> engine -> rows or
HTTP responses. This package imports `meda_engine`, never the reverse.
"""
