"""neuroviz: explore and describe the neurons of vision networks.

The library knows nothing of Streamlit; the pages in ``views/`` only call it and draw.
"""

__version__ = "0.1.0"
