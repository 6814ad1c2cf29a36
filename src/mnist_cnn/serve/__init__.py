"""`mnist-cnn serve`: a web page to draw digits on, and an HTTP API (see `serve.app`).

Nothing is imported here, so that the CLI can register the command without loading FastAPI.
"""
