"""Search your own images with a sentence: a folder index (``index.py``), ranking against it
(``searcher.py``) and a local web page (``server.py``), driven by ``search.py``."""
