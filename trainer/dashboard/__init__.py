"""A web dashboard over a folder of training runs: watch and compare their curves, launch runs of
the recipes in configs/, stop and resume them, and sample from a checkpoint.

    python -m trainer.dashboard --root=DIR [--port=8080] [--host=127.0.0.1]

app.py (the FastAPI application and its API), runs.py (reading workdirs), launcher.py (starting
and stopping trainer.main processes), chat.py (the KV-cache sampler), static/ (the page).
"""
