"""A model in front of people and clients: the OpenAI-compatible server and web chat page (`tifa serve`,
the `serve` extra) and the terminal chat (`tifa chat`: `session`, `terminal`).

    tifa serve models/tiny --port 8000
    tifa chat models/tiny --card data/demo/cards/shen_qingya.json

`app.create_app(engine, ...)` builds the FastAPI app; `scheduler` owns the engine's one worker
thread; `protocol` maps OpenAI/SillyTavern request fields onto `SamplingConfig`. Nothing here is
imported by `import tifaforge`.
"""
