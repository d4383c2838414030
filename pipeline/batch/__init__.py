"""The annotation job, one concern per module (see docs/pipeline.md):

    config.py   AnnotateConfig, its flags and their validation (import-light)
    layout.py   the run directory's layout (rows/, _manifest/, _partial/, run.json, summary.json)
    plan.py     manifest and pending tasks (resume)
    stages.py   decode_media (CPU) and Annotator (model actor)
    job.py      Ray wiring: run()
    results.py  read_rows, summarize, format_summary
"""
