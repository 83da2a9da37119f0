"""Stand-ins and sample corpora: what the demo and the tests use in place of downloads.

Not shared core: the tiny LLM and tiny encoder trained on the spot (``tiny_llm``, ``tiny_encoder``),
random weights of real sizes written as the folders users have (``synthetic``), and the WebVid-layout
and grounded sample corpora (``sample_data``). This package imports only ``pipeline/``; no stage imports it.
"""
