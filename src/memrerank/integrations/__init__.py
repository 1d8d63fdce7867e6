"""Rerankers for the frameworks applications already use, each in its own extra.

* :mod:`memrerank.integrations.langchain` — ``MemrerankRerank``, a LangChain document compressor
  (``pip install "memrerank[langchain]"``);
* :mod:`memrerank.integrations.llama_index` — ``MemrerankRerank``, a LlamaIndex node postprocessor
  (``pip install "memrerank[llama-index]"``);
* :mod:`memrerank.integrations.mem0` — ``MemrerankReranker``, mem0's reranker provider ``"memrerank"``
  (``pip install "memrerank[mem0]"``);
* :mod:`memrerank.integrations.graphiti` — ``MemrerankRerankerClient``, a Graphiti ``CrossEncoderClient``
  (``pip install "memrerank[graphiti]"``);
* ``haystack_integrations.components.rankers.memrerank`` — ``MemrerankRanker``, a Haystack ranker component
  (``pip install "memrerank[haystack]"``), where Haystack's pipeline files may name it.

mem0, Graphiti and Haystack take an artifact or the URL of a running ``memrerank serve`` (one client for all,
:mod:`memrerank.integrations._client`). Importing this package imports no framework; each module imports its own
on import and, when it is missing, raises an ImportError naming the extra to install.
"""

__all__: list[str] = []
