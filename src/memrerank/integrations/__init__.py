"""Rerankers for the frameworks applications already use, each in its own extra.

* :mod:`memrerank.integrations.langchain` — ``MemrerankRerank``, a LangChain document compressor
  (``pip install "memrerank[langchain]"``);
* :mod:`memrerank.integrations.llama_index` — ``MemrerankRerank``, a LlamaIndex node postprocessor
  (``pip install "memrerank[llama-index]"``).

Importing this package imports neither framework; each module imports its own on import and, when it is
missing, raises an ImportError naming the extra to install.
"""

__all__: list[str] = []
