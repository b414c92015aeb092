"""The OpenAI-compatible server and web chat page (`tifa serve`); needs the `serve` extra.

    tifa serve models/tiny --port 8000

`app.create_app(engine, ...)` builds the FastAPI app; `scheduler` owns the engine's one worker
thread; `protocol` maps OpenAI/SillyTavern request fields onto `SamplingConfig`. Nothing here is
imported by `import tifaforge`.
"""
