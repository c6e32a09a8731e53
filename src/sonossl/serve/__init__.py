"""Serving: the exported model behind KServe's ModelServer (Open Inference Protocol v2 and v1).

- ``frames``: request media -> the frames the model sees (training's decode, sector crop and resize, imported);
- ``model``: ``SonosslModel``, a ``kserve.Model``: request validation, inference, responses, request log;
- ``server``: KServe's ModelServer with a configurable listen address and a request size limit;
- ``__main__``: ``python -m sonossl.serve --model-dir DIR --http-port PORT --host HOST [--request-log URI]``.

Heavy imports (kserve, torch) happen in the submodules, so ``import sonossl.serve`` stays cheap.
"""
